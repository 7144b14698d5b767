"""Page summaries of the keys (Quest, arXiv 2406.10774): per page of ``page`` consecutive tokens and
per KV head, the elementwise minimum and maximum of the keys. For a query ``q``,

    bound(q, page) = sum_d max(q_d * kmin_d, q_d * kmax_d) = relu(q) . kmax + min(q, 0) . kmin

is an upper bound of ``q . k`` over every key ``k`` of the page, computed from the summaries only
(two small matmuls over ``pages`` rows instead of ``n``). ``quest`` and ``recall`` rank tokens by it.

The summaries are per-sequence state: a :class:`PageSummary` rides in the site's
:class:`~llm_compile.runtime.swa.state.SWAState` (so it lives in the sequence's cache and follows its
``map_batch``/``crop``). It is updated lazily from the key cache: a call summarises the tokens
added since the last call, recomputing the last (partial) page from its first token, so a crop
needs no keys (it only lowers the covered length) and the summaries always equal the min/max of
the cache's current keys. Summaries are stored in the keys' dtype (min/max of keys are keys), so
their bytes are ``2 * D * itemsize`` per page per KV head: counted in the step's budget.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor


class PageSummary:
    """Elementwise min/max of keys per page: ``kmin``/``kmax`` [B, Hkv, pages, D] over ``n`` tokens."""

    def __init__(self, page: int):
        self.page = page
        self.n = 0
        self._min: Tensor | None = None
        self._max: Tensor | None = None

    @property
    def pages(self) -> int:
        return -(-self.n // self.page)

    @property
    def kmin(self) -> Tensor:
        return self._min[:, :, : self.pages]

    @property
    def kmax(self) -> Tensor:
        return self._max[:, :, : self.pages]

    def _reserve(self, k: Tensor, pages: int) -> None:
        B, H, _, D = k.shape
        if self._min is not None and self._min.shape[:2] == (B, H) and self._min.shape[2] >= pages:
            return
        cap = max(pages, 2 * (0 if self._min is None else self._min.shape[2]), 16)
        mn = torch.empty(B, H, cap, D, dtype=k.dtype, device=k.device)
        mx = torch.empty_like(mn)
        if self._min is not None and self.n:
            old = self.pages
            mn[:, :, :old] = self._min[:, :, :old]
            mx[:, :, :old] = self._max[:, :, :old]
        self._min, self._max = mn, mx

    def update(self, k: Tensor, k_new: Tensor | None = None) -> None:
        """Cover every key of ``k`` [B, Hkv, N, D] (and ``k_new`` [B, Hkv, 1, D] after it): only the
        pages from the last partial one on are (re)computed."""
        N = k.shape[2] + (0 if k_new is None else k_new.shape[2])
        P = self.page
        lo = (min(self.n, N) // P) * P
        if lo == N and self.n == N:
            return
        rows = k[:, :, lo:]
        if k_new is not None:
            rows = torch.cat([rows, k_new], dim=2)
        self._reserve(k, -(-N // P))
        B, H, m, D = rows.shape
        full = m // P
        p0 = lo // P
        if full:
            blk = rows[:, :, : full * P].reshape(B, H, full, P, D)
            self._min[:, :, p0: p0 + full] = blk.amin(3)
            self._max[:, :, p0: p0 + full] = blk.amax(3)
        if m > full * P:
            tail = rows[:, :, full * P:]
            self._min[:, :, p0 + full] = tail.amin(2)
            self._max[:, :, p0 + full] = tail.amax(2)
        self.n = N

    def bounds(self, q: Tensor, scale: float) -> Tensor:
        """Upper bounds of ``scale * q . k`` per page: q [B, Hq, D] -> [B, Hq, pages] fp32."""
        B, Hq, D = q.shape
        H = self._min.shape[1]
        qg = q.float().reshape(B, H, Hq // H, D)
        ub = (torch.matmul(qg.clamp(min=0), self.kmax.float().transpose(-1, -2))
              + torch.matmul(qg.clamp(max=0), self.kmin.float().transpose(-1, -2)))
        return ub.reshape(B, Hq, -1).mul_(scale)

    # -- cache operations ------------------------------------------------------------------------
    def map_batch(self, fn) -> "PageSummary":
        new = copy.copy(self)
        if self._min is not None:
            new._min, new._max = fn(self._min), fn(self._max)
        return new

    def crop(self, n: int) -> "PageSummary":
        """Cover the first ``n`` tokens: the last page is recomputed from the keys at the next update."""
        new = self.map_batch(lambda t: t.clone())
        new.n = min(self.n, (n // self.page) * self.page)
        return new
