"""kd_jax.teacher.cross: an online teacher with another tokenizer inside the loss. Through the
cross-tokenizer path, one tokenizer on both sides gives the online teacher's loss and gradients;
with teacher rows of their own, a partial vocabulary map and unaligned positions, the loss and
its gradients are the loss written out (teacher run apart, logits gathered, the divergence
over the map's buckets, ULD or the hybrid of the two, hard labels everywhere); chunked as
unchunked. At start-up: a pair of tokenizers with nothing in common is refused for `mapped`, the
pairs the tests use are not, and the teacher's mass on tokens of no bucket or mapped by prefix
only is a float64 reference's."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.losses.cross_vocab import (
    Buckets,
    hybrid_divergence_bt,
    mapped_divergence_bt,
    uld_bt,
)
from kd_jax.losses.divergences import cross_entropy_bt
from kd_jax.teacher.cross import CrossTokenizerTeacher
from kd_jax.teacher.online import OnlineTeacher
from kd_jax.train.step import make_loss_fn
from tests.helpers import LOSS, STUDENT, VALID_VOCAB, assert_trees_close, fast_jit, make_batch

CHUNKED = dataclasses.replace(LOSS, chunk_tokens=24)  # 3 positions of 8 rows a chunk
TEACHER_SEQ = 20


def loss_and_grads(loss_fn, student_params, teacher_params, batch):
    num_valid = float(np.sum(batch["loss_mask"]))
    (loss, metrics), grads = fast_jit(jax.value_and_grad(loss_fn, has_aux=True))(
        student_params, teacher_params, batch, num_valid)
    return float(loss), grads, metrics


def same_rows(batch):
    """The student's rows as the teacher's, every position aligned to itself."""
    seq = batch["tokens"].shape[1]
    return dict(batch, teacher_tokens=batch["tokens"], teacher_positions=batch["positions"],
                teacher_segment_ids=batch["segment_ids"],
                teacher_index=np.broadcast_to(np.arange(seq, dtype=np.int32),
                                              batch["tokens"].shape).copy())


@pytest.mark.parametrize("loss_cfg", [LOSS, CHUNKED], ids=["whole", "chunked"])
def test_one_tokenizer_through_the_cross_path_is_the_online_teacher(tiny_models, loss_cfg):
    student, student_params, teacher, teacher_params = tiny_models
    batch = same_rows(make_batch(0))
    identity = Buckets.identity(VALID_VOCAB, STUDENT.vocab_size)
    cross = CrossTokenizerTeacher(teacher, identity, teacher_valid=VALID_VOCAB)
    got = loss_and_grads(make_loss_fn(student, cross, loss_cfg, VALID_VOCAB), student_params,
                         teacher_params, batch)
    want = loss_and_grads(make_loss_fn(student, OnlineTeacher(teacher), loss_cfg, VALID_VOCAB),
                          student_params, teacher_params, batch)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    assert_trees_close(got[1], want[1])


def cross_batch(seed):
    """Teacher rows of TEACHER_SEQ tokens; a third of the student positions unaligned."""
    batch = make_batch(seed)
    rng = np.random.default_rng(seed + 100)
    rows, seq = batch["tokens"].shape
    index = np.sort(rng.integers(0, TEACHER_SEQ, (rows, seq)), axis=1).astype(np.int32)
    index[rng.random((rows, seq)) < 1 / 3] = -1
    return dict(batch, teacher_tokens=rng.integers(0, VALID_VOCAB, (rows, TEACHER_SEQ),
                                                   dtype=np.int32),
                teacher_positions=np.broadcast_to(np.arange(TEACHER_SEQ, dtype=np.int32),
                                                  (rows, TEACHER_SEQ)).copy(),
                teacher_segment_ids=np.ones((rows, TEACHER_SEQ), np.int32), teacher_index=index)


def partial_buckets():
    """13 buckets over the tiny vocabularies: several tokens in some, a few tokens in none."""
    rng = np.random.default_rng(7)
    teacher = np.concatenate([np.arange(13), rng.integers(-1, 13, VALID_VOCAB - 13)])
    student = np.concatenate([np.arange(13), rng.integers(-1, 13, VALID_VOCAB - 13)])
    return Buckets.of(rng.permutation(teacher), rng.permutation(student), 13, 64,
                      STUDENT.vocab_size, matched=rng.permutation(np.arange(13) < 6))


def written_out(student, teacher, teacher_params, method, batch, buckets):
    """The loss of the module docstring, from the two models' logits, as a function of the
    student's parameters (the teacher's logits computed first, apart)."""
    teacher_logits = teacher.logits(teacher_params, {
        "tokens": batch["teacher_tokens"], "positions": batch["teacher_positions"],
        "segment_ids": batch["teacher_segment_ids"]})
    index = batch["teacher_index"]
    gathered = np.take_along_axis(np.asarray(teacher_logits), np.maximum(index, 0)[..., None],
                                  axis=1)

    def loss(student_params):
        student_logits = student.logits(student_params, batch)
        if method == "uld":
            kd = uld_bt(student_logits, gathered, temperature=LOSS.temperature,
                        student_valid=VALID_VOCAB, teacher_valid=VALID_VOCAB)
        else:
            divergence = hybrid_divergence_bt if method == "hybrid" else mapped_divergence_bt
            kd = divergence(LOSS.divergence, student_logits, gathered, buckets,
                            temperature=LOSS.temperature, student_valid=VALID_VOCAB,
                            teacher_valid=VALID_VOCAB)
        mask = batch["loss_mask"] > 0
        kd = jnp.where(mask & (index >= 0), kd, 0.0)
        ce = jnp.where(mask, cross_entropy_bt(student_logits, batch["labels"],
                                              valid_vocab=VALID_VOCAB), 0.0)
        return (LOSS.kd_weight * kd.sum() + LOSS.ce_weight * ce.sum()) / mask.sum()
    return loss


@pytest.mark.parametrize("method", ["mapped", "uld", "hybrid"])
@pytest.mark.parametrize("loss_cfg", [LOSS, CHUNKED], ids=["whole", "chunked"])
def test_the_cross_tokenizer_loss_is_the_loss_written_out(tiny_models, method, loss_cfg):
    student, student_params, teacher, teacher_params = tiny_models
    batch, buckets = cross_batch(1), partial_buckets()
    cross = CrossTokenizerTeacher(teacher, buckets, method, teacher_valid=VALID_VOCAB)
    loss, grads, metrics = loss_and_grads(make_loss_fn(student, cross, loss_cfg, VALID_VOCAB),
                                          student_params, teacher_params, batch)
    reference = written_out(student, teacher, teacher_params, method, batch, buckets)
    want_loss, want_grads = fast_jit(jax.value_and_grad(reference))(student_params)
    np.testing.assert_allclose(loss, float(want_loss), rtol=1e-5)
    assert_trees_close(grads, want_grads)
    assert float(metrics["kd_sum"]) > 0


def test_the_teacher_receives_no_gradient(tiny_models):
    student, student_params, teacher, teacher_params = tiny_models
    batch = cross_batch(2)
    cross = CrossTokenizerTeacher(teacher, partial_buckets(), teacher_valid=VALID_VOCAB)
    loss_fn = make_loss_fn(student, cross, LOSS, VALID_VOCAB)
    grads = fast_jit(jax.grad(lambda t: loss_fn(student_params, t, batch, 10.0)[0]))(
        teacher_params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_packed_rows_feed_the_cross_tokenizer_step(tmp_path):
    """From packed byte-level rows to the step: `teacher_fields` writes the teacher's rows (a
    BPE of its own) beside the batch, and the jitted loss reads them."""
    from kd_jax.align.rows import teacher_fields
    from kd_jax.align.vocabulary import buckets, map_vocabularies
    from kd_jax.config import ModelConfig
    from kd_jax.data.packing import pack
    from kd_jax.data.tokenizers import ByteTokenizer
    from kd_jax.models.pure import init_model
    from tests.align.test_positions import bpe
    from tests.align.test_rows import DOCS

    student_tok, teacher_tok = ByteTokenizer(), bpe(tmp_path / "teacher.json")
    student, student_params = init_model(ModelConfig(
        vocab_size=256, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64,
        max_seq_len=64, seed=1))
    teacher, teacher_params = init_model(ModelConfig(
        vocab_size=448, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64,
        max_seq_len=64, seed=2))
    data = pack(DOCS, student_tok, 32)
    rows = np.arange(4)
    batch = data.take(rows)
    vocabulary = map_vocabularies(teacher_tok.token_bytes(), student_tok.ids_by_bytes(), 256)
    cross = CrossTokenizerTeacher(
        teacher, Buckets.of(*buckets(vocabulary, teacher_tok.token_bytes(),
                                     student_tok.token_bytes()), 448, 256),
        teacher_valid=teacher_tok.vocab_size,
        feed=teacher_fields(data, student_tok, teacher_tok, 32))
    batch.update(cross.host_fields(rows, batch))
    assert batch["teacher_tokens"].shape == (4, 32) and batch["teacher_index"].shape == (4, 32)
    aligned = (batch["teacher_index"] >= 0) & (batch["loss_mask"] > 0)
    assert 0.2 < aligned.sum() / batch["loss_mask"].sum() < 1.0  # merged tokens leave some out
    loss_fn = jax.jit(make_loss_fn(student, cross, LOSS, 256))
    loss, metrics = loss_fn(student_params, teacher_params, batch,
                            float(batch["loss_mask"].sum()))
    assert np.isfinite(float(loss)) and float(metrics["kd_sum"]) > 0


@pytest.fixture(scope="module")
def byte_student_and_bpe_teacher(tmp_path_factory):
    """A byte-level student, a teacher with a BPE of its own, packed rows and their teacher
    rows with the back-off fields."""
    from kd_jax.align.rows import teacher_fields
    from kd_jax.config import ModelConfig
    from kd_jax.data.packing import pack
    from kd_jax.data.tokenizers import ByteTokenizer
    from kd_jax.models.pure import init_model
    from tests.align.test_positions import bpe
    from tests.align.test_rows import DOCS

    student_tok = ByteTokenizer()
    teacher_tok = bpe(tmp_path_factory.mktemp("bytes") / "teacher.json")
    student, student_params = init_model(ModelConfig(
        vocab_size=256, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64,
        max_seq_len=64, seed=1))
    teacher, teacher_params = init_model(ModelConfig(
        vocab_size=448, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64,
        max_seq_len=64, seed=2))
    data = pack(DOCS, student_tok, 32)
    rows = np.arange(4)
    batch = data.take(rows)
    batch.update(teacher_fields(data, student_tok, teacher_tok, 32, backoff=True)(rows, batch))
    return (student_tok, teacher_tok, student, student_params, teacher, teacher_params,
            {key: np.asarray(value) for key, value in batch.items()})


@pytest.mark.parametrize("loss_cfg", [LOSS, CHUNKED], ids=["whole", "chunked"])
def test_the_bytes_loss_is_the_loss_written_out(byte_student_and_bpe_teacher, loss_cfg):
    """`loss.cross_vocab: bytes` in the step: the teacher run apart, its logits gathered at the
    position before each covering token and at the aligned one, `bytes_divergence_bt` where the
    student position has a covering token with a position before it, or is aligned (the start
    of a piece), hard labels everywhere."""
    from kd_jax.losses.cross_bytes import ByteTables, bytes_divergence_bt

    (student_tok, teacher_tok, student, student_params, teacher, teacher_params,
     batch) = byte_student_and_bpe_teacher
    tables = ByteTables.of(teacher_tok.token_bytes(), student_tok.token_bytes(), 448, 256)
    cross = CrossTokenizerTeacher(teacher, None, "bytes", teacher_valid=teacher_tok.vocab_size,
                                  byte_tables=tables)
    loss, grads, metrics = loss_and_grads(make_loss_fn(student, cross, loss_cfg, 256),
                                          student_params, teacher_params, batch)
    back, index = batch["teacher_back"], batch["teacher_index"]
    mask = batch["loss_mask"] > 0
    assert (mask & (back >= 0)).sum() > 1.5 * (mask & (index >= 0)).sum()  # inside tokens too

    teacher_logits = np.asarray(teacher.logits(teacher_params, {
        "tokens": batch["teacher_tokens"], "positions": batch["teacher_positions"],
        "segment_ids": batch["teacher_segment_ids"]}))

    def at(where):
        return np.take_along_axis(teacher_logits, np.maximum(where, 0)[..., None], axis=1)

    token = np.take_along_axis(batch["teacher_tokens"], np.maximum(back + 1, 0), axis=1)

    def reference(student_params):
        student_logits = student.logits(student_params, batch)
        kd = bytes_divergence_bt(
            LOSS.divergence, student_logits, at(back), at(index), token,
            batch["teacher_inside"], batch["teacher_lo"], batch["teacher_hi"],
            (back >= 0) | (index >= 0),
            tables, temperature=LOSS.temperature, teacher_valid=teacher_tok.vocab_size)
        kd = jnp.where(mask, kd, 0.0)
        ce = jnp.where(mask, cross_entropy_bt(student_logits, batch["labels"]), 0.0)
        return (LOSS.kd_weight * kd.sum() + LOSS.ce_weight * ce.sum()) / mask.sum()

    want_loss, want_grads = fast_jit(jax.value_and_grad(reference))(student_params)
    np.testing.assert_allclose(loss, float(want_loss), rtol=1e-5)
    assert_trees_close(grads, want_grads)
    assert float(metrics["kd_sum"]) > 0


# --------------------------------------------------------------------------------- start-up

def word_level(path, texts, vocab_size=200):
    """A byte-level word tokenizer: a WordLevel model over GPT-2's pre-tokens, holding the most
    common pre-tokens of `texts` that are longer than one byte, and "[UNK]" for every other (it
    spells "[UNK]"). No token of one byte: next to nothing in common with the byte tokenizer."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from kd_jax.data.tokenizers import load_tokenizer

    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    counts = Counter(piece for text in texts for piece, _ in pre_tokenizer.pre_tokenize_str(text)
                     if len(piece) > 1)  # a piece's characters are its bytes
    vocab = {"[UNK]": 0, **{piece: n + 1 for n, (piece, _) in
                            enumerate(counts.most_common(vocab_size - 1))}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(path))
    return load_tokenizer(str(path))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from kd_jax.data.tokenizers import ByteTokenizer
    from tests.align.test_positions import bpe
    from tests.align.test_rows import DOCS

    folder = tmp_path_factory.mktemp("cross_start_up")
    return {"byte": ByteTokenizer(), "merged": bpe(folder / "merged.json"),
            "split": bpe(folder / "split.json", split_digits=True),
            "words": word_level(folder / "words.json", [doc.text for doc in DOCS])}


def start_up(teacher_tok, student_tok, method="mapped"):
    """`cross_tokenizer_teacher` on the alignment tests' documents, packed in rows of 32 for
    `student_tok`, with a tiny teacher of `teacher_tok` whose head has padding rows; T = 2."""
    from kd_jax.config import Config, DataConfig, LossConfig, ModelConfig
    from kd_jax.data.packing import pack
    from kd_jax.models.pure import init_model
    from kd_jax.teacher.cross import cross_tokenizer_teacher
    from kd_jax.teacher.loading import LoadedTeacher
    from tests.align.test_rows import DOCS

    def width(tokenizer):
        return -(-(tokenizer.vocab_size + 1) // 64) * 64

    cfg = Config(model=ModelConfig(vocab_size=width(student_tok)),
                 data=DataConfig(seq_len=32),
                 loss=LossConfig(temperature=2.0, cross_vocab=method))
    teacher_cfg = ModelConfig(vocab_size=width(teacher_tok), d_model=32, n_layers=1, n_heads=2,
                              n_kv_heads=2, d_ff=64, max_seq_len=128, seed=2)
    model, params = init_model(teacher_cfg)
    loaded = LoadedTeacher(model, params, teacher_cfg, "teacher", None, tokenizer=teacher_tok)
    data = pack(DOCS, student_tok, 32)
    return cross_tokenizer_teacher(cfg, student_tok, data, loaded, None), loaded, data


def test_a_pair_with_nothing_in_common_is_refused_for_mapped_only(tokenizers):
    from kd_jax.config import ConfigError

    byte, words = tokenizers["byte"], tokenizers["words"]
    with pytest.raises(ConfigError) as refused:
        start_up(byte, words)
    message = str(refused.value)
    assert message.startswith("the teacher's tokenizer (the byte tokenizer) and the student's "
                              f"(tokenizer {words.path}) have almost nothing in common: in the "
                              "first ")
    assert "0.0% of the teacher's tokens and 0.0% of the student's spell a token of the " \
           "other, below 10% on both sides" in message and "\n" not in message
    for method in ("uld", "hybrid"):  # these need no shared tokens
        cross, _, _ = start_up(byte, words, method)
        assert "0.0% of the teacher's tokens and 0.0% of the student's" in cross.note


@pytest.mark.parametrize("teacher, student", [("byte", "merged"), ("merged", "byte"),
                                              ("merged", "split"), ("split", "merged")])
def test_the_tests_pairs_are_not_refused(tokenizers, teacher, student):
    cross, _, _ = start_up(tokenizers[teacher], tokenizers[student])
    assert cross.method == "mapped" and "aligned positions the teacher puts" in cross.note
    assert "\n" not in cross.note


def test_the_vocabulary_map_is_made_once_per_tokenizer_pair(tokenizers, tmp_path, monkeypatch):
    """vocabulary_of keeps its tables in the user's cache directory by the pair's fingerprints:
    the second start reads them (making them would fail here) and gets the same map; the pair
    the other way round, or a damaged file, is made again."""
    from kd_jax.teacher import cross

    monkeypatch.setenv("KD_JAX_CACHE", str(tmp_path))
    teacher, student = tokenizers["split"], tokenizers["merged"]
    made_map, made_buckets = cross.vocabulary_of(student, teacher, 512, 512)
    files = sorted((tmp_path / "vocabulary_maps").iterdir())
    assert len(files) == 1

    def fail(*args):
        raise AssertionError("made again")

    monkeypatch.setattr(cross, "map_vocabularies", fail)
    read_map, read_buckets = cross.vocabulary_of(student, teacher, 512, 512)
    np.testing.assert_array_equal(read_map.student_id, made_map.student_id)
    np.testing.assert_array_equal(read_map.exact, made_map.exact)
    for name in ("teacher_w", "student_v", "matched"):
        np.testing.assert_array_equal(getattr(read_buckets, name), getattr(made_buckets, name),
                                      err_msg=name)
    assert (read_buckets.count, read_buckets.drops) == (made_buckets.count, made_buckets.drops)
    with pytest.raises(AssertionError, match="made again"):  # another pair: not in the cache
        cross.vocabulary_of(teacher, student, 512, 512)
    files[0].write_bytes(files[0].read_bytes()[:100])
    with pytest.raises(AssertionError, match="made again"):  # a damaged file is not read
        cross.vocabulary_of(student, teacher, 512, 512)


def reference_masses(loaded, student_tok, fields, batch, temperature):
    """float64 from the teacher's float32 logits over its rows: the probability at the aligned,
    trained positions on tokens that map to nothing, and on tokens mapped by prefix only, each
    summed, and the number of positions."""
    from kd_jax.align.vocabulary import map_vocabularies

    teacher_tok = loaded.tokenizer
    vocabulary = map_vocabularies(teacher_tok.token_bytes(), student_tok.ids_by_bytes(),
                                  student_tok.vocab_size)
    logits = np.asarray(loaded.model.logits(loaded.params, {
        "tokens": fields["teacher_tokens"], "positions": fields["teacher_positions"],
        "segment_ids": fields["teacher_segment_ids"]}), np.float64)[..., :teacher_tok.vocab_size]
    index = fields["teacher_index"]
    aligned = (index >= 0) & (batch["loss_mask"] > 0)
    gathered = np.take_along_axis(logits, np.maximum(index, 0)[..., None], axis=1)[aligned]
    scaled = gathered / temperature
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return (probs[:, ~vocabulary.mapped].sum(), probs[:, vocabulary.mapped & ~vocabulary.exact]
            .sum(), int(aligned.sum()))


@pytest.mark.parametrize("teacher, student", [("merged", "byte"), ("merged", "split")])
def test_the_start_up_line_reports_the_teacher_s_mass_off_the_exact_map(tokenizers, teacher,
                                                                       student):
    from kd_jax.teacher.cross import PROBE_ROWS

    cross, loaded, data = start_up(tokenizers[teacher], tokenizers[student])
    probe = np.arange(min(PROBE_ROWS, data.n_rows))
    batch = data.take(probe)
    no_bucket, by_prefix, positions = reference_masses(
        loaded, tokenizers[student], cross.host_fields(probe, batch), batch, 2.0)
    assert by_prefix > 0 and no_bucket > 0  # merged numerals by prefix; its <s> in no bucket
    assert (f"over their {positions:,} aligned positions the teacher puts "
            f"{no_bucket / positions:.2%} of its probability (at T 2) on tokens of no bucket "
            f"and {by_prefix / positions:.2%} on tokens mapped by prefix only") in cross.note


@pytest.mark.parametrize("chunk_positions", [16, 3])
def test_probe_mass_is_the_float64_mass_on_each_mask(tiny_models, monkeypatch, chunk_positions):
    """Random teacher rows and alignment (a third unaligned, padding untrained), two random
    masks over the padded head; logits a chunk of 3 positions at a time as well as whole."""
    from kd_jax.teacher import cross

    _, _, teacher, teacher_params = tiny_models
    monkeypatch.setattr(cross, "CHUNK_BYTES", 4 * 64 * chunk_positions)
    batch = cross_batch(3)
    rows = {"tokens": batch["teacher_tokens"], "positions": batch["teacher_positions"],
            "segment_ids": batch["teacher_segment_ids"]}
    weight = (batch["teacher_index"] >= 0) & (batch["loss_mask"] > 0)
    masks = np.random.default_rng(4).random((2, 64)) < 0.4
    got = cross.probe_mass(teacher, teacher_params, rows, batch["teacher_index"], weight, masks,
                           1.5, VALID_VOCAB)
    logits = np.asarray(teacher.logits(teacher_params, rows), np.float64)[..., :VALID_VOCAB]
    gathered = np.take_along_axis(logits, np.maximum(batch["teacher_index"], 0)[..., None],
                                  axis=1)[weight] / 1.5
    probs = np.exp(gathered - gathered.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = [probs[:, mask[:VALID_VOCAB]].sum() for mask in masks]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_a_teacher_of_another_tokenizer_is_distilled_online_through_the_cli(teacher_run,
                                                                             tmp_path, capsys):
    """The session's byte-level teacher into a student with a byte-level BPE of its own: the
    run starts (saying how the vocabularies map), trains with a finite loss, and evaluates the
    student alone."""
    import json

    from kd_jax import cli
    from tests.data.test_tokenizers import write_byte_level_bpe
    from tests.helpers import distill_config

    root, corpus = teacher_run
    lines = [line for line in corpus.read_text().splitlines() if line.strip()]
    tokenizer = write_byte_level_bpe(tmp_path / "tokenizer.json", vocab_size=300, corpus=lines)
    config = distill_config(tmp_path / "distill.yaml", corpus, root / "teacher",
                            tmp_path / "run")
    capsys.readouterr()
    # As tests/align/test_prepared.py's run from rows packed in memory, 2 steps: the same
    # programs, read from the suite's compilation cache by whichever runs second.
    code = cli.main(["distill", str(config), f"data.tokenizer={tokenizer}",
                     "model.vocab_size=320", "train.steps=2", "train.checkpoint_every=2"])
    output = "".join(capsys.readouterr())
    assert code == 0, output
    assert "teacher tokenizer the byte tokenizer, not the student's: rows of 64 teacher " \
           "tokens, loss.cross_vocab mapped" in output
    assert "of the teacher's 256 tokens spell a student token" in output
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    evaluated = [r["eval"] for r in records if "eval" in r]
    # The teacher scored on its own tokens, the student compared where positions align.
    assert evaluated and set(evaluated[-1]) == {"student", "teacher", "student~teacher"}
    teacher, versus = evaluated[-1]["teacher"], evaluated[-1]["student~teacher"]
    assert 0 < teacher["bits_per_byte"] < 8 and 0 <= versus["agreement"] <= 1
    # A byte-level teacher has read every text a BPE student position has.
    assert versus["tokens"] == evaluated[-1]["student"]["tokens"] > 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["teacher"]["bits_per_byte"] == teacher["bits_per_byte"]
    assert report["student"]["agreement"] == versus["agreement"]


@pytest.mark.parametrize("teacher_template, messages, refused", [
    ("none", "messages", False), ("same", "messages", False), ("other", "messages", True),
    ("other", "", False)])
def test_conversations_are_refused_where_the_teacher_has_another_chat_template(
        tmp_path, teacher_template, messages, refused):
    """Conversations are rendered in the student's template; a teacher whose own template is
    another is refused in one line (a base teacher, without one, reads the text as it is)."""
    from kd_jax.config import Config, ConfigError
    from kd_jax.data.tokenizers import load_tokenizer
    from kd_jax.teacher.cross import check_chat_templates
    from tests.data.test_chat import CHATML, write_checkpoint

    template = {"none": None, "same": CHATML,
                "other": CHATML.replace("'<|im_start|>' + message['role']", "'### ' + "
                                        "message['role']")}[teacher_template]
    assert template != CHATML or teacher_template == "same"
    student = load_tokenizer(str(write_checkpoint(tmp_path / "student") / "tokenizer.json"))
    teacher = load_tokenizer(str(write_checkpoint(tmp_path / "teacher",
                                                  chat_template=template) / "tokenizer.json"))
    cfg = Config()
    cfg.data.messages_column = messages
    if not refused:
        check_chat_templates(cfg, student, teacher)
        return
    with pytest.raises(ConfigError) as err:
        check_chat_templates(cfg, student, teacher)
    assert "the teacher's is another" in str(err.value) and "\n" not in str(err.value)


def test_student_rows_longer_than_the_teachers_context_are_taken(teacher_run, tmp_path):
    """A teacher of another tokenizer reads rows of its own: the student's data.seq_len may pass
    the teacher's max_seq_len, as long as data.teacher_seq_len does not."""
    from kd_jax import config as config_lib
    from kd_jax.config import ConfigError
    from kd_jax.train.builder import build
    from tests.data.test_tokenizers import write_byte_level_bpe
    from tests.helpers import distill_config

    root, corpus = teacher_run
    lines = [line for line in corpus.read_text().splitlines() if line.strip()]
    tokenizer = write_byte_level_bpe(tmp_path / "tokenizer.json", vocab_size=300, corpus=lines)
    config = distill_config(tmp_path / "distill.yaml", corpus, root / "teacher",
                            tmp_path / "run")
    common = [f"data.tokenizer={tokenizer}", "model.vocab_size=320", "data.seq_len=96",
              "model.max_seq_len=96"]  # the teacher's max_seq_len is 64
    built = build(config_lib.load(config, [*common, "data.teacher_seq_len=64"]), "distill")
    assert isinstance(built.teacher, CrossTokenizerTeacher)
    assert built.host_batch(0)["teacher_tokens"].shape == (8, 64)
    with pytest.raises(ConfigError, match=r"data.teacher_seq_len \(128\) exceeds the teacher's "
                                          r"max_seq_len \(64\)"):
        build(config_lib.load(config, [*common, "data.teacher_seq_len=128"]), "distill")
