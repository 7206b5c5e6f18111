"""Hugging Face checkpoints in kd_jax against transformers: logits, load time, forward speed.

    python benchmarks/hf_models.py [--quick]

1. Parity: a tiny random checkpoint of each supported family, saved by transformers in both
   config.json layouts; the largest absolute difference of kd_jax's logits from transformers'
   (float32). The test suite asserts 1e-4 (tests/models/test_pretrained.py); this prints the
   measured figures.
2. A SmolLM-135M-shaped checkpoint (random weights: 30 layers, hidden 576, 9 heads, 3 key/value
   heads, MLP 1536, vocabulary 49,152, tied): seconds to load it (kd_jax `load_pretrained`
   against `AutoModelForCausalLM.from_pretrained`) and to run one forward pass of 4 x 256
   tokens (kd_jax jitted, after a compiling call, against PyTorch eager), float32 on both sides,
   the same thread count, medians of --repeats, alternating. The logits are checked equal first.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_jax.models import load_pretrained  # noqa: E402
from tests.hf_checkpoints import KINDS, hf_logits, hf_model, make_checkpoint  # noqa: E402

SMOLLM = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
              num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
              tie_word_embeddings=True, head_dim=64)


def parity(root: Path) -> None:
    ids = np.random.default_rng(0).integers(0, 96, (2, 14))
    print(f"{'family':20s} {'layout':6s} max |logits - transformers|")
    for kind in KINDS:
        for layout in ("v5", "v4"):
            path = make_checkpoint(root / f"{kind}_{layout}", kind, layout)
            diff = np.abs(np.asarray(load_pretrained(path)(ids)) - hf_logits(path, ids)).max()
            print(f"{kind:20s} {layout:6s} {diff:.2e}")


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def speed(root: Path, repeats: int, layers: int) -> None:
    import torch
    import transformers

    path = root / "smollm"
    # transformers' own initialization (normal, std 0.02): weights of a trained model's scale.
    hf_model("smollm", perturb=False, **{**SMOLLM, "num_hidden_layers": layers}
             ).save_pretrained(path)
    ids = np.random.default_rng(1).integers(0, SMOLLM["vocab_size"], (4, 256))
    load_ours = median_seconds(lambda: load_pretrained(path), repeats)
    load_torch = median_seconds(lambda: transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32), repeats)
    ours = load_pretrained(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = torch.as_tensor(ids)
    with torch.no_grad():
        expected = theirs(tokens).logits.numpy()
    difference = np.abs(np.asarray(ours(ids)) - expected).max()
    assert difference < 1e-4 * np.abs(expected).max(), difference

    def torch_forward():
        with torch.no_grad():
            theirs(tokens)

    forward_ours = median_seconds(lambda: ours(ids).block_until_ready(), repeats)
    forward_torch = median_seconds(torch_forward, repeats)
    print(f"\nSmolLM-135M-shaped, {layers} layers, float32, {torch.get_num_threads()} threads; "
          f"max |logits - transformers| {difference:.1e}")
    print(f"{'':28s} {'kd_jax s':>9s} {'torch s':>9s} {'torch / kd_jax':>15s}")
    print(f"{'load checkpoint':28s} {load_ours:9.3f} {load_torch:9.3f} "
          f"{load_torch / load_ours:15.2f}")
    print(f"{'forward, 4 x 256 tokens':28s} {forward_ours:9.3f} {forward_torch:9.3f} "
          f"{forward_torch / forward_ours:15.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 layers, 3 repeats")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        parity(Path(root))
        speed(Path(root), 3 if args.quick else args.repeats, 4 if args.quick else 30)


if __name__ == "__main__":
    main()
