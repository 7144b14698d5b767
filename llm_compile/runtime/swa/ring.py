"""The decode-step rows inside an SWA score window (:class:`RowRing`): each step's kept token
indices and fixed-point weights, kept so that a row leaving the window is subtracted exactly
(see :mod:`llm_compile.runtime.swa.state`)."""
from __future__ import annotations

import torch
from torch import Tensor


class RowRing:
    """Decode-step rows in the score window, oldest first: a ring of ``(indices, fixed-point
    weights)`` rows in two preallocated tensors ``[slots, B, G, width]`` (int32 / int64).

    A row narrower than ``width`` is padded with index 0 and weight 0 (adding 0 to token 0 is a
    no-op). Slots and width grow by ~25 % when needed (amortised O(1)); nothing is allocated on a
    step that fits.
    """

    def __init__(self, batch: int, groups: int, device: torch.device):
        self._idx = torch.zeros(0, batch, groups, 0, dtype=torch.int32, device=device)
        self._w = torch.zeros(0, batch, groups, 0, dtype=torch.int64, device=device)
        self.head = 0
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def clear(self) -> None:
        self.head = self.count = 0

    def _order(self, m: int) -> Tensor:
        return (self.head + torch.arange(m, device=self._idx.device)) % self._idx.shape[0]

    def _grow(self, slots: int, width: int) -> None:
        S, B, G, W = self._idx.shape
        order = self._order(self.count)
        idx = torch.zeros(slots, B, G, width, dtype=torch.int32, device=self._idx.device)
        w = torch.zeros(slots, B, G, width, dtype=torch.int64, device=self._idx.device)
        idx[: self.count, ..., :W] = self._idx[order]
        w[: self.count, ..., :W] = self._w[order]
        self._idx, self._w, self.head = idx, w, 0

    def claim(self, T: int) -> tuple[Tensor, Tensor]:
        """Append an empty row for ``T`` tokens and return its slot (indices [B, G, width] int32,
        weights int64: views, to be filled by the caller, padding slots included)."""
        S, W = self._idx.shape[0], self._idx.shape[-1]
        if self.count == S or T > W:
            self._grow(S + max(16, S // 4) if self.count == S else S,
                       max(W, -(-(T + T // 8) // 64) * 64))
            S = self._idx.shape[0]
        slot = (self.head + self.count) % S
        self.count += 1
        return self._idx[slot], self._w[slot]

    def push(self, idx: Tensor, wq: Tensor) -> None:
        """Append a row: token indices ``idx`` [B, G, T] and fixed-point weights ``wq`` [B, G, T]."""
        T = idx.shape[-1]
        ri, rw = self.claim(T)
        ri[..., :T] = idx
        rw[..., :T] = wq
        ri[..., T:] = 0
        rw[..., T:] = 0

    def pop_newest(self, m: int) -> tuple[Tensor, Tensor]:
        """Remove the ``m`` newest rows; returns their indices (int64) and weights, [B, G, m*width]."""
        S, B, G, W = self._idx.shape
        order = (self.head + self.count - m + torch.arange(m, device=self._idx.device)) % S
        idx = self._idx[order].permute(1, 2, 0, 3).reshape(B, G, m * W).long()
        w = self._w[order].permute(1, 2, 0, 3).reshape(B, G, m * W)
        self.count -= m
        return idx, w

    def map_batch(self, fn) -> None:
        """Apply ``fn`` (a batch-dimension gather/repeat of a [B, ...] tensor) to every row."""
        self._idx = fn(self._idx.transpose(0, 1)).transpose(0, 1).contiguous()
        self._w = fn(self._w.transpose(0, 1)).transpose(0, 1).contiguous()

    def pop_oldest(self) -> tuple[Tensor, Tensor]:
        """Remove the oldest row; returns views of its slot (indices int32, weights int64,
        [B, G, width]): use them before the next push."""
        idx, w = self._idx[self.head], self._w[self.head]
        self.head = (self.head + 1) % self._idx.shape[0]
        self.count -= 1
        return idx, w

    def pop(self, m: int) -> tuple[Tensor, Tensor]:
        """Remove the ``m`` oldest rows; returns their indices (int64) and weights, [B, G, m*width]
        (for ``m == 1`` the weights are a view of the freed slot: use them before the next push)."""
        if m == 1:  # the usual step: one row leaves the window (a view of its slot, no gather)
            idx, w = self.pop_oldest()
            return idx.long(), w
        S, B, G, W = self._idx.shape
        order = self._order(m)
        idx = self._idx[order].permute(1, 2, 0, 3).reshape(B, G, m * W).long()
        w = self._w[order].permute(1, 2, 0, 3).reshape(B, G, m * W)
        self.head = (self.head + m) % S
        self.count -= m
        return idx, w
