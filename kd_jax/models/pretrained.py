"""Hugging Face checkpoint directories in and out: config.json and safetensors weights.

`open_checkpoint(path)` finds and checks the files: `config.json`, then `model.safetensors`, or
shards named by `model.safetensors.index.json` (or found by their suffix). Pickle weights
(`.bin`, `.pt`, ...) are refused, never unpickled. `load_params` reads each parameter straight
into its target sharding: every device's shard is read from the file by itself, as a block of
the tensor (`kd_jax.models.safetensors_files`), converted to the configured dtype, so no process
ever holds a full copy of a tensor it only holds a slice of. `save_params` writes the reverse.
`load_pretrained(path)` is the notebook entry point: token ids in, logits out.

This is the weight-loading module of `kd_jax.models`; the model definitions stay free of I/O.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.checks import not_a_directory
from kd_jax.config import ConfigError, ModelConfig
from kd_jax.models import families
from kd_jax.models.families import Tensor
from kd_jax.models.pure import PureModel, abstract_model
from kd_jax.models.safetensors_files import read_block, read_header, write_file

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SHARD_BYTES = 5 * 1024**3  # the shard size transformers writes by default
SUMS = "SHA256SUMS"  # the digest of every file of a directory kd_jax exported


@dataclasses.dataclass
class Checkpoint:
    path: Path
    hf: dict  # config.json
    files: dict[str, Path]  # tensor name -> the file holding it
    headers: dict[Path, tuple[dict, int]]  # file -> (header, data start)
    digests: dict[str, str] | None = None  # weights file name -> SHA-256, once computed

    def entry(self, name: str) -> tuple[Path, dict, int]:
        file = self.files[name]
        header, start = self.headers[file]
        return file, header[name], start

    def model_config(self, base: ModelConfig | None = None) -> ModelConfig:
        return families.model_config(self.hf, base)


def read_config(path: str | Path) -> dict:
    """The config.json of the checkpoint directory `path`, of a supported family; checked.
    Enough for shapes (`kd-jax plan`): the weights need not be there."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"checkpoint directory '{path}' {not_a_directory(path)}")
    try:
        hf = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} has no config.json (not a Hugging Face checkpoint)") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path / 'config.json'}: not readable JSON ({err})") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{path / 'config.json'}: not a JSON object")
    families.family_of(hf)
    return hf


def open_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint directory `path`, its config and where each tensor lies; checked."""
    path = Path(path)
    hf = read_config(path)
    shard_files = sorted(path.glob("*.safetensors"))
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{path / INDEX}: not a safetensors index ({err})") from None
        shard_files = sorted({path / name for name in weight_map.values()})
    if not shard_files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ConfigError(
                f"{path} holds pickle weights ({', '.join(pickles)}), which kd_jax never loads "
                "(unpickling runs code): convert them to safetensors first, e.g. load with "
                "transformers and save_pretrained(..., safe_serialization=True)")
        raise ConfigError(f"{path} has no *.safetensors weights")
    headers, files = {}, {}
    for file in shard_files:
        if not file.is_file():
            raise ConfigError(f"{path / INDEX} names {file.name}, which is missing")
        headers[file] = read_header(file)
        files.update(dict.fromkeys(headers[file][0], file))
    return Checkpoint(path, hf, files, headers)


def _source_shape(param_shape: tuple[int, ...], tensor: Tensor) -> tuple[int, ...]:
    view, dim = [], 0
    for size in tensor.groups:
        view.append(math.prod(param_shape[dim:dim + size]))
        dim += size
    return tuple(reversed(view)) if tensor.transpose else tuple(view)


def _read(ckpt: Checkpoint, name: str, tensor: Tensor, param_shape: tuple[int, ...],
          index: tuple[slice, ...]) -> np.ndarray:
    """`param[index]` of one layer (or an unstacked parameter) from the tensor `name`.

    The first parameter dimension of each group selects a contiguous range of the tensor's
    dimension (the later ones of the group are read whole, then sliced), so the block read is
    the shard itself whenever only leading dimensions of groups are split, as every layout does.
    """
    view_index, block_shape, post_index, dim = [], [], [], 0
    for size in tensor.groups:
        dims, slices = param_shape[dim:dim + size], index[dim:dim + size]
        inner = math.prod(dims[1:])
        view_index.append(slice(slices[0].start * inner, slices[0].stop * inner))
        block_shape += [slices[0].stop - slices[0].start, *dims[1:]]
        post_index += [slice(None), *slices[1:]]
        dim += size
    file, entry, start = ckpt.entry(name)
    if tensor.transpose:
        block = read_block(file, entry, start, tuple(reversed(view_index))).T
    else:
        block = read_block(file, entry, start, tuple(view_index))
    return block.reshape(block_shape)[tuple(post_index)]


def _check_tensor(ckpt: Checkpoint, name: str, expected: tuple[int, ...]) -> None:
    if name not in ckpt.files:
        raise ConfigError(f"{ckpt.path}: tensor {name} is missing from the checkpoint")
    shape = tuple(ckpt.entry(name)[1]["shape"])
    if shape != expected:
        raise ConfigError(f"{ckpt.path}: tensor {name} has shape {list(shape)}, config.json "
                          f"implies {list(expected)}")


def check_params(ckpt: Checkpoint, cfg: ModelConfig, abstract: dict) -> list[tuple]:
    """Every parameter's tensors are in the checkpoint with the shapes config.json implies
    (nothing is read but the headers); (path, tensor, names, shape) per parameter."""
    tensors = families.tensor_map(cfg)
    found = []
    for path, leaf in _flatten(abstract):
        if path not in tensors:
            raise ValueError(f"parameter {'/'.join(path)} has no tensor in the {cfg.family} map")
        tensor, shape = tensors[path], tuple(leaf.shape)
        layered = path[0] == "layers"
        per_layer = shape[1:] if layered else shape
        names = [tensor.name.format(layer) for layer in range(shape[0])] if layered else [
            tensor.name]
        for name in names:
            _check_tensor(ckpt, name, _source_shape(per_layer, tensor))
        found.append((path, tensor, names, shape))
    return found


def weight_digests(ckpt: Checkpoint) -> dict[str, str]:
    """{file name: SHA-256} of each weights file of `ckpt`, checked against every digest
    recorded for it; computed once per opened checkpoint.

    Two records are checked here. The Hugging Face cache stores a large file once, under
    `blobs/<sha256 of its bytes>`, and a snapshot links to it: that name is a digest recorded
    when the file was published. And a directory kd_jax exported lists its files' digests in
    `SHA256SUMS` (`sha256sum -c` reads it too). A damaged download or a flipped byte is found
    before any weight is read. A plain directory with neither has nothing to check against yet:
    the digests returned are what a run records at its start and compares on every later read
    (`kd_jax.teacher.loading.check_teacher_files`).
    """
    if ckpt.digests is not None:
        return ckpt.digests
    files = sorted(set(ckpt.files.values()))
    # hashlib releases the GIL on large reads: the files are hashed side by side.
    with ThreadPoolExecutor(max_workers=min(8, len(files))) as pool:
        actual = dict(zip(files, pool.map(_sha256, files)))
    listed = read_sums(ckpt.path)
    for file, digest in actual.items():
        blob = file.resolve()
        if blob.parent.name == "blobs" and _is_sha256(blob.name) and digest != blob.name:
            raise ConfigError(f"{file}: its bytes do not match the SHA-256 the Hugging Face "
                              "cache recorded for it (a damaged download); delete it and "
                              "download it again")
        if file.name in listed and listed[file.name] != digest:
            raise ConfigError(f"{file}: its bytes do not match the SHA-256 recorded for it in "
                              f"{SUMS} (a damaged copy); copy or export it again")
    ckpt.digests = {file.name: digest for file, digest in actual.items()}
    return ckpt.digests


def read_sums(path: Path) -> dict[str, str]:
    """{file name: SHA-256} from the `SHA256SUMS` of directory `path` (none: {})."""
    sums = path / SUMS
    if not sums.is_file():
        return {}
    listed = {}
    for line in sums.read_text(errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        if _is_sha256(digest) and name:
            listed[name.lstrip("*")] = digest
    return listed


def write_sums(path: Path) -> None:
    """`SHA256SUMS` in directory `path`: the digest of every file in it, `sha256sum` format."""
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name != SUMS)
    (path / SUMS).write_text("".join(f"{_sha256(p)}  {p.name}\n" for p in files))


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _is_sha256(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def load_params(ckpt: Checkpoint, cfg: ModelConfig, abstract: dict,
                shardings: Any = None) -> dict:
    """The parameters of `cfg` from `ckpt`, in `cfg.param_dtype`, each placed as `shardings`
    says (a tree like `abstract`; None: the default device). The files are checked against
    their recorded SHA-256 first (`weight_digests`)."""
    weight_digests(ckpt)
    dtype = jnp.dtype(cfg.param_dtype)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    flat_shardings = dict(_flatten(shardings)) if shardings is not None else {}
    params: dict = {}
    for path, tensor, names, shape in check_params(ckpt, cfg, abstract):
        layered = path[0] == "layers"

        def fetch(index, tensor=tensor, shape=shape, names=names, layered=layered):
            index = tuple(slice(*s.indices(size)[:2]) for s, size in zip(index, shape))
            if not layered:
                return _read(ckpt, names[0], tensor, shape, index).astype(dtype)
            layers = range(index[0].start, index[0].stop)
            out = np.empty([len(layers)] + [s.stop - s.start for s in index[1:]], dtype)
            for i, layer in enumerate(layers):
                out[i] = _read(ckpt, names[layer], tensor, shape[1:], index[1:])
            return out

        sharding = flat_shardings.get(path, default)
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jax.make_array_from_callback(shape, sharding, fetch)
    return params


def save_params(params: dict, cfg: ModelConfig, out_dir: str | Path, dtype: str,
                base: dict | None = None, shard_bytes: int = SHARD_BYTES) -> list[Path]:
    """Write `params` as a Hugging Face checkpoint: config.json and safetensors shards (with an
    index when there are several). Tensors are fetched one parameter at a time."""
    out_dir = Path(out_dir)
    hf = families.hf_config(dataclasses.replace(cfg, param_dtype=dtype), base)
    np_dtype = np.dtype(jnp.dtype(dtype))
    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    for path, tensor in families.tensor_map(cfg).items():
        value = np.asarray(jax.device_get(_lookup(params, path))).astype(np_dtype)
        layers = list(enumerate(value)) if path[0] == "layers" else [(None, value)]
        for layer, array in layers:
            source = array.reshape(_source_shape(array.shape, tensor)[::-1] if tensor.transpose
                                   else _source_shape(array.shape, tensor))
            source = np.ascontiguousarray(source.T if tensor.transpose else source)
            if sizes[-1] and sizes[-1] + source.nbytes > shard_bytes:
                shards.append({})
                sizes.append(0)
            shards[-1][tensor.name.format(layer)] = source
            sizes[-1] += source.nbytes
    written = []
    names = ([WEIGHTS] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, tensors in zip(names, shards):
        write_file(out_dir / name, tensors)
        written.append(out_dir / name)
    if len(shards) > 1:
        weight_map = {tensor: name for name, tensors in zip(names, shards) for tensor in tensors}
        (out_dir / INDEX).write_text(json.dumps(
            {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, indent=2))
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return written


def _flatten(tree: dict, prefix: tuple[str, ...] = ()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _lookup(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


@dataclasses.dataclass
class Pretrained:
    """A loaded checkpoint: `model(tokens)` maps int token ids [batch, seq] to float32 logits
    [batch, seq, vocab], each row one sequence starting at position 0."""

    config: ModelConfig
    model: PureModel
    params: dict
    _logits: Callable

    def __call__(self, tokens_bt: Any) -> jax.Array:
        tokens_bt = jnp.asarray(tokens_bt, jnp.int32)
        if tokens_bt.ndim != 2:
            raise ValueError(f"token ids must be [batch, seq], got shape {tokens_bt.shape}")
        return self._logits(self.params, tokens_bt)


def load_pretrained(path: str | Path, dtype: str = "float32") -> Pretrained:
    """A Hugging Face checkpoint directory as a function from token ids to logits."""
    ckpt = open_checkpoint(path)
    cfg = ckpt.model_config(ModelConfig(dtype=dtype, param_dtype=dtype))
    model, abstract = abstract_model(cfg)
    params = load_params(ckpt, cfg, abstract)

    @jax.jit
    def logits(params, tokens_bt):
        positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
        batch = {"tokens": tokens_bt, "positions": positions_bt,
                 "segment_ids": jnp.ones_like(tokens_bt)}
        return model.logits(params, batch)

    return Pretrained(cfg, model, params, logits)
