"""One attention site's KV in tiers — the model's device, the host, and (phase 3) tokens that keep
only their layer input and are recomputed — placed by a :class:`~llm_compile.runtime.tiers.plan.Plan`
(ALISA's three phases).

:class:`TieredKV` has the interface of :class:`~llm_compile.runtime.kv.buffer.SiteKV` (``append``,
``keys``/``values``, ``map_batch``, ``crop``, ``length``, ``state``) and hangs on the cache's
phantoms the same way, so the KV is owned by the sequence's cache. Storage: per tier a
:class:`~llm_compile.runtime.tiers.host.Rows` ``[slots, B, H, D + Dv]`` (the recompute tier:
``[slots, B, 1, kept]``, the layer input and RoPE rows of :mod:`~llm_compile.runtime.tiers.recompute`,
in host memory of the host tier's kind); per token position its tier (``loc``: 0 device, 1 host,
2 recompute) and slot. Placement, after every append of a cache now ``n`` long::

    n <= p1                  every row on the device (phase 1)
    n >  p1                  positions t < n - recent, each decided once: host if plan.host_share(t)
                             (share alpha, evenly spread), else device (phase 2); if the device would
                             still hold more than plan.cap rows, the oldest device rows spill too
                             (counted in ``spilled``: alpha was planned for a shorter context)
    n >  p2 (beta > 0)       positions decided now (or once the host tier holds plan.host_cap K/V
                             rows: p2 = p1 + host_cap is the plan's estimate): share beta
                             (plan.rec_share) keep only their kept row (phase 3; their device row is
                             freed), the rest as in phase 2

The host tier's K/V rows and kept rows together stay within ``plan.host_layer_bytes`` (host_budget
per layer), K/V rows within ``plan.host_cap``: a step that would go past either raises
HostTierFullError before it moves a row.

Phase 3 needs the kept rows of positions not decided yet: with ``plan.beta > 0`` the op passes each
call's kept rows (``append(k, v, kept)``) and the store holds those of the last ``recent`` positions
(``pend``; device, at most ``recent + 1`` rows kept alive, counted in the plan's device ``cap``).
A position left undecided longer (only before p1, so only when p2 < p1 + recent)
has none and is placed as in phase 2.

Reads: :meth:`rows` gathers the rows a sparse step selected — one ``index_select`` on the device
tier and one on the host tier (K and V together), the host one started first on a worker thread
(CUDA: pinned memory and a side stream, :mod:`~llm_compile.runtime.tiers.fetch`), and
recomputes the selected phase-3 tokens (each (token, sequence) once, all heads) — and :meth:`full`
assembles every row, recomputing every phase-3 token (dense attention over tiers). Cache edits
(``map_batch``, ``crop``) keep the placement: :mod:`~llm_compile.runtime.tiers.edit`.
``recompute`` (a :class:`~llm_compile.runtime.tiers.recompute.KVRecompute`: the projection weights
of the current call, graph inputs) is set by the op at every call before it appends or reads.
"""
from __future__ import annotations

import torch
from torch import Tensor

from llm_compile.runtime.kv.buffer import check_new_rows
from llm_compile.runtime.tiers import edit, fetch
from llm_compile.runtime.tiers.host import Rows
from llm_compile.runtime.tiers.plan import Plan


def _no_positions() -> Tensor:
    """An empty position list, made per call. Never a module-level tensor: the first import of this
    module can happen while a pass runs under the compiler's fake-tensor mode, which would make
    that tensor fake for the life of the process (issue 14: a fake constant reached this real
    code at run time and ``aten.nonzero`` raised DynamicOutputShapeException)."""
    return torch.empty(0, dtype=torch.int64)


class HostTierFullError(RuntimeError):
    """The host tier reached ``kv_tiers.host_budget`` and phase 3 does not take the tokens that do
    not fit (``beta`` 0 or < 1, or a model whose recompute frees no memory)."""


class TieredKV:
    def __init__(self, batch: int, heads: int, head_dim: int, v_dim: int, dtype: torch.dtype,
                 device: torch.device, state, plan: Plan, replan=None, *, mmap_dir: str | None = None,
                 prefetch: bool = True) -> None:
        self.shape = (batch, heads, head_dim, v_dim)
        self.dtype, self.device, self.state, self.plan = dtype, torch.device(device), state, plan
        self.replan, self.mmap_dir, self.prefetch = replan, mmap_dir, prefetch
        W = head_dim + v_dim
        self.dev = Rows(batch, heads, W, dtype, device, "device", limit=plan.cap)
        self.host = Rows(batch, heads, W, dtype, device, plan.host, mmap_dir, limit=plan.host_cap)
        self.loc = torch.zeros(0, dtype=torch.int8)
        self.slot = torch.zeros(0, dtype=torch.int64)
        self.free: list[int] = []
        self.length = self.decided = self.spilled = self.moved = self.grown = self.n_dev = 0
        self._bh = edit.batch_index(batch, heads)
        self.host_fetched = self.dev_fetched = 0
        """Rows gathered by sparse steps from each tier (counters for tests and benchmarks)."""
        self.rec: Rows | None = None
        self.recompute = None
        self.pend: Tensor | None = None
        self.pend0 = 0
        self.recomputed = 0
        self.checked: set[str] = set()
        """Recompute specs already checked against the model's K/V (one per graph form)."""
        """(token, sequence) pairs whose K/V were recomputed (sparse and dense reads)."""

    # -- placement ---------------------------------------------------------------------------
    def _grow_index(self, n: int) -> None:
        if n > self.loc.shape[0]:
            cap = max(n, 2 * self.loc.shape[0], 256)
            loc, slot = torch.zeros(cap, dtype=torch.int8), torch.zeros(cap, dtype=torch.int64)
            loc[: self.length], slot[: self.length] = self.loc[: self.length], self.slot[: self.length]
            self.loc, self.slot = loc, slot

    def _to_host(self, n: int) -> tuple[Tensor, Tensor]:
        """Positions (< n) to move to the host tier and to the recompute tier now, ascending."""
        p = self.plan
        edge = n - p.recent
        if n <= p.p1 or edge <= self.decided:
            return _no_positions(), _no_positions()
        phase3 = self.pend is not None and p.beta > 0 and p.p2 is not None
        past_p2 = phase3 and n > p.p2
        room = float("inf") if p.host_cap is None else p.host_cap - self.host.used
        pick, rec = [], []
        for t in range(self.decided, edge):
            if (phase3 and (past_p2 or len(pick) >= room) and self.pend0 <= t < self.pend0 + len(self.pend)
                    and p.rec_share(t)):
                rec.append(t)
            elif p.host_share(t):
                pick.append(t)
        self.decided = edge
        chosen, rec_pos = torch.tensor(pick, dtype=torch.int64), torch.tensor(rec, dtype=torch.int64)
        on_dev = self.n_dev + (n - self.length) - chosen.numel() - rec_pos.numel()
        if on_dev > p.cap:  # spill the oldest device rows left outside the recent window
            keep = torch.ones(n, dtype=torch.bool)
            keep[chosen] = False
            keep[rec_pos] = False
            cand = torch.nonzero((self.loc[:edge] == 0) & keep[:edge]).flatten()[: on_dev - p.cap]
            self.spilled += cand.numel()
            chosen = torch.sort(torch.cat([chosen, cand])).values
        return chosen, rec_pos

    def _keep_pending(self, n0: int, kept: Tensor | None) -> None:
        """Add this call's kept rows [m, B, W] to the pending ones (positions not decided yet)."""
        if kept is None or self.plan.beta <= 0:
            return
        if self.pend is None or self.pend0 + self.pend.shape[0] != n0:
            self.pend, self.pend0 = kept, n0
        else:
            self.pend = torch.cat([self.pend, kept])
        if self.rec is None:
            B, H = self.shape[:2]
            self.rec = Rows(B, 1, kept.shape[-1], kept.dtype, self.device, self.plan.host, self.mmap_dir,
                            limit=self.plan.kept_cap)

    def _trim_pending(self, n: int) -> None:
        """Drop the kept rows of decided positions. Past one row (a prefill) the rest is copied, so
        that at most ``recent + 1`` kept rows stay on the device (the plan counts them there)."""
        if self.pend is not None:
            first = max(self.decided, n - self.plan.recent, self.pend0)
            drop = first - self.pend0
            self.pend, self.pend0 = (self.pend[drop:].clone() if drop > 1 else self.pend[drop:]), first

    def _check_host(self, n: int, kv_rows: int, kept_rows: int) -> None:
        """Raise :class:`HostTierFullError` unless the host tier takes ``kv_rows`` more K/V rows
        (at most ``plan.host_cap``) and ``kept_rows`` more kept rows, all within the host budget."""
        p = self.plan
        if p.host_cap is None or not (kv_rows or kept_rows):
            return
        kept_b = 0 if self.rec is None else self.rec.row_nbytes()
        need = self.host_nbytes() + kv_rows * p.row_bytes + kept_rows * kept_b
        if self.host.used + kv_rows <= p.host_cap and need <= p.host_layer_bytes:
            return
        raise HostTierFullError(
            f"llmaccel kv_tiers: the host tier is full at {n} tokens (host_budget: {p.host_layer_bytes} B per layer "
            f"for {p.host_cap} K/V tokens of {p.row_bytes} B and the phase-3 kept rows of {kept_b} B; it would "
            f"hold {need} B) and phase 3 takes no more of them (beta = {p.beta}: {p.reasons.get('beta', '')}; "
            f"p2: {p.reasons.get('p2', '')}): raise kv_tiers.host_budget (or drop it: unlimited), raise "
            "kv_tiers.beta (multi-head attention models) or max_context (the plan's room for kept rows), "
            "or shorten the sequence")

    def _to_recompute(self, rec_pos: Tensor, n0: int) -> None:
        """Phase 3: positions ``rec_pos`` keep only their kept row; their device rows (if any) are freed."""
        first = self.rec.append(self.pend[rec_pos - self.pend0].unsqueeze(2))
        old = rec_pos[rec_pos < n0]
        if old.numel():
            self.free.extend(self.slot[old].tolist())
            self.n_dev -= old.numel()
        self.loc[rec_pos], self.slot[rec_pos] = 2, torch.arange(first, first + rec_pos.numel())

    def append(self, k: Tensor, v: Tensor, kept: Tensor | None = None) -> None:
        """Store ``k``/``v`` [B, H, m, D|Dv]; ``kept`` [m, B, W]: their kept rows (phase 3)."""
        check_new_rows(self.shape, k, v)
        n0, m = self.length, k.shape[2]
        n = n0 + m
        self._grow_index(n)
        self.loc[n0:n] = 0
        self._keep_pending(n0, kept)
        host_pos, rec_pos = self._to_host(n)
        self._check_host(n, host_pos.numel(), rec_pos.numel())
        if rec_pos.numel():
            self._to_recompute(rec_pos, n0)
        self._trim_pending(n)
        rows = torch.cat([k, v.to(k.dtype)], -1).permute(2, 0, 1, 3)  # [m, B, H, W]
        if not host_pos.numel() and not rec_pos.numel() and m == 1:  # common decode step: one new row to the device
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
        is_rec = torch.zeros(m, dtype=torch.bool)
        is_rec[rec_pos[rec_pos >= n0] - n0] = True
        to_dev = ~is_host & ~is_rec
        dev_pos = torch.nonzero(to_dev).flatten() + n0
        if dev_pos.numel():
            take = min(len(self.free), dev_pos.numel())
            reuse = [self.free.pop() for _ in range(take)]
            fresh = dev_pos.numel() - take
            self.dev.reserve(self.dev.used + fresh)
            slots = torch.tensor(reuse + list(range(self.dev.used, self.dev.used + fresh)), dtype=torch.int64)
            self.dev.used += fresh
            self.dev.write(slots, rows[to_dev.to(rows.device)])
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
        rpos = torch.nonzero(loc == 2).flatten()
        if rpos.numel():  # dense: every phase-3 token recomputed
            kept = self.rec.buf.index_select(0, slot[rpos]).to(self.device)  # [r, B, 1, W]
            out[rpos.to(self.device)] = self._recompute(kept.reshape(rpos.numel() * B, -1)).view(-1, B, H, D + Dv)
        k, v = self._split(out.permute(1, 2, 0, 3))
        return k, v

    def rows(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """K [B, H, P, D] and V [B, H, P, Dv] at positions ``idx`` [B, 1|H, P]: one gather per tier."""
        B, H, D, Dv = self.shape
        P = idx.shape[-1]
        ii = idx.expand(B, H, P).cpu()
        loc, slot = self.loc[ii], self.slot[ii]
        flat = slot * (B * H) + self._bh
        host, rec = (loc == 1).flatten(), (loc == 2).flatten()
        nh, nr = int(host.sum()), int(rec.sum())
        pending = fetch.start(self.host.flat(), flat.flatten()[host], self.device, self.prefetch) if nh else None
        didx = torch.where(host | rec, 0, flat.flatten()).to(self.device)
        out = self.dev.flat().index_select(0, didx)
        if nr:
            out[rec.to(self.device)] = self._recompute_selected(slot.flatten()[rec], torch.nonzero(rec).flatten(), P)
        if pending is not None:
            out[host.to(self.device)] = fetch.finish(pending)
        self.host_fetched += nh
        self.dev_fetched += host.numel() - nh - nr
        return self._split(out.view(B, H, P, D + Dv))

    def _recompute(self, kept: Tensor) -> Tensor:
        """K and V ``[U, H, D + Dv]`` of kept rows ``[U, W]`` (one per (token, sequence))."""
        if self.recompute is None:
            raise RuntimeError("llmaccel kv_tiers: phase-3 tokens to read but no recompute inputs "
                               "(the op sets them at every call)")
        self.recomputed += kept.shape[0]
        return self.recompute.kv(kept).to(self.dtype)

    def _recompute_selected(self, slots: Tensor, entries: Tensor, P: int) -> Tensor:
        """Rows for the selected entries (flat ``(b, h, p)`` indices) in phase 3: each selected
        (token, sequence) recomputed once for all heads, then the entry's head picked."""
        B, H = self.shape[:2]
        b, h = entries // (H * P), (entries // P) % H
        uniq, inv = torch.unique(slots * B + b, return_inverse=True)   # rec.flat(): slot * B + b
        kv = self._recompute(self.rec.flat().index_select(0, uniq).to(self.device))
        return kv[inv.to(self.device), h.to(self.device)]

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
        """Beam search's reorder and batch edits: every tier, kept rows included, gathered in place
        (:func:`~llm_compile.runtime.tiers.edit.map_batch`)."""
        return edit.map_batch(self, fn, HostTierFullError)

    def crop(self, n: int) -> None:
        """Keep the first ``n`` positions where they are (:func:`~llm_compile.runtime.tiers.edit.crop`)."""
        edit.crop(self, n)

    # -- accounting ----------------------------------------------------------------------------
    def device_tokens(self) -> int:
        return self.n_dev

    def host_tokens(self) -> int:
        return int((self.loc[: self.length] == 1).sum())

    def recompute_tokens(self) -> int:
        """Positions in phase 3 (only their kept row stored)."""
        return int((self.loc[: self.length] == 2).sum())

    def host_nbytes(self, allocated: bool = False) -> int:
        """Bytes the host tier holds (one layer): K/V rows and the phase-3 kept rows."""
        rec = 0 if self.rec is None else self.rec.nbytes(allocated)
        return self.host.nbytes(allocated) + rec

    def pending_nbytes(self) -> int:
        """Device bytes of the kept rows not decided yet (the storage they keep alive)."""
        return 0 if self.pend is None else self.pend.untyped_storage().nbytes()

    def nbytes(self, allocated: bool = False) -> int:
        """Bytes of K+V rows held (device and host tiers) plus the phase-3 kept rows."""
        rec = 0 if self.rec is None else self.rec.nbytes(allocated)
        if allocated:
            return (self.dev.capacity + self.host.capacity) * self.plan.row_bytes + rec
        return (self.length - self.recompute_tokens()) * self.plan.row_bytes + rec
