"""Reading blocks of tensors out of safetensors files, and writing them.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
byte offsets) and the raw row-major data. Reading goes through a memory map opened for one block
and closed after it, so a process copies out only the slices its devices hold and never keeps a
mapping alive. (A slice of the last, contiguous dimension, which fsdp makes of `embed`, still
pages in every row of the tensor: the file is row-major. Memory stays bounded by the block.)
The `safetensors` package reads slices too, but its numpy path has no bfloat16 (the dtype most
checkpoints are published in), its torch path would make torch a dependency of loading, and the
model code must run on a bare accelerator image (jax, flax, optax, numpy); the format is small
enough to read and write here.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from kd_jax.config import ConfigError

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(jnp.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("bool"),
}
CODES = {dtype: code for code, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


def read_header(path: Path) -> tuple[dict, int]:
    """(tensor name -> {dtype, shape, data_offsets}, where the data starts) of one file."""
    try:
        with open(path, "rb") as file:
            prefix = file.read(8)
            (length,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (None,)
            if length is None or not 0 < length <= _MAX_HEADER:
                raise ValueError("no valid header length")
            header = json.loads(file.read(length))
        size = path.stat().st_size
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a readable safetensors file ({err})") from None
    header.pop("__metadata__", None)
    start = 8 + length
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        if entry["dtype"] not in DTYPES:
            raise ConfigError(f"{path}: tensor {name} has dtype {entry['dtype']}, which kd_jax "
                              f"does not read ({', '.join(DTYPES)})")
        expected = int(np.prod(entry["shape"])) * DTYPES[entry["dtype"]].itemsize
        if end - begin != expected or start + end > size:
            raise ConfigError(f"{path}: tensor {name} is truncated or its header is damaged "
                              f"({end - begin} bytes for shape {entry['shape']}, file {size})")
    return header, start


def read_block(path: Path, entry: dict, data_start: int,
               index: tuple[slice, ...]) -> np.ndarray:
    """A copy of `tensor[index]` (one slice per dimension), in the stored dtype."""
    dtype = DTYPES[entry["dtype"]]
    shape = tuple(entry["shape"])
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        tensor = np.frombuffer(mapped, dtype, int(np.prod(shape)),
                               data_start + entry["data_offsets"][0]).reshape(shape)
        block = np.array(tensor[index])
        del tensor  # the mapping closes only once no array looks into it
    return block


def write_file(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """One safetensors file, with the metadata transformers expects (format: pt); the header is
    padded to 8 bytes, as the format recommends, so every tensor starts aligned."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    arrays = {}
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        arrays[name] = array
        header[name] = {"dtype": CODES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for array in arrays.values():
            file.write(array.tobytes())
