"""Reading weight files without copying them: a file as a memory-mapped tensor, safetensors as views of it.

Shared by the fast backend (adapters), the light loader (the converted base model) and the GGUF reader,
so none of them imports another for it.
"""

from __future__ import annotations

import json
import mmap
import struct
import warnings
from pathlib import Path

import torch

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def map_file(path: Path) -> torch.Tensor:
    """A whole file as a uint8 CPU tensor over a private memory map (pages are read when touched)."""
    if path.stat().st_size == 0:
        return torch.empty(0, dtype=torch.uint8)
    with path.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "non-writable buffer": ACCESS_COPY pages are private anyway
        return torch.frombuffer(mapped, dtype=torch.uint8)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file as CPU tensors viewing one private memory map of it (no read copy; the caller
    copies what it keeps). safetensors' own loader builds each tensor through Python storage slicing,
    which costs more than the copy for hundreds of small tensors."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    raw = map_file(path)[8 + n:]
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        dtype = _DTYPES.get(meta["dtype"])
        start, end = meta["data_offsets"]
        if dtype is None or start % torch.empty((), dtype=dtype).element_size() or (8 + n) % 8:
            from safetensors.torch import load_file  # an unusual file: the reference loader

            return load_file(str(path), device="cpu")
        out[key] = raw[start:end].view(dtype).view(meta["shape"])
    return out
