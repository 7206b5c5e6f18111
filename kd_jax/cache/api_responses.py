"""API responses: one line of OpenAI chat-completions logprobs JSONL -> ids and targets.

Input is JSONL, one response a line, in the OpenAI chat-completions logprobs format, either

    {"prompt": "<text the model saw>", "logprobs": {"content": [...]}}
    {"prompt": "<text the model saw>", "response": <a whole chat.completion object>}

(the second reads `response["choices"][0]["logprobs"]["content"]`). Each content entry is one
generated token: `token`, `logprob`, `bytes` (null for some APIs: then the UTF-8 of `token`) and
`top_logprobs`, up to 20 entries of the same shape: the teacher's distribution at that position.

`prompt` is the text exactly as the model saw it, chat template and all, applied by the user:
it is tokenized as plain text with `tokenizer.encode`, with nothing added. The response is the
text its tokens' bytes spell, tokenized the same way, apart from the prompt, so that the
response's student tokens start where the prompt's end. The API's tokens need not be the
student's (a GPT-style API teacher for a SmolLM student): the two tokenizations of the response
are matched by the text each position has read (`kd_jax.align.positions`). The position that
predicts student token j has read the prompt and the response up to j's first byte; it is
aligned when an API position has read exactly that text, i.e. when some API token starts where
student token j starts (the response's first token always does). A student position inside an
API token (the API merged " 2024", the student reads " 2", "0", "2", "4") is unaligned.

Targets of student response token j, aligned with API token m: the top_logprobs of content[m]
(the generated token and its logprob when top_logprobs is empty or missing), each mapped to the
student token that spells its bytes, else to the longest student token its bytes start with
(`kd_jax.align.vocabulary.longest_prefix`, the `mapped` rule: the API's " 2024" is credited to
the student's " 2", the token its text would start with); entries mapped to one id are merged
by logsumexp, most probable first. An entry no student token starts (one that spells nothing)
is dropped: its mass stays outside the stored entries, in the tail. tail = log(1 - sum p) in
float64, floored at log(`FULL_MASS_SLACK`): an API model's softmax never leaves exactly nothing
outside its top entries, and a sum that reaches 1 is the rounding of its logprobs (an empty tail
would make a reverse KL infinite wherever the student has mass there). An unaligned position has
no target: no entries and tail 0 (all the mass outside them), which a top-k loss compares as one
bucket with one bucket, a divergence of 0 (`kd_jax.losses.soft_targets.topk_divergence_bt`);
its hard label is still trained on.

When the API's tokens are the student's own (every generated token and entry spells one student
token, and tokenizing the response gives those tokens back: `Response.own_tokens`), every
position is aligned with its own API token and every entry maps to its own id: the targets are
the API's, unchanged. The response's bytes must be UTF-8 text that the student's tokens spell
back to the byte (one SentencePiece dummy-prefix space aside); a tokenizer whose normalizer
changes the text is refused.

Errors name the line (1-based, as an editor counts) and the response token (0-based: its index in
the content list), and whether the generated token or a top_logprobs entry is at fault.
numpy and the standard library only.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kd_jax.align.positions import align, byte_ends
from kd_jax.align.vocabulary import longest_prefix
from kd_jax.cache.manifest import CacheError
from kd_jax.config import ConfigError
from kd_jax.data.tokenizers import Tokenizer

# A tail mass below this is the rounding of the API's logprobs: the tail is taken as this much.
# It is below what a float16 log-probability near 0 resolves (its spacing at -0.01 is 7.6e-6).
FULL_MASS_SLACK = 1e-6

# The tail of a position with no target: all of its (absent) teacher's mass outside the entries.
NO_TARGET_TAIL = 0.0

# A log-probability up to this much above 0 is rounding (stored as 0); more is a broken line.
_POSITIVE_SLACK = 1e-3


@dataclasses.dataclass(frozen=True)
class StudentVocabulary:
    """The student's tokenizer and what its ids spell, read once a file (an HF tokenizer's
    `token_bytes` is a pass over its vocabulary)."""

    tokenizer: Tokenizer
    token_bytes: list[bytes]
    ids_by_bytes: dict[bytes, int]
    longest: int  # the bytes of the longest token: where a prefix search starts

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> StudentVocabulary:
        ids_by_bytes = tokenizer.ids_by_bytes()
        return cls(tokenizer, tokenizer.token_bytes(), ids_by_bytes,
                   max((len(spelled) for spelled in ids_by_bytes), default=0))

    def student_id(self, spelled: bytes) -> int:
        """The student token that spells `spelled`, else the longest one it starts with; -1
        where none does."""
        return longest_prefix(spelled, self.ids_by_bytes, self.longest)


@dataclasses.dataclass
class Response:
    """One line in the student's tokens; targets [j] are the teacher's entries for response
    token j, none where that token's position is not aligned with an API position."""

    prompt_ids: np.ndarray  # int32 [P]
    response_ids: np.ndarray  # int32 [R]
    entry_ids: list[np.ndarray]  # R arrays of int32 [c_j], most probable first, unique
    entry_logprobs: list[np.ndarray]  # R arrays of float64 [c_j]
    tails: np.ndarray  # float64 [R]
    aligned: np.ndarray  # bool [R]: the position predicting token j is aligned
    duplicates_merged: int
    own_tokens: bool  # the API's tokens are the student's own (the module docstring)


@dataclasses.dataclass
class _ApiToken:
    """One content entry: the generated token's bytes and logprob, and its top_logprobs."""

    spelled: bytes
    logprob: float
    top: list[tuple[bytes, float]]


def read_lines(path: Path, digest: Any) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of every non-blank line; the raw bytes go into `digest`."""
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            digest.update(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise CacheError(f"{path} line {number} is not UTF-8 ({err.reason} at byte "
                                 f"{err.start})") from None
            if text.strip():
                yield number, text


def _content(record: Any, where: str) -> tuple[str, list]:
    """(prompt, logprobs content list) of a parsed line, in either accepted layout."""
    if not isinstance(record, dict):
        raise CacheError(f"{where} is not a JSON object")
    prompt = record.get("prompt")
    if not isinstance(prompt, str):
        raise CacheError(f"{where} has no \"prompt\" string (the text the model saw, chat "
                         "template applied)")
    if "logprobs" in record:
        logprobs, path = record["logprobs"], "logprobs"
    elif "response" in record:
        try:
            logprobs = record["response"]["choices"][0]["logprobs"]
        except (KeyError, IndexError, TypeError):
            raise CacheError(f"{where}: \"response\" has no choices[0].logprobs (a "
                             "chat.completion object)") from None
        path = "response.choices[0].logprobs"
    else:
        raise CacheError(f"{where} has neither \"logprobs\" nor \"response\"")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list):
        raise CacheError(f"{where}: {path}.content is not a list (request logprobs=true and "
                         "top_logprobs)")
    return prompt, content


def _entry(entry: Any, where: str) -> tuple[bytes, float]:
    """(bytes, logprob) of a content or top_logprobs entry."""
    if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
        raise CacheError(f"{where} has no \"token\" string")
    raw = entry.get("bytes")
    if raw is None:
        spelled = entry["token"].encode("utf-8")
    elif isinstance(raw, list) and all(isinstance(b, int) and 0 <= b < 256 for b in raw):
        spelled = bytes(raw)
    else:
        raise CacheError(f"{where}: \"bytes\" must be a list of ints in [0, 256) or null")
    logprob = entry.get("logprob")
    if isinstance(logprob, bool) or not isinstance(logprob, (int, float)) \
            or math.isnan(logprob) or logprob > _POSITIVE_SLACK:
        raise CacheError(f"{where}: \"logprob\" must be a number <= 0, got {logprob!r}")
    return spelled, min(float(logprob), 0.0)


def _api_token(item: Any, where: str) -> _ApiToken:
    spelled, logprob = _entry(item, where)
    top = item.get("top_logprobs") or []
    if not isinstance(top, list):
        raise CacheError(f"{where}: \"top_logprobs\" is not a list")
    return _ApiToken(spelled, logprob,
                     [_entry(entry, f"{where}, top_logprobs entry") for entry in top])


def _read_from(ends: np.ndarray) -> np.ndarray:
    """Where each token starts, from where each ends: what the position predicting it has read
    of the response."""
    starts = np.zeros(len(ends), dtype=np.int64)
    starts[1:] = ends[:-1]
    return starts


def _student_tokens(spelled: bytes, where: str, vocabulary: StudentVocabulary
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(the student's ids of the response the API's tokens spell, where each starts), or
    CacheError where that is not text the student's tokenizer spells back."""
    try:
        text = spelled.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CacheError(f"{where}: the response's tokens do not spell UTF-8 text ({err.reason} "
                         f"at byte {err.start}), which the student's tokenizer cannot "
                         "tokenize") from None
    ids = np.asarray(vocabulary.tokenizer.encode(text), dtype=np.int32)
    try:
        ends = byte_ends(ids, vocabulary.token_bytes, spelled, "the student's tokenizer")
    except ConfigError as err:
        raise CacheError(f"{where}: {err}") from None
    return ids, _read_from(ends)


def parse(text: str, where: str, vocabulary: StudentVocabulary) -> Response:
    try:
        record = json.loads(text)
    except ValueError as err:
        raise CacheError(f"{where} is not JSON ({err})") from None
    prompt, content = _content(record, where)
    tokens = [_api_token(item, f"{where}, response token {j}") for j, item in enumerate(content)]
    response_ids, student_starts = _student_tokens(
        b"".join(token.spelled for token in tokens), where, vocabulary)
    api_starts = _read_from(np.cumsum([len(token.spelled) for token in tokens], dtype=np.int64))
    api_position = align(student_starts, api_starts).teacher_position
    ids_by_bytes = vocabulary.ids_by_bytes
    own_tokens = (all(token.spelled in ids_by_bytes
                      and all(spelled in ids_by_bytes for spelled, _ in token.top)
                      for token in tokens)
                  and np.array_equal(response_ids,
                                     [ids_by_bytes[token.spelled] for token in tokens]))

    entry_ids, entry_logprobs = [], []
    tails = np.full(len(response_ids), NO_TARGET_TAIL, dtype=np.float64)
    merged = 0
    for j, api_index in enumerate(api_position):
        if api_index < 0:  # inside an API token: no target
            entry_ids.append(np.zeros(0, dtype=np.int32))
            entry_logprobs.append(np.zeros(0, dtype=np.float64))
            continue
        token = tokens[api_index]
        # No distribution given: the generated token's own probability is known.
        entries = token.top or [(token.spelled, token.logprob)]
        # The teacher's mass per student id, merged by logsumexp when entries map to one id.
        by_id: dict[int, list[float]] = {}
        for spelled, logprob in entries:
            student_id = vocabulary.student_id(spelled)
            if student_id >= 0:  # else its mass stays in the tail
                by_id.setdefault(student_id, []).append(logprob)
        merged += sum(len(values) - 1 for values in by_id.values())
        ids = np.fromiter(by_id, dtype=np.int32, count=len(by_id))
        logprobs = np.array([np.logaddexp.reduce(np.array(values, dtype=np.float64))
                             for values in by_id.values()], dtype=np.float64)
        logprobs = np.minimum(logprobs, 0.0)  # a merge of rounded values can pass 0
        order = np.lexsort((ids, -logprobs))  # most probable first, ties by id
        entry_ids.append(ids[order])
        entry_logprobs.append(logprobs[order])
        rest = 1.0 - float(np.sum(np.exp(logprobs)))
        tails[j] = math.log(max(rest, FULL_MASS_SLACK))
    prompt_ids = np.asarray(vocabulary.tokenizer.encode(prompt), dtype=np.int32)
    return Response(prompt_ids=prompt_ids, response_ids=response_ids, entry_ids=entry_ids,
                    entry_logprobs=entry_logprobs, tails=tails, aligned=api_position >= 0,
                    duplicates_merged=merged, own_tokens=bool(own_tokens))


def fit(response: Response, seq_len: int, where: str) -> tuple[np.ndarray, int]:
    """(the kept sequence, the pair whose label is response token 0; -1 if it has none).

    A sequence longer than seq_len + 1 tokens loses the start of its prompt, keeping at least
    one prompt token so that every response token stays a label.
    """
    n_prompt, n_response = len(response.prompt_ids), len(response.response_ids)
    n_labels = n_response if n_prompt else n_response - 1  # with no prompt, token 0 is input
    if n_labels < 1:
        raise CacheError(f"{where} has {n_prompt} prompt and {n_response} response tokens: no "
                         "response token can be a label")
    if n_labels > seq_len:
        raise CacheError(f"{where}: the response has {n_response} tokens, but a row of seq_len "
                         f"{seq_len} holds at most {seq_len} response labels; raise seq_len or "
                         "drop the line")
    drop = max(0, n_prompt + n_response - 1 - seq_len)  # < n_prompt by the check above
    sequence = np.concatenate([response.prompt_ids[drop:], response.response_ids])
    return sequence, n_prompt - drop - 1
