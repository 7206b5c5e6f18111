"""The multi-device half of tests/models/test_pretrained_sharded.py, run there in a subprocess.

It needs 8 host-platform CPU devices, and the XLA flag that makes them must be set before JAX
starts and must not reach the other tests, so it runs as its own process:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/models/sharded_load_worker.py CHECKPOINT OUT [LAYOUT]

It loads CHECKPOINT (written by `write_checkpoint`, which the test imports from here) with
`kd_jax.models.pretrained.load_params` into the shardings of LAYOUT (default fsdp) on a mesh of
fsdp = 8, and writes OUT/report.json: the resident memory before loading, the peak after it,
and, for a few parameters, where each device's shard lies and whether it equals that slice of
the tensor written. The checks run after the peak is read, so their copies are not counted.
"""

import json
import sys
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[2]))  # the repository root: `tests` and `kd_jax`

# A Llama of 315 MB in float32: big enough that a copy of the model per device (8 x 315 MB)
# stands far above the bound the test asserts, small enough to write and load in seconds.
VOCAB, D_MODEL, N_LAYERS, N_HEADS, N_KV_HEADS, D_FF = 16384, 1024, 4, 16, 4, 2816
HEAD_DIM = D_MODEL // N_HEADS
HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": D_MODEL,
    "intermediate_size": D_FF, "num_hidden_layers": N_LAYERS, "num_attention_heads": N_HEADS,
    "num_key_value_heads": N_KV_HEADS, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False,
    "hidden_act": "silu", "torch_dtype": "float32",
}
FSDP = 8
SHARD_FILES = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def layer_shapes(layer: int) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> shape, for one decoder layer (torch Linear: [out, in])."""
    prefix = f"model.layers.{layer}."
    return {
        prefix + "input_layernorm.weight": (D_MODEL,),
        prefix + "post_attention_layernorm.weight": (D_MODEL,),
        prefix + "self_attn.q_proj.weight": (N_HEADS * HEAD_DIM, D_MODEL),
        prefix + "self_attn.k_proj.weight": (N_KV_HEADS * HEAD_DIM, D_MODEL),
        prefix + "self_attn.v_proj.weight": (N_KV_HEADS * HEAD_DIM, D_MODEL),
        prefix + "self_attn.o_proj.weight": (D_MODEL, N_HEADS * HEAD_DIM),
        prefix + "mlp.gate_proj.weight": (D_FF, D_MODEL),
        prefix + "mlp.up_proj.weight": (D_FF, D_MODEL),
        prefix + "mlp.down_proj.weight": (D_MODEL, D_FF),
    }


def shard_shapes() -> list[dict[str, tuple[int, ...]]]:
    """The tensors of each shard file, split as transformers splits a checkpoint: the embedding
    and the first half of the layers, then the rest, the final norm and the output head."""
    half = N_LAYERS // 2
    first = {"model.embed_tokens.weight": (VOCAB, D_MODEL)}
    second: dict[str, tuple[int, ...]] = {}
    for layer in range(N_LAYERS):
        (first if layer < half else second).update(layer_shapes(layer))
    second.update({"model.norm.weight": (D_MODEL,), "lm_head.weight": (VOCAB, D_MODEL)})
    return [first, second]


def tensor_value(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 values of tensor `name`, seeded by its name: the checks rebuild any one."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return rng.standard_normal(shape, dtype=np.float32)


def model_bytes() -> int:
    return sum(4 * int(np.prod(shape)) for shard in shard_shapes() for shape in shard.values())


def largest_tensor_bytes() -> int:
    return max(4 * int(np.prod(shape)) for shard in shard_shapes() for shape in shard.values())


def write_checkpoint(path: Path) -> None:
    """config.json, two safetensors shards and their index; one shard in memory at a time."""
    from kd_jax.models.pretrained import INDEX
    from kd_jax.models.safetensors_files import write_file

    weight_map = {}
    for file_name, shapes in zip(SHARD_FILES, shard_shapes(), strict=True):
        write_file(path / file_name, {name: tensor_value(name, shape)
                                      for name, shape in shapes.items()})
        weight_map.update(dict.fromkeys(shapes, file_name))
    (path / INDEX).write_text(json.dumps(
        {"metadata": {"total_size": model_bytes()}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(HF_CONFIG, indent=2))


def expected_param(path: str) -> np.ndarray:
    """A parameter as kd_jax lays it out, from the tensors written (layers stacked first)."""
    if path == "embedding":
        return tensor_value("model.embed_tokens.weight", (VOCAB, D_MODEL))
    tensor, layout = {  # Hugging Face tensor -> its layer's slice of the parameter
        "layers/wq": ("self_attn.q_proj.weight",  # [n * hd, d] -> [d, n, hd]
                      lambda q: q.T.reshape(D_MODEL, N_HEADS, HEAD_DIM)),
        "layers/wo": ("self_attn.o_proj.weight",  # [d, n * hd] -> [n, hd, d]
                      lambda o: o.T.reshape(N_HEADS, HEAD_DIM, D_MODEL)),
        "layers/w_down": ("mlp.down_proj.weight", lambda down: down.T),  # [d, ff] -> [ff, d]
    }[path]
    names = [f"model.layers.{layer}.{tensor}" for layer in range(N_LAYERS)]
    return np.stack([layout(tensor_value(name, layer_shapes(layer)[name]))
                     for layer, name in enumerate(names)])


def status_kb(field: str) -> int:
    """A memory figure of /proc/self/status: VmRSS (held now) or VmHWM (the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Start VmHWM again from the current resident size (Linux 4.0+). getrusage's ru_maxrss
    cannot be reset, and it keeps the peak of the process this one was forked from: a test
    run from a large pytest process would read pytest's size."""
    Path("/proc/self/clear_refs").write_text("5")


def main(checkpoint_dir: Path, out_dir: Path, layout: str) -> None:
    import jax

    from kd_jax.config import MeshConfig, ModelConfig
    from kd_jax.models.pretrained import load_params, open_checkpoint
    from kd_jax.models.pure import abstract_model, logical_axes
    from kd_jax.parallel import mesh as mesh_lib

    assert jax.device_count() == FSDP, jax.devices()
    ckpt = open_checkpoint(checkpoint_dir)
    cfg = ckpt.model_config(ModelConfig(dtype="float32", param_dtype="float32"))
    model, abstract = abstract_model(cfg)
    mesh = mesh_lib.make_mesh(MeshConfig(data=1, fsdp=FSDP))
    shardings = mesh_lib.param_shardings(
        logical_axes(model.template), mesh_lib.rules_for(layout), mesh, abstract)

    reset_peak()
    baseline_kb = status_kb("VmRSS")
    params = load_params(ckpt, cfg, abstract, shardings)
    jax.block_until_ready(params)
    peak_kb = status_kb("VmHWM")
    loaded_kb = status_kb("VmRSS")

    flat = {"/".join(str(key.key) for key in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    per_device_bytes = {str(device.id): 0 for device in jax.devices()}
    for leaf in flat.values():
        for shard in leaf.addressable_shards:
            per_device_bytes[str(shard.device.id)] += shard.data.nbytes
    checked = {}
    for path in ("embedding", "layers/wq", "layers/wo", "layers/w_down"):
        expected = expected_param(path)
        checked[path] = {
            "shape": list(flat[path].shape),
            "spec": [axis for axis in flat[path].sharding.spec],
            "shards": [{"device": shard.device.id,
                        "shape": list(shard.data.shape),
                        "index": [list(s.indices(size)[:2])
                                  for s, size in zip(shard.index, flat[path].shape)],
                        "equal": bool(np.array_equal(np.asarray(shard.data),
                                                     expected[shard.index]))}
                       for shard in flat[path].addressable_shards]}
        del expected
    report = {"devices": jax.device_count(), "files": len(ckpt.headers),
              "baseline_kb": baseline_kb, "peak_kb": peak_kb, "loaded_kb": loaded_kb,
              "model_bytes": model_bytes(), "largest_tensor_bytes": largest_tensor_bytes(),
              "per_device_bytes": per_device_bytes, "checked": checked}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "fsdp")
