"""The block-quantised (Q4_1, Q8_0) matrices of a Llama GGUF file, for the fast engine's kernels.

The bundled model ships as a Q4_1 GGUF and is converted once to float32 safetensors (bot.engine.loading). Those
float32 values are exactly ``d * q + m`` of the GGUF's 4-bit blocks (``d * q`` of its 8-bit embeddings),
so the fast engine can keep the blocks themselves (0.625 and 1.06 bytes per weight instead of 4) and
expand them inside its matmul kernel with identical results. This module parses the GGUF header itself:
the ``gguf`` package's reader also decodes the 49k-entry vocabulary and takes seconds, while the tensor
table is all we need.
Arrays (numpy, no torch) stay views of one memory map of the file (nothing is copied except the q/k rows that
transformers' loader reorders).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from bot.engine.kernels import Q41Weight, Q80Weight, QuantWeight

GGML_Q4_1, GGML_Q8_0 = 3, 8
BLOCK_TYPES: dict[int, type[QuantWeight]] = {GGML_Q4_1: Q41Weight, GGML_Q8_0: Q80Weight}
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
# GGUF tensor names (blk.N.<kind>.weight) -> transformers' Llama module names.
LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj"}


class GGUFError(ValueError):
    """Not a GGUF file this module can read."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]   # GGUF order: dims[0] is the row length (a linear layer's input size)
    ggml_type: int
    offset: int             # from the start of the data section


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise GGUFError("truncated header")
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO) -> str:
    return f.read(_read(f, "<Q")).decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int) -> Any:
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        inner, count = _read(f, "<I"), _read(f, "<Q")
        if inner == _STRING:
            for _ in range(count):
                f.seek(_read(f, "<Q"), 1)
        elif inner in _SCALAR_BYTES:
            f.seek(count * _SCALAR_BYTES[inner], 1)
        else:
            raise GGUFError(f"unknown array element type {inner}")
        return None
    fmt = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    if kind not in fmt:
        raise GGUFError(f"unknown metadata type {kind}")
    return _read(f, fmt[kind])


def read_tensor_table(path: Path) -> tuple[list[TensorInfo], int]:
    """(tensor infos, absolute offset of the data section) of a GGUF v2/v3 file."""
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file")
        version = _read(f, "<I")
        if version not in (2, 3):
            raise GGUFError(f"GGUF version {version} is not supported")
        n_tensors, n_kv = _read(f, "<Q"), _read(f, "<Q")
        alignment = 32
        for _ in range(n_kv):
            key, kind = _string(f), _read(f, "<I")
            value = _value(f, kind)
            if key == "general.alignment" and isinstance(value, int):
                alignment = value
        infos = []
        for _ in range(n_tensors):
            name = _string(f)
            dims = tuple(_read(f, "<Q") for _ in range(_read(f, "<I")))
            infos.append(TensorInfo(name, dims, _read(f, "<I"), _read(f, "<Q")))
        start = f.tell()
    return infos, (start + alignment - 1) // alignment * alignment


def _unpermute_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """The row order transformers' GGUF loader gives q/k weights (llama.cpp interleaves RoPE halves)."""
    half = n_rows // n_heads // 2
    return np.arange(n_rows).reshape(n_heads, half, 2).transpose(0, 2, 1).reshape(n_rows)


def transformers_name(gguf_name: str) -> str | None:
    """"blk.0.attn_q.weight" -> "model.layers.0.self_attn.q_proj.weight"; None for what is not a matrix
    the fast engine multiplies by (norms)."""
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in LINEARS and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{LINEARS[parts[2]]}.weight"
    return None


def quantized_weights(path: Path, cfg: Any) -> dict[str, QuantWeight]:
    """The Q4_1 and Q8_0 matrices of a Llama GGUF (layers' linear weights, embeddings, output layer) by
    transformers' tensor name; other tensors are left out (the caller keeps their float copies)."""
    from bot.engine.weights import map_array

    infos, data_start = read_tensor_table(path)
    raw = map_array(path)
    out: dict[str, QuantWeight] = {}
    for info in infos:
        name, kind = transformers_name(info.name), BLOCK_TYPES.get(info.ggml_type)
        if name is None or kind is None:
            continue
        if len(info.dims) != 2 or info.dims[0] % 32:
            raise GGUFError(f"{info.name}: unexpected shape {info.dims}")
        k, n = info.dims
        row_bytes = k // 32 * kind.BLOCK_BYTES
        begin = data_start + info.offset
        if begin + n * row_bytes > raw.size:
            raise GGUFError(f"{info.name}: the file is shorter than its tensor table says")
        blocks = raw[begin:begin + n * row_bytes].reshape(n, row_bytes)
        if name.endswith("q_proj.weight"):
            blocks = blocks[_unpermute_rows(n, cfg.num_attention_heads)]
        elif name.endswith("k_proj.weight"):
            blocks = blocks[_unpermute_rows(n, cfg.num_key_value_heads)]
        out[name] = kind(blocks, k)
    return out
