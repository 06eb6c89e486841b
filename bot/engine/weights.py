"""Reading weight files without copying them: a file as a memory-mapped array, safetensors as views of it.

Shared by the fast backend (adapters), the light loader (the converted base model), the GGUF reader and
the torch-free engine (``bot.engine.native_llama``), so none of them imports another for it. The numpy
functions (``map_array``, ``read_arrays``) do not import torch; ``read_safetensors`` gives the same views
as torch tensors.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np

# The dtypes read in place. bfloat16 has no numpy dtype: read_arrays holds it as uint16 bits (or widens it
# to float32, exactly: its 16 bits are the top half).
_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}


def map_array(path: Path) -> np.ndarray:
    """A whole file as a uint8 array over a private memory map (pages are read when touched)."""
    if path.stat().st_size == 0:
        return np.empty(0, dtype=np.uint8)
    with path.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return np.frombuffer(mapped, dtype=np.uint8)


def _layout(path: Path) -> tuple[np.ndarray, list[tuple[str, str, int, int, list[int]]]]:
    """A safetensors file's data section as one uint8 array over a private memory map, and each tensor's
    (name, dtype, start, end, shape) in it. Raises ValueError for a dtype not read in place or misaligned
    data (the readers below then refuse, or hand the file to the reference loader)."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    tensors = []
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        dtype = _NUMPY_DTYPES.get(meta["dtype"])
        start, end = meta["data_offsets"]
        if dtype is None:
            raise ValueError(f"{path}: tensor {key} is {meta['dtype']}, which is not read in place")
        if start % np.dtype(dtype).itemsize or (8 + n) % 8:
            raise ValueError(f"{path}: tensor {key} is not aligned for a view")
        tensors.append((key, meta["dtype"], start, end, meta["shape"]))
    return map_array(path)[8 + n:], tensors


def read_arrays(path: Path, *, bf16_bits: bool = False) -> dict[str, np.ndarray]:
    """A safetensors file as numpy arrays viewing one private memory map of it (no read copy), except
    bfloat16 tensors, which come as float32 copies (``bf16_bits``: as uint16 views of their bits). Raises
    ValueError for other dtypes numpy cannot hold and for misaligned data."""
    raw, tensors = _layout(path)
    out = {}
    for key, dtype, start, end, shape in tensors:
        array = raw[start:end].view(_NUMPY_DTYPES[dtype]).reshape(shape)
        if dtype == "BF16" and not bf16_bits:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        out[key] = array
    return out


def read_safetensors(path: Path) -> dict[str, Any]:
    """A safetensors file as CPU tensors viewing one private memory map of it (no read copy; the caller
    copies what it keeps). safetensors' own loader builds each tensor through Python storage slicing,
    which costs more than the copy for hundreds of small tensors; it still reads what is not read in place."""
    import torch

    try:
        raw, tensors = _layout(path)
    except ValueError:
        from safetensors.torch import load_file  # an unusual file: the reference loader

        return load_file(str(path), device="cpu")
    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
    data = torch.from_numpy(raw)   # one storage: every tensor a view of the same map
    return {key: data[start:end].view(dtypes[dtype]).view(shape) for key, dtype, start, end, shape in tensors}
