"""The running batch's key/value cache in slots, for the fast engines (torch's ``FastLlama`` and the
torch-free ``bot.engine.native_llama``): which rows are live, how long each is, how far each slot was
written, and how the block grows, shrinks and closes holes. The arrays themselves (torch tensors or numpy
arrays) come from the engine through ``KVArrays``; the slicing used here means the same in both."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class KVArrays(Protocol):
    """How an engine makes its cache blocks: ``kv[layer, row, k|v, kv_head, column, head_dim]``, zeroed."""

    def new_kv(self, rows: int, cols: int) -> Any: ...

    def copy_kv(self, view: Any) -> Any: ...


@dataclass
class Reservation:
    """Slots [start, start + rows) of a SlotCache that a prefill writes into; committed once it succeeds."""

    cache: SlotCache
    start: int
    rows: int
    width: int
    lengths: list[int] = field(default_factory=list)


class SlotCache:
    """Keys/values of the running batch: ``kv[layer, row, k|v, kv_head, column, head_dim]``.

    Row ``i`` holds its tokens in columns ``0 .. lens[i] - 1``; rows ``0 .. n - 1`` are in use. Columns
    past a row's length may hold stale (finite) values: attention masks them, and ``written`` tracks how
    far each slot was written so that stale values from an earlier occupant are cleared on reuse.
    The block is sized from what the live rows need, not grown from the largest shape it ever had; with
    ``max_tokens`` it is never allocated larger than that (rows x columns).
    """

    def __init__(self, arrays: KVArrays, max_rows: int, max_len: int, max_tokens: int = 0):
        self.arrays = arrays
        self.max_rows = max_rows
        self.max_len = max_len
        self.max_tokens = max_tokens
        self.kv: Any = None
        self.n = 0
        self.lens: list[int] = []
        self.written: list[int] = []

    @property
    def capacity(self) -> tuple[int, int]:
        return (0, 0) if self.kv is None else (self.kv.shape[1], self.kv.shape[4])

    def _ensure(self, rows: int, cols: int) -> None:
        cap_rows, cap_cols = self.capacity
        if rows <= cap_rows and cols <= cap_cols:
            return
        width = max(self.written[: self.n], default=0)
        # Sized from the live rows' needs, so a long row that has left does not keep every row wide.
        need_cols = max(cols, width)
        new_cols = max(need_cols, min(self.max_len, -(-need_cols // 128) * 128))
        new_rows = max(rows, min(max(self.max_rows, rows), max(4, 2 * cap_rows)))
        if self.max_tokens and new_rows * new_cols > self.max_tokens:
            new_rows = max(rows, self.max_tokens // new_cols)
            if new_rows * new_cols > self.max_tokens:
                new_cols = max(need_cols, self.max_tokens // new_rows)
        kv = self.arrays.new_kv(new_rows, new_cols)
        if self.kv is not None and self.n:
            kv[:, : self.n, :, :, :width] = self.kv[:, : self.n, :, :, :width]
        self.kv = kv
        self.written = self.written[: self.n] + [0] * (new_rows - self.n)

    def reserve(self, rows: int, width: int) -> Reservation:
        self._ensure(self.n + rows, width)
        assert self.kv is not None
        for s in range(self.n, self.n + rows):
            if self.written[s] > width:
                self.kv[:, s, :, :, width:self.written[s]] = 0
            self.written[s] = width
        return Reservation(self, self.n, rows, width)

    def commit(self, res: Reservation) -> None:
        if res.start != self.n:
            raise RuntimeError("reservations must be committed in order")
        self.lens += res.lengths
        self.n += res.rows

    def retire(self, keep: list[int]) -> list[int]:
        """Keep rows ``keep`` (in that order of preference); returns the new order as old indices."""
        n_new = len(keep)
        kept = set(keep)
        order: list[int] = [i for i in range(n_new)]
        holes = [i for i in range(n_new) if i not in kept]
        movers = [i for i in keep if i >= n_new]
        assert self.kv is not None or not holes
        for hole, mover in zip(holes, movers, strict=True):
            assert self.kv is not None
            w = self.written[mover]
            self.kv[:, hole, :, :, :w] = self.kv[:, mover, :, :, :w]
            if self.written[hole] > w:
                self.kv[:, hole, :, :, w:self.written[hole]] = 0
            self.written[hole] = w
            order[hole] = mover
        self.lens = [self.lens[o] for o in order]
        self.n = n_new
        self._shrink_columns()
        return order

    def _shrink_columns(self) -> None:
        """Once the widest rows have left, give back the columns only they used (at least half the
        block), so a finished long prompt does not keep its memory for ever."""
        if self.kv is None or not self.n:
            return
        width = max(self.written[: self.n])
        cols = -(-(width + 1) // 128) * 128   # room for the next step without growing again
        if self.kv.shape[4] <= 2 * cols:
            return
        self.kv = self.arrays.copy_kv(self.kv[:, :, :, :, :cols])
        self.written = [min(w, cols) for w in self.written]
