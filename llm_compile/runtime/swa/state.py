"""Sparse window attention (ALISA) state: budgets, windowed token scores, token selection.

One :class:`SWAState` lives per (sequence batch, attention site), owned by the cache object of
the sequence (see :mod:`llm_compile.runtime.swa.op`); :mod:`llm_compile.runtime.swa.step` holds the
attention math and :mod:`llm_compile.runtime.swa.policies` the selection policies. Every tensor here has a leading batch dimension, and
nothing mixes batch rows, so each sequence of a batch keeps its own scores and token set.

Budget (ALISA Algorithm 1), at a decode step whose cache holds ``n`` tokens including the new one::

    k      = round_half_up(n * (1 - sparsity) / 2)
    total  = 2k tokens attended (dense if 2k >= n, or sparsity == 0)
    sinks  = min(sink_tokens, total - 1)           first tokens, always kept, taken from the budget
    recent = round_half_up(total * recent_fraction) most recent tokens (the newest is always kept)
    global = total - sinks - recent                 top-``global`` older tokens by score (ties at
                                                    the threshold: the earliest positions)
    ("streaming": global = 0, recent = total - sinks)

Query-aware policies ("quest", "recall"; issue 15) count every row a step reads, the summaries
their scorer reads included (:mod:`~llm_compile.runtime.swa.scorers`)::

    cap     = floor(n * (1 - sparsity))           token rows (K+V) a step may read
    summary = ceil(summary rows)                  "pages": ceil(n / page_size) * 2D / (D + Dv)
                                                  "sketch": (sketched tokens * bytes per token + one
                                                  key row) / K+V bytes of a row
    total   = cap - summary                       rows attended (no summaries when too few are
                                                  left: then total = cap and nothing is query-picked)
    sinks + recent + query + global = total       (recent/query from the policy's ``split``)

``Budget.reads`` is the rows read (``total`` + summary rows; "oracle": every key plus ``total`` values).

Scores. Token ``j``'s score is the sum of the attention weights it received over the last ``W``
steps (``W = score_window or k``; "h2o": over the whole history), summed over all query heads
(``selection="layer"``, one score row per sequence) or over the query heads of each KV head
(``"kv_head"``, one row per KV head). Each prompt query counts as a step (prefill seeds the
scores), then every decode step adds the weights of its kept tokens.

Windowed sums are exact: every step's weight row is kept (prompt rows dense ``[B, G, P, L]``, decode
rows sparse as ``(indices, weights)`` of the kept tokens, in a preallocated :class:`RowRing`); the
running sum adds a row when it enters the window and subtracts the same row when it leaves.
The ring is two tensors that grow geometrically and are reused step after step: keeping one small
tensor per step instead fragmented the C heap (the transient per-step buffers grow with the
context and could no longer reuse the holes between long-lived rows), and a 30-layer model's
resident memory grew by ~10 MB per decode step at 2k-4k context.
To make add-then-subtract exact, weights enter the sum as fixed-point integers
(``round(w * 2**36)``, int64): quantisation is deterministic, so a row leaving the window removes
exactly what it added, and the running sum equals the windowed sum of the quantised weights
(resolution 1.5e-11, below float32 precision of any weight that can matter for a ranking).
A decode step's weights enter the sums per query head (each head's weights quantised, then summed
over the group: integers, so the C kernels (:mod:`~llm_compile.runtime.swa.native`) and torch give
the same bits). On a CPU state the step's bookkeeping (a row leaving, the top-``global`` selection,
the new row entering) is three C calls; torch where the library is unavailable and on GPUs.
Memory: about ``W * total`` decode entries (12 bytes; the ring keeps up to ~25 % spare) plus
``W0 * L`` prompt weights per group, where ``W0`` is the window at the first decode step; prompt
rows are freed once they leave the window.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from llm_compile.runtime.swa import native
from llm_compile.runtime.swa.policies import half_budget, policy_of, round_half_up  # noqa: F401
from llm_compile.runtime.swa.ring import RowRing
from llm_compile.runtime.swa.scorers import scorer_of

log = logging.getLogger(__name__)

FIXED_POINT_BITS = 36
_FIXED_SCALE = float(2 ** FIXED_POINT_BITS)


def quantize_weights(w: Tensor) -> Tensor:
    """Attention weights (float) -> fixed-point int64 used in the running score sums."""
    return torch.round(w.float() * _FIXED_SCALE).to(torch.int64)


def group_sum(w: Tensor, groups: int) -> Tensor:
    """Per-head weights [B, Hq, ..., T] -> per-group sums [B, G, ..., T] (G = 1 or KV heads)."""
    B, Hq = w.shape[:2]
    return w.reshape(B, groups, Hq // groups, *w.shape[2:]).sum(2)




@dataclass(frozen=True)
class Budget:
    """How many tokens a decode step attends, and how they are chosen."""

    n: int
    """Tokens in the cache including the new one."""
    k: int
    """ALISA's ``k = round(n * (1 - sparsity) / 2)``."""
    total: int
    """Tokens attended (``2k``, or ``n`` when dense)."""
    sinks: int
    recent: int
    global_: int
    padded: int
    """``total`` rounded up to a multiple of ``bucket``: the shape the kernels see."""
    window: int | None
    """Score window in steps (``None``: whole history, or no scores needed)."""
    dense: bool
    query: int = 0
    """Tokens picked for the current query (page bounds, or exact scores for "oracle")."""
    pages: int = 0
    """Page summaries read (0: none; the "pages" scorer)."""
    summary: float = 0.0
    """Token rows the query scorer's summaries cost this step (0: none)."""
    reads: float = 0.0
    """Token rows (K+V of one token, all KV heads) the step reads, summaries included."""

    @property
    def read_fraction(self) -> float:
        """``reads / n``: the step's share of a dense step's KV bytes."""
        return self.reads / self.n

    def describe(self) -> str:
        if self.dense:
            return f"n={self.n}: dense"
        q = f" + {self.query} query" if self.query else ""
        pg = f", {self.pages} page summaries" if self.pages else (
            f", summaries {self.summary:.1f} rows" if self.summary else "")
        return (f"n={self.n}: k={self.k}, {self.sinks} sink + {self.recent} recent + "
                f"{self.global_} global{q} = {self.total} (padded {self.padded}){pg}; reads "
                f"{self.reads:.1f} rows = {100 * self.read_fraction:.1f}% of dense")


def compute_budget(n: int, cfg, head_dim: int | None = None, v_dim: int | None = None,
                   itemsize: int = 4) -> Budget:
    """The budget of a decode step over ``n`` tokens under ``cfg`` (an ``SWAConfig``).
    ``head_dim``/``v_dim`` (K and V head sizes, equal when not given) and ``itemsize`` (bytes per
    cached value) weigh the query scorer's summaries."""
    policy = policy_of(cfg)
    k = half_budget(n, cfg)
    window = policy.window(k, cfg)
    if cfg.sparsity == 0 or 2 * k >= n:
        return Budget(n, k, n, 0, n, 0, n, window, True, reads=float(n))
    if policy.pages:
        return _paged_budget(n, k, window, cfg, policy, head_dim, v_dim, itemsize)
    total = max(2 * k, 1)
    sinks = min(cfg.sink_tokens, total - 1)
    rest = total - sinks
    recent, query = policy.split(n, rest, cfg) if policy.exact else (policy.recent(rest, total, cfg), 0)
    padded = -(-total // cfg.bucket) * cfg.bucket
    reads = (n + total) / 2 if policy.exact else float(total)
    if policy.exact and head_dim and v_dim:
        reads = (n * head_dim + total * v_dim) / (head_dim + v_dim)
    return Budget(n, k, total, sinks, recent, rest - recent - query, padded, window, False,
                  query=query, reads=reads)


def _paged_budget(n, k, window, cfg, policy, head_dim, v_dim, itemsize) -> Budget:
    cap = max(1, int(math.floor(round(n * (1.0 - cfg.sparsity), 9))))
    d, dv = head_dim or 64, v_dim or head_dim or 64
    scorer = scorer_of(cfg)
    rows, pages = scorer.summary_rows(n, cfg, d, dv, itemsize)
    total = cap - int(math.ceil(round(rows, 9)))
    if total < scorer.min_total(cfg):  # too small for summaries to pay: none, nothing query-picked
        total, pages, rows = cap, 0, 0.0
    sinks = min(cfg.sink_tokens, total - 1)
    rest = total - sinks
    recent, query = policy.split(n, rest, cfg) if rows else (policy.recent(rest, total, cfg), 0)
    if not rows and not policy.needs_scores:
        recent = rest
    padded = -(-total // cfg.bucket) * cfg.bucket
    return Budget(n, k, total, sinks, recent, rest - recent - query, padded, window, False,
                  query=query, pages=pages, summary=rows, reads=total + rows)


def describe_policy(cfg) -> str:
    """Human-readable budget rule of a config (for pass reports)."""
    if cfg.sparsity == 0:
        return "dense (sparsity 0)"
    rule = f"k=round(n*{1 - cfg.sparsity:.3g}/2); 2k tokens"
    return f"{cfg.policy}: {rule} = {policy_of(cfg).describe(cfg)}, bucket {cfg.bucket}"


class SWAState:
    """Scores and score history of one attention site for one batch of sequences.

    ``groups`` is 1 (``selection="layer"``) or the number of KV heads (``"kv_head"``).
    """

    def __init__(self, batch: int, groups: int, device: torch.device | str, windowed: bool = True):
        self.batch = batch
        self.groups = groups
        self.device = torch.device(device)
        self.windowed = windowed
        """``False`` for "h2o": scores accumulate forever, no history is kept."""
        self.n = 0
        """Tokens the scores cover (the cache length after the last call)."""
        self._buf = torch.zeros(batch, groups, 0, dtype=torch.int64, device=self.device)
        self.rows = RowRing(batch, groups, self.device)
        """Decode steps in the window, oldest first (indices and fixed-point weights)."""
        self.prompt_rows: Tensor | None = None
        """Prompt (or chunk) query rows that may still be in the window, oldest first: [B,G,P,L]."""
        self.prompt_in = 0
        """How many of the newest ``prompt_rows`` are counted in the scores."""
        self.steps = 0
        self.last_indices: Tensor | None = None
        """Tokens kept at the last sparse step ([B, G, total], sorted), for tests and debugging."""
        self.last_budget: Budget | None = None
        self.summary = None
        """What the query scorer reads (:mod:`~llm_compile.runtime.swa.scorers`: page summaries or
        a key sketch) for "quest"/"recall"; ``None`` for the other policies."""

    # -- cache operations (beam search, assisted decoding) ------------------------------------
    def map_batch(self, fn) -> "SWAState":
        """A copy whose batch rows are ``fn`` of these (``index_select``, ``repeat_interleave``)."""
        new = copy.copy(self)
        new._buf = fn(self._buf)
        new.batch = new._buf.shape[0]
        new.rows = copy.copy(self.rows)
        new.rows.map_batch(fn)
        new.prompt_rows = None if self.prompt_rows is None else fn(self.prompt_rows)
        new.last_indices = None if self.last_indices is None else fn(self.last_indices)
        new.summary = None if self.summary is None else self.summary.map_batch(fn)
        return new

    def crop(self, n: int) -> "SWAState":
        """A copy covering the first ``n`` tokens only: the steps of the dropped tokens leave the
        scores (decode rows newest first, then the prompt/chunk query rows at positions >= n).
        Exact for windowed scores ("alisa"); "h2o" totals can only be truncated."""
        new = self.map_batch(lambda t: t.clone())
        if new.summary is not None:
            new.summary = new.summary.crop(n)
        if n >= new.n:
            return new
        drop = new.n - n
        d = min(len(new.rows), drop) if new.windowed else 0
        if d:
            idx, wq = new.rows.pop_newest(d)
            new._buf.scatter_add_(2, idx, -wq)
        if new.prompt_rows is not None:
            P, L = new.prompt_rows.shape[2], new.prompt_rows.shape[3]
            gone = min(P, max(0, L - n))           # prompt rows sit at positions L-P .. L-1
            counted = min(gone, new.prompt_in)
            if counted:
                new._buf[:, :, :L] -= quantize_weights(new.prompt_rows[:, :, P - counted:]).sum(2)
            new.prompt_in -= counted
            new.prompt_rows = new.prompt_rows[:, :, : P - gone, :n] if P > gone else None
            if new.prompt_rows is None:
                new.prompt_in = 0
        new.n = n
        new.last_indices = None
        return new

    # -- bookkeeping -------------------------------------------------------------------------
    @property
    def score(self) -> Tensor:
        """Current (windowed) fixed-point scores, [B, G, n] int64."""
        return self._buf[:, :, : self.n]

    def matches(self, batch: int, groups: int, n: int, device: torch.device) -> bool:
        return (self.batch, self.groups, self.n, self.device) == (batch, groups, n, torch.device(device))

    def grow(self, n: int) -> None:
        """Cover ``n`` tokens; new tokens start with score 0 (capacity doubles, amortised O(1))."""
        if n <= self.n:
            self.n = n
            return
        cap = self._buf.shape[-1]
        if n > cap:
            new = torch.zeros(self.batch, self.groups, max(n, 2 * cap, 64), dtype=torch.int64,
                              device=self.device)
            new[:, :, : self.n] = self.score
            self._buf = new
        else:
            self._buf[:, :, self.n: n] = 0
        self.n = n

    def window_len(self) -> int:
        return len(self.rows) + self.prompt_in

    # -- scores ------------------------------------------------------------------------------
    def seed(self, rows: Tensor | None = None, totals: Tensor | None = None,
             accumulate: bool = False) -> None:
        """Scores from prompt queries: ``rows`` [B,G,P,L] (kept for the window) or ``totals``
        [B,G,L] int64 (already-summed fixed-point weights, for "h2o"; ``accumulate`` adds them to
        the history instead of replacing it)."""
        if accumulate and totals is not None:
            self.grow(totals.shape[-1])
            self.score[:] += totals
            return
        self.rows.clear()
        if rows is not None:
            L = rows.shape[-1]
            self.grow(L)
            self.score[:] = quantize_weights(rows).sum(2)
            self.prompt_rows = rows if self.windowed else None
            self.prompt_in = rows.shape[2] if self.windowed else 0
        else:
            self.grow(totals.shape[-1])
            self.score[:] = totals
            self.prompt_rows, self.prompt_in = None, 0

    def trim(self, window: int | None) -> None:
        """Drop the oldest steps until at most ``window`` steps are counted in the scores."""
        if window is None or not self.windowed:
            return
        extra = self.window_len() - window
        if extra <= 0:
            return
        if self.prompt_in:
            drop = min(extra, self.prompt_in)
            P, L = self.prompt_rows.shape[2], self.prompt_rows.shape[3]
            lo = P - self.prompt_in
            self._buf[:, :, :L] -= quantize_weights(self.prompt_rows[:, :, lo: lo + drop]).sum(2)
            self.prompt_in -= drop
            extra -= drop
            if self.prompt_in == 0:
                self.prompt_rows = None
        if extra == 1:   # the usual step: one row leaves (C kernel, or torch)
            idx, wq = self.rows.pop_oldest()
            if not native.score_sub(self._buf, idx, wq):
                self._buf.scatter_add_(2, idx.long(), -wq)
        elif extra:
            idx, wq = self.rows.pop(extra)
            self._buf.scatter_add_(2, idx, -wq)

    def add(self, idx: Tensor, w: Tensor) -> None:
        """A step's weights ``w`` [B,G,T] on tokens ``idx`` [B,G,T] enter the scores."""
        self._add_fixed(idx, quantize_weights(w))

    def _add_fixed(self, idx: Tensor, wq: Tensor) -> None:
        self._buf.scatter_add_(2, idx, wq)
        if self.windowed:
            self.rows.push(idx, wq)
        self.steps += 1

    def add_heads(self, idx: Tensor, w: Tensor, total: int) -> None:
        """The first ``total`` slots of a step enter the scores from its per-head weights ``w``
        [B, Hq, >=total] on the tokens ``idx`` [B, G, >=total]: each head's weights quantised,
        then summed per group (exact integers: the same in any order). One C call on a CPU state
        (quantisation, group sum, scatter, ring row), else torch."""
        if w.device == self._buf.device and not w.is_cuda and native.library() is not None:
            ring = self.rows.claim(total) if self.windowed else (None, None)
            if native.score_add(self._buf, w, idx, total, *ring):
                self.steps += 1
                return
            if self.windowed:
                self.rows.pop_newest(1)   # the claimed row, unfilled
        self._add_fixed(idx[..., :total], group_sum(quantize_weights(w[..., :total]), self.groups))
    # -- selection ---------------------------------------------------------------------------
    def select(self, b: Budget) -> Tensor:
        """Kept tokens of a sparse step: [B, G, b.padded] int64, the first ``b.total`` valid
        (sinks, then global sorted by position, then recent), padding slots point at token 0."""
        B, G, n, dev = self.batch, self.groups, b.n, self.device
        idx = native.select_top(self.score, n, b.sinks, b.recent, b.global_, b.padded)
        if idx is None:
            parts = [torch.arange(b.sinks, device=dev).expand(B, G, b.sinks)]
            if b.global_:
                parts.append(top_positions(self.score[:, :, b.sinks: n - b.recent], b.global_) + b.sinks)
            parts.append(torch.arange(n - b.recent, n, device=dev).expand(B, G, b.recent))
            if b.padded > b.total:
                parts.append(torch.zeros(B, G, b.padded - b.total, dtype=torch.int64, device=dev))
            idx = torch.cat(parts, dim=-1)
        self.last_indices = idx[:, :, : b.total]
        self.last_budget = b
        return idx


def top_positions(score: Tensor, k: int) -> Tensor:
    """Positions [..., k] (ascending) of the ``k`` largest of ``score`` [..., m]; ties at the
    threshold go to the earliest positions (as the C kernel ``select_top`` does)."""
    if k >= score.shape[-1]:
        return torch.arange(score.shape[-1], device=score.device).expand(*score.shape[:-1], score.shape[-1])
    thr = torch.topk(score, k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above = score > thr
    at = score == thr
    take = above | (at & (at.cumsum(-1) <= k - above.sum(-1, keepdim=True)))
    m = score.shape[-1]
    pos = torch.arange(m, device=score.device)
    return torch.sort(torch.where(take, pos, m), dim=-1).values[..., :k]   # no host sync (GPU)
