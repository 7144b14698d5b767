"""One attention site's KV in two tiers — the model's device and the host — placed by a
:class:`~llm_compile.runtime.tiers.plan.Plan` (ALISA's phases 1 and 2).

:class:`TieredKV` has the interface of :class:`~llm_compile.runtime.kv.buffer.SiteKV` (``append``,
``keys``/``values``, ``map_batch``, ``crop``, ``length``, ``state``) and hangs on the cache's
phantoms the same way, so the KV is owned by the sequence's cache. Storage: per tier a
:class:`~llm_compile.runtime.tiers.host.Rows` ``[slots, B, H, D + Dv]``; per token position its
tier (``loc``: 0 device, 1 host) and slot. Placement, after every append of a cache now ``n`` long::

    n <= p1                  every row on the device (phase 1)
    n >  p1                  positions t < n - recent, each decided once: host if plan.host_share(t)
                             (share alpha, evenly spread), else device (phase 2); if the device would
                             still hold more than plan.cap rows, the oldest device rows spill too
                             (counted in ``spilled``: alpha was planned for a shorter context)

Reads: :meth:`rows` gathers the rows a sparse step selected — one ``index_select`` on the device
tier and one on the host tier (K and V together), the host one started first on a worker thread
(CUDA: pinned memory and a side stream, :mod:`~llm_compile.runtime.tiers.fetch`) — and
:meth:`full` assembles every row (dense attention over tiers, prefill-like chunks, cache edits).
"""
from __future__ import annotations

import torch
from torch import Tensor

from llm_compile.runtime.kv.buffer import check_new_rows
from llm_compile.runtime.tiers import fetch
from llm_compile.runtime.tiers.host import Rows
from llm_compile.runtime.tiers.plan import Plan


def _no_positions() -> Tensor:
    """An empty position list, made per call. Never a module-level tensor: the first import of this
    module can happen while a pass runs under the compiler's fake-tensor mode, which would make
    that tensor fake for the life of the process (issue 14: a fake constant reached this real
    code at run time and ``aten.nonzero`` raised DynamicOutputShapeException)."""
    return torch.empty(0, dtype=torch.int64)


class HostTierFullError(RuntimeError):
    """The host tier reached ``kv_tiers.host_budget`` (phase 3, recompute, is not executed yet)."""


class TieredKV:
    def __init__(self, batch: int, heads: int, head_dim: int, v_dim: int, dtype: torch.dtype,
                 device: torch.device, state, plan: Plan, replan=None, *, mmap_dir: str | None = None,
                 prefetch: bool = True) -> None:
        self.shape = (batch, heads, head_dim, v_dim)
        self.dtype, self.device, self.state, self.plan = dtype, torch.device(device), state, plan
        self.replan, self.mmap_dir, self.prefetch = replan, mmap_dir, prefetch
        W = head_dim + v_dim
        self.dev = Rows(batch, heads, W, dtype, device, "device", limit=plan.cap)
        self.host = Rows(batch, heads, W, dtype, device, plan.host, mmap_dir)
        self.loc = torch.zeros(0, dtype=torch.int8)
        self.slot = torch.zeros(0, dtype=torch.int64)
        self.free: list[int] = []
        self.length = self.decided = self.spilled = self.moved = self.grown = self.n_dev = 0
        self._bh = (torch.arange(batch)[:, None, None] * heads + torch.arange(heads)[None, :, None])
        self.host_fetched = self.dev_fetched = 0
        """Rows gathered by sparse steps from each tier (counters for tests and benchmarks)."""

    # -- placement ---------------------------------------------------------------------------
    def _grow_index(self, n: int) -> None:
        if n > self.loc.shape[0]:
            cap = max(n, 2 * self.loc.shape[0], 256)
            loc, slot = torch.zeros(cap, dtype=torch.int8), torch.zeros(cap, dtype=torch.int64)
            loc[: self.length], slot[: self.length] = self.loc[: self.length], self.slot[: self.length]
            self.loc, self.slot = loc, slot

    def _to_host(self, n: int) -> Tensor:
        """Positions (< n) to move to the host tier now, ascending."""
        p = self.plan
        edge = n - p.recent
        if n <= p.p1 or edge <= self.decided:
            return _no_positions()
        pick = [t for t in range(self.decided, edge) if p.host_share(t)]
        self.decided = edge
        chosen = torch.tensor(pick, dtype=torch.int64)
        on_dev = self.n_dev + (n - self.length) - chosen.numel()
        if on_dev > p.cap:  # spill the oldest device rows left outside the recent window
            keep = torch.ones(n, dtype=torch.bool)
            keep[chosen] = False
            cand = torch.nonzero((self.loc[:edge] == 0) & keep[:edge]).flatten()[: on_dev - p.cap]
            self.spilled += cand.numel()
            chosen = torch.sort(torch.cat([chosen, cand])).values
        return chosen

    def append(self, k: Tensor, v: Tensor) -> None:
        check_new_rows(self.shape, k, v)
        n0, m = self.length, k.shape[2]
        n = n0 + m
        self._grow_index(n)
        self.loc[n0:n] = 0
        host_pos = self._to_host(n)
        rows = torch.cat([k, v.to(k.dtype)], -1).permute(2, 0, 1, 3)  # [m, B, H, W]
        if not host_pos.numel() and m == 1:  # the common decode step: one new row to the device
            slot = self.free.pop() if self.free else self.dev.used
            if slot == self.dev.used:
                self.dev.reserve(slot + 1)
                self.dev.used += 1
            self.dev.buf[slot] = rows[0]
            self.loc[n0], self.slot[n0] = 0, slot
            self.length, self.n_dev = n, self.n_dev + 1
            return
        old = host_pos[host_pos < n0]
        new_host = host_pos[host_pos >= n0]
        if self.plan.host_cap is not None and self.host.used + host_pos.numel() > self.plan.host_cap:
            raise HostTierFullError(
                f"llmaccel kv_tiers: the host tier is full at {n} tokens (host_budget: {self.plan.host_cap} "
                "tokens per layer); phase 3 (recompute) is not executed yet: raise kv_tiers.host_budget "
                "(or drop it: unlimited), or shorten the sequence")
        if old.numel():  # device -> host, one gather
            slots = self.slot[old]
            moved = self.dev.buf.index_select(0, slots.to(self.dev.device))
            first = self.host.append(moved)
            self.loc[old], self.slot[old] = 1, torch.arange(first, first + old.numel())
            self.free.extend(slots.tolist())
            self.moved += old.numel()
            self.n_dev -= old.numel()
        is_host = torch.zeros(m, dtype=torch.bool)
        is_host[new_host - n0] = True
        if new_host.numel():
            first = self.host.append(rows[is_host.to(rows.device)])
            self.loc[new_host], self.slot[new_host] = 1, torch.arange(first, first + new_host.numel())
        dev_pos = torch.nonzero(~is_host).flatten() + n0
        if dev_pos.numel():
            take = min(len(self.free), dev_pos.numel())
            reuse = [self.free.pop() for _ in range(take)]
            fresh = dev_pos.numel() - take
            self.dev.reserve(self.dev.used + fresh)
            slots = torch.tensor(reuse + list(range(self.dev.used, self.dev.used + fresh)), dtype=torch.int64)
            self.dev.used += fresh
            self.dev.write(slots, rows[(~is_host).to(rows.device)])
            self.loc[dev_pos], self.slot[dev_pos] = 0, slots
            self.n_dev += dev_pos.numel()
        self.length = n

    # -- reads -------------------------------------------------------------------------------
    def _split(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        D = self.shape[2]
        return rows[..., :D], rows[..., D:]

    def full(self) -> tuple[Tensor, Tensor]:
        """Every row, as K [B, H, n, D] and V [B, H, n, Dv] on the device (reads both tiers)."""
        B, H, D, Dv = self.shape
        n = self.length
        out = torch.empty(n, B, H, D + Dv, dtype=self.dtype, device=self.device)
        loc, slot = self.loc[:n], self.slot[:n]
        dpos, hpos = torch.nonzero(loc == 0).flatten(), torch.nonzero(loc == 1).flatten()
        if dpos.numel():
            out[dpos.to(self.device)] = self.dev.buf.index_select(0, slot[dpos].to(self.device))
        if hpos.numel():
            out[hpos.to(self.device)] = self.host.buf.index_select(0, slot[hpos]).to(self.device)
        k, v = self._split(out.permute(1, 2, 0, 3))
        return k, v

    def rows(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """K [B, H, P, D] and V [B, H, P, Dv] at positions ``idx`` [B, 1|H, P]: one gather per tier."""
        B, H, D, Dv = self.shape
        P = idx.shape[-1]
        ii = idx.expand(B, H, P).cpu()
        loc, slot = self.loc[ii], self.slot[ii]
        flat = slot * (B * H) + self._bh
        host = (loc == 1).flatten()
        nh = int(host.sum())
        pending = fetch.start(self.host.flat(), flat.flatten()[host], self.device, self.prefetch) if nh else None
        didx = torch.where(host, 0, flat.flatten()).to(self.device)
        out = self.dev.flat().index_select(0, didx)
        if pending is not None:
            out[host.to(self.device)] = fetch.finish(pending)
        self.host_fetched += nh
        self.dev_fetched += host.numel() - nh
        return self._split(out.view(B, H, P, D + Dv))

    def keys(self) -> Tensor:
        return self.full()[0]

    def values(self) -> Tensor:
        return self.full()[1]

    # -- cache edits (beam search, assisted decoding) -----------------------------------------
    def _rebuilt(self, k: Tensor, v: Tensor, state) -> "TieredKV":
        plan = self.plan if self.replan is None or k.shape[0] == self.shape[0] else self.replan(k.shape[0])
        new = TieredKV(k.shape[0], *self.shape[1:], self.dtype, self.device, state, plan, self.replan,
                       mmap_dir=self.mmap_dir, prefetch=self.prefetch)
        new.__dict__.update({a: b for a, b in self.__dict__.items() if a not in new.__dict__})
        new.append(k, v)
        return new

    def map_batch(self, fn) -> "TieredKV":
        k, v = self.full()
        return self._rebuilt(fn(k), fn(v), None if self.state is None else self.state.map_batch(fn))

    def crop(self, n: int) -> None:
        if n < self.length:
            k, v = self.full()
            state = None if self.state is None else self.state.crop(max(0, n))
            self.__dict__.update(self._rebuilt(k[:, :, :n], v[:, :, :n], state).__dict__)

    # -- accounting ----------------------------------------------------------------------------
    def device_tokens(self) -> int:
        return self.n_dev

    def host_tokens(self) -> int:
        return int((self.loc[: self.length] == 1).sum())

    def nbytes(self, allocated: bool = False) -> int:
        return (self.length if not allocated else self.dev.capacity + self.host.capacity) * self.plan.row_bytes
