"""API responses: one line of OpenAI chat-completions logprobs JSONL -> ids and targets.

Input is JSONL, one response a line, in the OpenAI chat-completions logprobs format, either

    {"prompt": "<text the model saw>", "logprobs": {"content": [...]}}
    {"prompt": "<text the model saw>", "response": <a whole chat.completion object>}

(the second reads `response["choices"][0]["logprobs"]["content"]`). Each content entry is one
generated token: `token`, `logprob`, `bytes` (null for some APIs: then the UTF-8 of `token`) and
`top_logprobs`, up to 20 entries of the same shape: the teacher's distribution at that position.

`prompt` is the text exactly as the model saw it, chat template and all, applied by the user:
it is tokenized as plain text with `tokenizer.encode`, with nothing added. The response is not
re-tokenized: its ids come from the bytes of the API's tokens (`Tokenizer.ids_by_bytes`), so the
student is trained on the teacher's own segmentation, which must therefore be one its tokenizer
can spell token by token.

Targets of response token j: the top_logprobs of content[j], deduplicated (two entries that map
to one id are merged by logsumexp), most probable first. A position whose top_logprobs is empty
or missing uses the generated token and its logprob as its one entry. tail = log(1 - sum p) in
float64, floored at log(`FULL_MASS_SLACK`): an API model's softmax never leaves exactly nothing
outside its top entries, and a sum that reaches 1 is the rounding of its logprobs (an empty tail
would make a reverse KL infinite wherever the student has mass there).

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

from kd_jax.cache.manifest import CacheError
from kd_jax.data.tokenizers import Tokenizer

# A tail mass below this is the rounding of the API's logprobs: the tail is taken as this much.
# It is below what a float16 log-probability near 0 resolves (its spacing at -0.01 is 7.6e-6).
FULL_MASS_SLACK = 1e-6

# A log-probability up to this much above 0 is rounding (stored as 0); more is a broken line.
_POSITIVE_SLACK = 1e-3


@dataclasses.dataclass
class Response:
    """One line, mapped to ids; targets [j] are the teacher's entries for response token j."""

    prompt_ids: np.ndarray  # int32 [P]
    response_ids: np.ndarray  # int32 [R]
    entry_ids: list[np.ndarray]  # R arrays of int32 [c_j], most probable first, unique
    entry_logprobs: list[np.ndarray]  # R arrays of float64 [c_j]
    tails: np.ndarray  # float64 [R]
    duplicates_merged: int


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


def parse(text: str, where: str, tokenizer: Tokenizer,
          ids_by_bytes: dict[bytes, int]) -> Response:
    try:
        record = json.loads(text)
    except ValueError as err:
        raise CacheError(f"{where} is not JSON ({err})") from None
    prompt, content = _content(record, where)
    response_ids = np.empty(len(content), dtype=np.int32)
    entry_ids, entry_logprobs = [], []
    tails = np.empty(len(content), dtype=np.float64)
    merged = 0
    for j, item in enumerate(content):
        here = f"{where}, response token {j}"
        spelled, logprob = _entry(item, here)
        if spelled not in ids_by_bytes:
            raise CacheError(f"{here}: generated token {spelled!r} is not a token of "
                             f"{tokenizer.description}")
        response_ids[j] = ids_by_bytes[spelled]
        top = item.get("top_logprobs") or []
        if not isinstance(top, list):
            raise CacheError(f"{here}: \"top_logprobs\" is not a list")
        # The teacher's mass per id, merged by logsumexp when two entries map to one id.
        by_id: dict[int, list[float]] = {}
        for entry in top:
            entry_bytes, entry_logprob = _entry(entry, f"{here}, top_logprobs entry")
            if entry_bytes not in ids_by_bytes:
                raise CacheError(f"{here}: top_logprobs entry {entry_bytes!r} is not a token "
                                 f"of {tokenizer.description}")
            by_id.setdefault(ids_by_bytes[entry_bytes], []).append(entry_logprob)
        if not top:  # no distribution given: the generated token's own probability is known
            by_id = {int(response_ids[j]): [logprob]}
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
    prompt_ids = np.asarray(tokenizer.encode(prompt), dtype=np.int32)
    return Response(prompt_ids=prompt_ids, response_ids=response_ids, entry_ids=entry_ids,
                    entry_logprobs=entry_logprobs, tails=tails, duplicates_merged=merged)


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
