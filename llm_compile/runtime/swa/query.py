"""Token selection of the query-aware policies ("quest", "recall", "oracle"; issue 15).

One decode step over ``n`` tokens with budget ``b`` (:func:`~llm_compile.runtime.swa.state.compute_budget`)
picks, with no token twice and exactly ``b.total`` tokens per sequence (and per KV head with
``selection="kv_head"``)::

    sinks   first b.sinks tokens
    recent  last b.recent tokens
    query   top b.query other tokens by the query's score of their page:
              quest/recall: per head, a softmax of the scorer's logits (``swa.scorer``,
                            :mod:`~llm_compile.runtime.swa.scorers`), summed over the heads of the
                            group: "pages" bounds per page (a token inherits its page's score, so
                            whole pages are taken in order of score, the last one possibly in
                            part), "sketch" approximate logits per token
              oracle:       the exact attention weights of the query over every key (reads all keys)
    global  top b.global_ remaining tokens by the history scores (recall: ALISA's windowed sums)

Nothing here computes ``q K^T`` over the whole cache except "oracle": quest/recall read the
summaries (page min/max, or the low-bit key sketch) and then the selected rows.

On a CPU, quest/recall pick with one C call after the scorer's logits
(:func:`~llm_compile.runtime.swa.native.query_select`: softmax, group sum, both picks, position
order); elsewhere (GPU, no C compiler, ``LLMACCEL_NATIVE=0``) the torch path below does the same
with :func:`~llm_compile.runtime.swa.state.top_positions`. On both, ties at either threshold go to
the earliest positions (a page scorer's tokens tie within a page: the threshold page is taken from
its first token on). The two softmaxes differ in the last bits, so the paths keep the same tokens
except where scores nearly tie at a threshold.
"""
from __future__ import annotations

import torch
from torch import Tensor

from llm_compile.runtime.swa import native
from llm_compile.runtime.swa.policies import policy_of
from llm_compile.runtime.swa.scorers import scorer_of
from llm_compile.runtime.swa.state import Budget, SWAState, group_sum, top_positions

_NEG_INF = float("-inf")


def query_scores(state: SWAState, b: Budget, q: Tensor, kc: Tensor, kn: Tensor | None, scale: float,
                 cfg, use_triton: bool, source=None) -> Tensor:
    """Per-token scores [B, G, n] fp32 of the current query (see the module docstring)."""
    G = state.groups
    if policy_of(cfg).exact:
        kf = kc if kn is None else torch.cat([kc, kn], dim=-2)
        logits = torch.matmul(q.float().reshape(q.shape[0], kf.shape[1], -1, q.shape[-1]),
                              kf.float().transpose(-1, -2)).mul_(scale)
        w = torch.softmax(logits, dim=-1).reshape(q.shape[0], q.shape[1], -1)
        return group_sum(w, G)
    scorer = scorer_of(cfg)
    w = scorer.weights(state.summary, q, kc, kn, scale, b.n, use_triton, source)  # [B, Hq, units]
    return scorer.to_tokens(group_sum(w, G), state.summary, b.n)


def select(state: SWAState, b: Budget, q: Tensor, kc: Tensor, kn: Tensor | None, scale: float,
           cfg, use_triton: bool = False, source=None) -> Tensor:
    """Kept tokens [B, G, b.padded] int64 of a query-aware step, sorted, first ``b.total`` valid,
    padding slots pointing at token 0. ``q`` [B, Hq, D]; ``kc`` the key cache (without the new token
    when ``kn`` is given), or None with ``source`` (tiered KV, read by position: sketch only)."""
    B, G, n, dev = state.batch, state.groups, b.n, state.device
    if b.query and not policy_of(cfg).exact and not q.is_cuda and not use_triton and native.library():
        scorer = scorer_of(cfg)
        logits = scorer.logits(state.summary, q, kc, kn, scale, n, use_triton, source)
        idx = native.query_select(logits.float(), scorer.unit(state.summary),
                                  state.score if b.global_ else None, n, b.sinks, b.recent, b.query,
                                  b.global_, b.padded, G)
        if idx is not None:
            return _record(state, b, idx)
    taken = torch.zeros(B, G, n, dtype=torch.bool, device=dev)
    taken[..., : b.sinks] = True
    taken[..., n - b.recent:] = True
    parts = [torch.arange(b.sinks, device=dev).expand(B, G, b.sinks),
             torch.arange(n - b.recent, n, device=dev).expand(B, G, b.recent)]
    if b.query:
        sc = query_scores(state, b, q, kc, kn, scale, cfg, use_triton, source).masked_fill_(taken, _NEG_INF)
        top = top_positions(sc, b.query)        # ties: the earliest positions, as in C
        taken.scatter_(2, top, True)
        parts.append(top)
    if b.global_:
        hist = state.score.masked_fill(taken, torch.iinfo(torch.int64).min)
        parts.append(top_positions(hist, b.global_))
    idx = torch.sort(torch.cat(parts, dim=-1), dim=-1).values
    if b.padded > b.total:
        idx = torch.cat([idx, torch.zeros(B, G, b.padded - b.total, dtype=torch.int64, device=dev)], -1)
    return _record(state, b, idx)


def _record(state: SWAState, b: Budget, idx: Tensor) -> Tensor:
    state.last_indices = idx[:, :, : b.total]
    state.last_budget = b
    return idx
