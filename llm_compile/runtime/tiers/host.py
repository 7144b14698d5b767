"""Row storage of one tier: ``[slots, B, H, W]`` (``W = D + Dv``: a row holds K and V together, so
one gather per layer fetches both), grown by a factor, on the device or on the host.

Host kinds: ``"ram"`` (CPU tensor), ``"pinned"`` (page-locked CPU memory, CUDA models: the copy to
the device can run asynchronously), ``"mmap"`` (CPU models: a file in ``mmap_dir`` mapped with
``torch.from_file(shared=True)``, so the host tier can exceed RAM; growing extends the file and maps
it again, no copy; the file is deleted when the storage dies, or at exit)::

    rows = Rows(batch=2, heads=3, width=128, dtype=torch.float32, device="cpu", kind="mmap", mmap_dir="/scratch")
    s = rows.append(kv_rows)          # kv_rows [m, 2, 3, 128] -> slots s .. s+m-1
    rows.flat().index_select(0, flat) # gather by (slot * B + b) * H + h
"""
from __future__ import annotations

import math
import os
import tempfile
import weakref

import torch
from torch import Tensor


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class Rows:
    def __init__(self, batch: int, heads: int, width: int, dtype: torch.dtype, device, kind: str = "device",
                 mmap_dir: str | None = None, limit: int | None = None) -> None:
        self.shape = (batch, heads, width)
        self.dtype, self.kind, self.mmap_dir, self.limit = dtype, kind, mmap_dir, limit
        self.device = torch.device(device) if kind == "device" else torch.device("cpu")
        self.used = 0
        self.path: str | None = None
        self.buf = self._alloc(0)

    def _alloc(self, slots: int) -> Tensor:
        B, H, W = self.shape
        if self.kind == "mmap":
            if self.path is None:
                fd, self.path = tempfile.mkstemp(prefix="llmaccel-kv-", suffix=".bin", dir=self.mmap_dir)
                os.close(fd)
                weakref.finalize(self, _unlink, self.path)
            n = max(1, slots) * B * H * W
            os.truncate(self.path, n * torch.empty(0, dtype=self.dtype).element_size())
            return torch.from_file(self.path, shared=True, size=n, dtype=self.dtype).view(-1, B, H, W)[:slots]
        buf = torch.empty(slots, B, H, W, dtype=self.dtype, device=self.device,
                          pin_memory=self.kind == "pinned")
        return buf

    @property
    def capacity(self) -> int:
        return self.buf.shape[0]

    def reserve(self, slots: int) -> None:
        """Make room for ``slots`` slots in all (grows by 1.5x, at most to ``limit``)."""
        if slots <= self.capacity:
            return
        cap = max(slots, math.ceil(self.capacity * 1.5), 64)
        if self.limit is not None:
            cap = min(cap, max(slots, self.limit))
        if self.kind == "mmap":  # the file keeps the rows: extend it and map it again
            self.buf = self._alloc(cap)
            return
        new = self._alloc(cap)
        new[: self.used] = self.buf[: self.used]
        self.buf = new

    def append(self, rows: Tensor) -> int:
        """Write ``rows`` [m, B, H, W] into fresh slots; returns the first slot."""
        m = rows.shape[0]
        self.reserve(self.used + m)
        first = self.used
        self.buf[first: first + m].copy_(rows)  # blocking: the fetch thread may read these rows next
        self.used += m
        return first

    def write(self, slots: Tensor, rows: Tensor) -> None:
        """Write ``rows`` [m, B, H, W] into the given (already reserved) slots."""
        self.buf.index_copy_(0, slots.to(self.buf.device), rows.to(self.buf.device))

    def flat(self) -> Tensor:
        """The rows as ``[slots * B * H, W]``."""
        return self.buf.view(-1, self.shape[2])

    def select_batch(self, sel: Tensor, limit: int | None) -> "Rows":
        """A new storage (same kind; ``limit``) whose batch entry ``i`` is entry ``sel[i]`` of this
        one, in every used slot, so slot numbers stay valid (beam search's reorder, batch edits)."""
        new = Rows(sel.numel(), *self.shape[1:], self.dtype, self.device, self.kind, self.mmap_dir, limit)
        if self.used:
            new.append(self.buf[: self.used].index_select(1, sel.to(self.buf.device)))
        return new

    def taken(self, slots: Tensor) -> "Rows":
        """A new storage (same kind and limit) holding slots ``slots`` of this one as ``0 .. len - 1``."""
        new = Rows(*self.shape, self.dtype, self.device, self.kind, self.mmap_dir, self.limit)
        if slots.numel():
            new.append(self.buf.index_select(0, slots.to(self.buf.device)))
        return new

    def row_nbytes(self) -> int:
        """Bytes of one slot (all of its batch and heads)."""
        return math.prod(self.shape) * self.buf.element_size()

    def nbytes(self, allocated: bool = False) -> int:
        """Bytes of the used slots (``allocated``: of every slot the storage holds)."""
        return (self.capacity if allocated else self.used) * self.row_nbytes()
