"""One attention site's KV cache in preallocated buffers that are appended to in place.

Hugging Face's ``DynamicCache`` appends a decode token with ``torch.cat([past, new], -2)``, which
rewrites the whole cache every step; at long contexts that copy costs more than the attention
itself. :class:`SiteKV` keeps ``[B, H, capacity, D]`` buffers instead, writes the new rows into the
free slots, and hands out views of the filled part; when full it grows by a factor (one copy per
growth, amortised O(1) rows per step; on CPU the buffers sit on huge pages,
:mod:`~llm_compile.runtime.kv.hugepages`)::

    kv = SiteKV(batch=4, heads=3, head_dim=64, v_dim=64, dtype=torch.float32, device="cpu",
                mode=DenseMode(), state=None, reserve=256, growth=1.5)
    kv.append(k_prompt, v_prompt)         # [4, 3, L, 64]: capacity L + 256
    kv.append(k_new, v_new)               # [4, 3, 1, 64]: written in place
    kv.keys(), kv.values()                # views [4, 3, L + 1, 64] of the buffers

Used by the attention workers of attention offload and by the in-place KV store
(:mod:`llm_compile.runtime.kv.store`), where each SiteKV belongs to one cache object (it hangs on
the phantom tensors that cache holds). :meth:`SiteKV.map_batch` and :meth:`SiteKV.crop` serve
beam search and assisted decoding (:class:`~llm_compile.runtime.kv.cache.LLMAccelCache`).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from llm_compile.runtime.kv.hugepages import empty_kv


def check_new_rows(shape: tuple[int, int, int, int], k: Tensor, v: Tensor) -> None:
    """New K/V rows ``[B, H, m, D]`` / ``[B, H, m, Dv]`` must fit a cache of ``shape`` (B, H, D, Dv)."""
    B, H, D, Dv = shape
    if (k.dim() != 4 or v.dim() != 4 or k.shape[0] != B or k.shape[1] != H or k.shape[3] != D
            or tuple(v.shape[:3]) != tuple(k.shape[:3]) or v.shape[3] != Dv):
        raise RuntimeError(f"k_new {tuple(k.shape)} / v_new {tuple(v.shape)} do not fit the cache "
                           f"[B={B}, h={H}, *, D={D}] / [.., Dv={Dv}]")


class SiteKV:
    """One site's ``[B, h, n, D]`` K and V, in buffers with ``reserve`` free slots after the first
    append and growing by ``growth`` (at least to the needed length) when full."""

    def __init__(self, batch: int, heads: int, head_dim: int, v_dim: int, dtype: torch.dtype,
                 device: torch.device, mode: Any, state: Any, *, reserve: int = 16,
                 growth: float = 2.0) -> None:
        if growth <= 1.0 or reserve < 0:
            raise ValueError(f"SiteKV: growth must be > 1 and reserve >= 0 (got {growth}, {reserve})")
        self.shape = (batch, heads, head_dim, v_dim)
        self.dtype, self.device = dtype, device
        self.reserve, self.growth = reserve, growth
        self.k = torch.empty(batch, heads, 0, head_dim, dtype=dtype, device=device)
        self.v = torch.empty(batch, heads, 0, v_dim, dtype=dtype, device=device)
        self.length = 0
        self.grown = 0
        """How many times the buffers were reallocated (each one copies the filled part once)."""
        self.mode, self.state = mode, state

    def _capacity_for(self, n: int) -> int:
        cap = self.k.shape[2]
        if cap == 0:
            return n + self.reserve
        return max(n, math.ceil(cap * self.growth), cap + 16)

    def append(self, k: Tensor, v: Tensor) -> None:
        check_new_rows(self.shape, k, v)
        n = self.length + k.shape[2]
        if n > self.k.shape[2]:
            B, H, D, Dv = self.shape
            cap = self._capacity_for(n)
            for name, old, d in (("k", self.k, D), ("v", self.v, Dv)):
                new = empty_kv((B, H, cap, d), self.dtype, self.device)   # huge pages on CPU
                new[:, :, :self.length] = old[:, :, :self.length]
                setattr(self, name, new)
            self.grown += self.length > 0
        self.k[:, :, self.length:n] = k
        self.v[:, :, self.length:n] = v
        self.length = n

    def keys(self) -> Tensor:
        return self.k[:, :, :self.length]

    def values(self) -> Tensor:
        return self.v[:, :, :self.length]

    def map_batch(self, fn) -> "SiteKV":
        """A new SiteKV whose sequences are ``fn`` of these along the batch (``index_select``,
        ``repeat_interleave``); the state is mapped the same way (``state.map_batch(fn)``)."""
        k, v = fn(self.keys()), fn(self.values())
        B, H, D, Dv = self.shape
        state = None if self.state is None else self.state.map_batch(fn)
        new = SiteKV(k.shape[0], H, D, Dv, self.dtype, self.device, self.mode, state,
                     reserve=self.reserve, growth=self.growth)
        new.__dict__.update({a: b for a, b in self.__dict__.items() if a not in new.__dict__})
        new.append(k, v)
        return new

    def crop(self, n: int) -> None:
        """Keep the first ``n`` tokens (in place: the rows after them are overwritten later);
        the state is cropped too (``state.crop(n)``)."""
        if n < self.length:
            self.length = max(0, n)
            if self.state is not None:
                self.state = self.state.crop(self.length)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def nbytes(self, allocated: bool = False) -> int:
        n = self.k.shape[2] if allocated else self.length
        B, H, D, Dv = self.shape
        return B * H * n * (D + Dv) * self.k.element_size()
