"""Chat data: a conversation rendered with its checkpoint's own chat template, and which of the
text is trained on (the assistant turns).

A conversation is a list of {"role", "content"} dicts. `ChatTemplate.pieces` cuts its rendering
into (text, trained) pieces by rendering prefixes of the conversation and taking differences: an
assistant turn is what the conversation through it adds to the conversation before it with the
generation prompt, i.e. the reply and whatever closes the turn ("<|im_end|>\n"), which the model
must learn to emit. Differences work with any template, so none needs the `{% generation %}`
markers transformers' assistant mask relies on; a template that rewrites earlier turns as the
conversation grows (one that drops past reasoning) is refused, as its prefixes do not add up.

The caller tokenizes each piece separately and concatenates the ids, so a mask boundary never falls
inside a token.

Templates are data: they render in jinja2's immutable sandbox, where no code runs and no argument
changes. numpy-free, standard library plus jinja2, which is imported when a template compiles.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from kd_jax.config import ConfigError

# The tokenizer_config.json entries a template may refer to, passed to it under the same names.
_SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")
# What `strftime_now` formats: some Llama 3 templates write today's date into the system prompt,
# and a fixed one keeps the rendered (and stored) data byte-identical whichever day it is built.
# 26 Jul 2024 is the default those templates fall back to themselves.
_TEMPLATE_DATE = datetime.datetime(2024, 7, 26)


class ChatTemplate:
    """A checkpoint's chat template and the special-token strings it refers to."""

    def __init__(self, template: str, special_tokens: dict[str, str], source: str):
        self.source = source  # where it was read from, for messages
        self.text = template
        self.special_tokens = dict(special_tokens)
        self._template = _compile(template, source)

    def render(self, messages: list, add_generation_prompt: bool = False) -> str:
        """The conversation as the template writes it; ValueError if the template raises."""
        try:
            return self._template.render(messages=messages,
                                         add_generation_prompt=add_generation_prompt,
                                         tools=None, **self.special_tokens)
        except Exception as err:  # a template is data: whatever it raises is a data error
            raise ValueError(f"the chat template ({self.source}) refused the conversation: "
                             f"{_first_line(err)}") from None

    def pieces(self, messages: list) -> list[tuple[str, bool]]:
        """(text, trained) pieces whose texts concatenate to `render(messages)`; trained pieces
        are the assistant turns. ValueError, in one line, for malformed messages or a template
        that raises or does not render the conversation incrementally."""
        _check_messages(messages)
        # Each rendering must extend the one before it. An assistant turn adds two: the
        # conversation before it with the generation prompt (where its text starts) and the
        # conversation through it (where its text ends).
        renderings = []  # (index of the message it stops at, text, whether the new text is trained)
        for index, message in enumerate(messages):
            if message["role"] == "assistant":
                renderings.append((index, self.render(messages[:index], True), False))
                renderings.append((index, self.render(messages[:index + 1]), True))
        renderings.append((len(messages) - 1, self.render(messages), False))

        pieces: list[tuple[str, bool]] = []
        rendered = ""
        for index, text, trained in renderings:
            if not text.startswith(rendered):
                raise ValueError(f"the chat template ({self.source}) does not render the "
                                 f"conversation incrementally at messages[{index}]: a rendering "
                                 "of the conversation so far changes an earlier turn")
            new_text = text[len(rendered):]
            if new_text and pieces and pieces[-1][1] == trained:
                pieces[-1] = (pieces[-1][0] + new_text, trained)
            elif new_text:
                pieces.append((new_text, trained))
            rendered = text
        return pieces


def load_chat_template(tokenizer_path: str | Path) -> ChatTemplate:
    """The chat template beside a tokenizer.json (`tokenizer_path` is the file or its folder):
    chat_template.jinja (the transformers 5 layout), else tokenizer_config.json's
    "chat_template". ConfigError, in one line, if there is none or it cannot be read."""
    path = Path(tokenizer_path).expanduser()
    folder = path if path.is_dir() else path.parent
    config = _read_tokenizer_config(folder / "tokenizer_config.json")
    template_file = folder / "chat_template.jinja"
    if template_file.is_file():
        template, source = template_file.read_text(encoding="utf-8"), str(template_file)
    else:
        template = _config_template(config, folder / "tokenizer_config.json")
        source = str(folder / "tokenizer_config.json")
    if template is None:
        raise ConfigError(f"data.messages_column needs a checkpoint whose tokenizer has a chat "
                          f"template; '{folder}' has none (no chat_template.jinja, and no "
                          f"\"chat_template\" in tokenizer_config.json)")
    special_tokens = {}
    for name in _SPECIAL_TOKENS:
        token = _token_text(config.get(name), name, source)
        if token is not None:
            special_tokens[name] = token
    return ChatTemplate(template, special_tokens, source)


def _read_tokenizer_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"data.tokenizer: cannot read '{path}' ({_first_line(err)})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"data.tokenizer: '{path}' holds a {type(config).__name__}, "
                          "not a JSON object")
    return config


def _config_template(config: dict[str, Any], path: Path) -> str | None:
    """tokenizer_config.json's "chat_template": a string, or a list of named templates of which
    the one named "default" is the chat template (the others are for tool use, RAG...)."""
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template
                 if isinstance(entry, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ConfigError(f"data.tokenizer: '{path}' lists chat templates "
                          f"{sorted(map(str, named))} but none named 'default'")
    raise ConfigError(f"data.tokenizer: '{path}' has a chat_template that is a "
                      f"{type(template).__name__}, not a string or a list of named templates")


def _token_text(token: Any, name: str, source: str) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(token, dict):
        token = token.get("content")
    if token is None or isinstance(token, str):
        return token
    raise ConfigError(f"data.tokenizer: {name} beside '{source}' is a {type(token).__name__}, "
                      "not a string")


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of {{role, content}} dicts, "
                         f"not a {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is an empty list")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{index}] is a {type(message).__name__}, "
                             "not a {role, content} dict")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                found = "missing" if key not in message else type(message[key]).__name__
                raise ValueError(f"messages[{index}]['{key}'] must be a string ({found})")


def _compile(template: str, source: str):
    """The template compiled in the sandbox, with the globals and filters chat templates expect
    of transformers. ConfigError if jinja2 is missing or the template does not compile."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ConfigError("data.messages_column: rendering a chat template needs the 'jinja2' "
                          "package") from None

    class GenerationMarkers(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`, with which some templates mark assistant
        text for transformers' assistant mask, renders as its body: `pieces` finds that text
        by itself."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    # {% break %} and {% continue %} (loopcontrols) are used by published templates.
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, GenerationMarkers])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    try:
        return environment.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise ConfigError(f"data.tokenizer: the chat template in '{source}' does not compile "
                          f"(line {err.lineno}: {_first_line(err)})") from None


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML; chat templates were written for (and
    # models trained on) plain JSON, as transformers renders it.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str):
    """How a template refuses a conversation (roles that do not alternate, a misplaced system
    message)."""
    import jinja2

    raise jinja2.TemplateError(message)


def _strftime_now(format: str) -> str:
    return _TEMPLATE_DATE.strftime(format)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
