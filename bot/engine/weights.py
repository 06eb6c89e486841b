"""Reading weight files without copying them: a file as a memory-mapped array, safetensors as views of it.

Shared by the fast backend (adapters), the light loader (the converted base model), the GGUF reader and
the torch-free engine (``bot.engine.native_llama``), so none of them imports another for it. The numpy
functions (``map_array``, ``read_arrays``) do not import torch; ``map_file`` and ``read_safetensors`` are
the same views as torch tensors.
"""

from __future__ import annotations

import json
import mmap
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np

# bfloat16 has no numpy dtype: read_arrays widens it to float32 (exactly: its 16 bits are the top half).
_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def map_array(path: Path) -> np.ndarray:
    """A whole file as a uint8 array over a private memory map (pages are read when touched)."""
    if path.stat().st_size == 0:
        return np.empty(0, dtype=np.uint8)
    with path.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return np.frombuffer(mapped, dtype=np.uint8)


def map_file(path: Path) -> Any:
    """``map_array`` as a torch tensor (the same memory)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "non-writable buffer": ACCESS_COPY pages are private anyway
        return torch.from_numpy(map_array(path))


def _header(path: Path) -> tuple[dict[str, Any], int]:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def read_arrays(path: Path, *, bf16_bits: bool = False) -> dict[str, np.ndarray]:
    """A safetensors file as numpy arrays viewing one private memory map of it (no read copy), except
    bfloat16 tensors, which come as float32 copies (``bf16_bits``: as uint16 views of their bits). Raises
    ValueError for other dtypes numpy cannot hold and for misaligned data."""
    header, start_of_data = _header(path)
    raw = map_array(path)[start_of_data:]
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        dtype = _NUMPY_DTYPES.get(meta["dtype"])
        start, end = meta["data_offsets"]
        if meta["dtype"] == "BF16" and start % 2 == 0:
            halves = raw[start:end].view(np.uint16).reshape(meta["shape"])
            out[key] = halves if bf16_bits else (halves.astype(np.uint32) << 16).view(np.float32)
            continue
        if dtype is None:
            raise ValueError(f"{path}: tensor {key} is {meta['dtype']}, which numpy cannot hold")
        if start % np.dtype(dtype).itemsize or start_of_data % 8:
            raise ValueError(f"{path}: tensor {key} is not aligned for a view")
        out[key] = raw[start:end].view(dtype).reshape(meta["shape"])
    return out


def read_safetensors(path: Path) -> dict[str, Any]:
    """A safetensors file as CPU tensors viewing one private memory map of it (no read copy; the caller
    copies what it keeps). safetensors' own loader builds each tensor through Python storage slicing,
    which costs more than the copy for hundreds of small tensors."""
    import torch

    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
    header, start_of_data = _header(path)
    raw = map_file(path)[start_of_data:]
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        dtype = dtypes.get(meta["dtype"])
        start, end = meta["data_offsets"]
        if dtype is None or start % torch.empty((), dtype=dtype).element_size() or start_of_data % 8:
            from safetensors.torch import load_file  # an unusual file: the reference loader

            return load_file(str(path), device="cpu")
        out[key] = raw[start:end].view(dtype).view(meta["shape"])
    return out
