"""kd_jax.data.chat: chat templates read from a checkpoint's folder, rendered in the sandbox, and
cut into pieces whose trained tokens are exactly the assistant turns."""

import json

import numpy as np
import pytest

from kd_jax.config import ConfigError
from kd_jax.data.chat import ChatTemplate, load_chat_template
from kd_jax.data.tokenizers import load_tokenizer

# ChatML, as Qwen and SmolLM write it, with a default system prompt when there is none.
CHATML = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TURN_END = "<|im_end|>\n"
CONVERSATION = [
    {"role": "system", "content": "Answer in short words."},
    {"role": "user", "content": "what does the fox do?"},
    {"role": "assistant", "content": "the quick brown fox jumps over the lazy dog."},
    {"role": "user", "content": "and the dog?"},
    {"role": "assistant", "content": "the lazy dog sleeps,\nall day."},
]
WORDS = "the quick brown fox jumps over lazy dog sleeps all day what does do and answer in short"


def write_checkpoint(folder, chat_template=CHATML, **config):
    """A folder holding a byte-level BPE tokenizer.json with the ChatML special tokens and a
    tokenizer_config.json with `chat_template` (left out when None) and `config`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([WORDS] * 4, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "bos_token": None, **config}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def encode_pieces(tokenizer, pieces):
    """(ids, trained mask) of the pieces, each tokenized on its own."""
    ids = [tokenizer.encode(text) for text, _ in pieces]
    trained = [np.full(len(piece_ids), flag) for piece_ids, (_, flag) in zip(ids, pieces)]
    return np.concatenate(ids), np.concatenate(trained)


def assert_trained_on_assistant_turns(folder, messages):
    template = load_chat_template(folder / "tokenizer.json")
    tokenizer = load_tokenizer(str(folder / "tokenizer.json"))
    pieces = template.pieces(messages)
    assert "".join(text for text, _ in pieces) == template.render(messages)
    assert all(text for text, _ in pieces)
    assert all(a[1] != b[1] for a, b in zip(pieces, pieces[1:]))  # adjacent pieces are merged

    ids, trained = encode_pieces(tokenizer, pieces)
    assistant_texts = [message["content"] + TURN_END for message in messages
                       if message["role"] == "assistant"]
    assert [text for text, flag in pieces if flag] == assistant_texts
    # Counted independently: each assistant turn tokenized on its own, from the messages.
    expected = [tokenizer.encode(text) for text in assistant_texts]
    assert np.array_equal(ids[trained], np.concatenate(expected or [np.zeros(0, np.int32)]))
    assert tokenizer.decode(ids[trained]) == "".join(assistant_texts)
    assert tokenizer.decode(ids) == template.render(messages)
    # The special tokens are single ids, so a turn's close is learnt as the <|im_end|> token.
    im_end = tokenizer.token_id("<|im_end|>")
    assert trained[ids == im_end].sum() == len(assistant_texts)
    return pieces


def test_two_assistant_turns_are_trained_and_nothing_else(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt")
    pieces = assert_trained_on_assistant_turns(folder, CONVERSATION)
    assert [flag for _, flag in pieces] == [False, True, False, True]
    assert pieces[0][0].endswith("<|im_start|>assistant\n")
    assert pieces[2][0] == "<|im_start|>user\nand the dog?<|im_end|>\n<|im_start|>assistant\n"


def test_a_conversation_ending_with_a_user_message_ends_untrained(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt")
    messages = CONVERSATION[1:4]  # no system message: the template writes its default one
    pieces = assert_trained_on_assistant_turns(folder, messages)
    assert [flag for _, flag in pieces] == [False, True, False]
    assert pieces[0][0].startswith("<|im_start|>system\nYou are helpful.")
    assert pieces[-1][0] == "<|im_start|>user\nand the dog?<|im_end|>\n"
    user_only = load_chat_template(folder).pieces(CONVERSATION[1:2])
    assert [flag for _, flag in user_only] == [False]


def test_the_template_is_found_in_each_layout(tmp_path):
    listed = write_checkpoint(tmp_path / "listed", chat_template=[
        {"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
        {"name": "default", "template": CHATML}])
    assert_trained_on_assistant_turns(listed, CONVERSATION)

    # transformers 5 writes chat_template.jinja; it wins over tokenizer_config.json.
    jinja_file = write_checkpoint(tmp_path / "jinja", chat_template="{{ raise_exception('no') }}")
    (jinja_file / "chat_template.jinja").write_text(CHATML)
    assert_trained_on_assistant_turns(jinja_file, CONVERSATION)
    assert load_chat_template(jinja_file).source == str(jinja_file / "chat_template.jinja")

    unnamed = write_checkpoint(tmp_path / "unnamed", chat_template=[
        {"name": "tool_use", "template": CHATML}])
    with pytest.raises(ConfigError, match="none named 'default'"):
        load_chat_template(unnamed)


def test_special_tokens_may_be_added_token_dicts(tmp_path):
    bos = {"__type": "AddedToken", "content": "<s>", "lstrip": False, "special": True}
    folder = write_checkpoint(tmp_path / "ckpt", chat_template="{{ bos_token }}" + CHATML,
                              bos_token=bos, eos_token={"content": "<|im_end|>"})
    template = load_chat_template(folder)
    assert template.special_tokens == {"bos_token": "<s>", "eos_token": "<|im_end|>"}
    pieces = template.pieces(CONVERSATION)
    assert pieces[0] == (pieces[0][0], False) and pieces[0][0].startswith("<s><|im_start|>")


def test_raise_exception_and_strftime_now(tmp_path):
    refusing = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}"
        "{{ raise_exception('Conversations must start with a user message') }}{% endif %}"
        + CHATML, {}, "refusing")
    with pytest.raises(ValueError, match="must start with a user message") as raised:
        refusing.pieces(CONVERSATION)
    assert "\n" not in str(raised.value)
    # A fixed date, whatever the day, so rendered data does not depend on when it was built.
    dated = ChatTemplate("Today: {{ strftime_now('%d %b %Y') }}\n" + CHATML, {}, "dated")
    assert dated.render(CONVERSATION).startswith("Today: 26 Jul 2024\n")


@pytest.mark.parametrize("messages, reason", [
    ("hello", "must be a list"),
    ([], "empty"),
    (["hello"], r"messages\[0\] is a str"),
    ([{"content": "hi"}], r"messages\[0\]\['role'\] must be a string \(missing\)"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": ["hi"]}],
     r"messages\[1\]\['content'\] must be a string \(list\)"),
])
def test_malformed_messages_are_refused(messages, reason):
    with pytest.raises(ValueError, match=reason):
        ChatTemplate(CHATML, {}, "test").pieces(messages)


def test_no_template_or_a_broken_one_is_a_config_error(tmp_path):
    folder = write_checkpoint(tmp_path / "plain", chat_template=None)
    with pytest.raises(ConfigError) as raised:
        load_chat_template(folder / "tokenizer.json")
    message = str(raised.value)
    assert "\n" not in message and str(folder) in message
    assert "data.messages_column needs a checkpoint whose tokenizer has a chat template" in message

    broken = write_checkpoint(tmp_path / "broken", chat_template="{% for m in messages %}")
    with pytest.raises(ConfigError, match="does not compile") as raised:
        load_chat_template(broken)
    assert "\n" not in str(raised.value)

    (broken / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read") as raised:
        load_chat_template(broken)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("probe", [
    "{{ ''.__class__.__mro__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ messages.append(messages[0]) }}",
])
def test_templates_run_no_code(probe):
    """A template comes from data: the sandbox refuses attribute escapes and mutation."""
    template = ChatTemplate(probe + CHATML, {}, "hostile")
    messages = [dict(message) for message in CONVERSATION]
    try:
        rendered = template.render(messages)
    except ValueError as err:
        rendered = str(err)
    assert "<class" not in rendered and "__builtins__" not in rendered
    assert messages == CONVERSATION


def test_a_template_that_rewrites_earlier_turns_is_refused():
    last_only = ChatTemplate(
        "{{ '<|im_start|>' + messages[-1]['role'] + '\\n' + messages[-1]['content'] + "
        "'<|im_end|>\\n' }}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        {}, "last-only")
    with pytest.raises(ValueError, match=r"incrementally at messages\[2\]"):
        last_only.pieces(CONVERSATION)


def test_generation_markers_and_loop_controls_compile():
    marked = ChatTemplate(
        "{% for message in messages %}{% if loop.index > 9 %}{% break %}{% endif %}"
        "<|im_start|>{{ message['role'] }}\n"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}"
        "<|im_end|>\n{% endgeneration %}{% else %}{{ message['content'] }}<|im_end|>\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        {}, "marked")
    plain = ChatTemplate(CHATML, {}, "plain")
    assert marked.pieces(CONVERSATION) == plain.pieces(CONVERSATION)
