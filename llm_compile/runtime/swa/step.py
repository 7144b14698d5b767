"""Sparse window attention (ALISA Algorithm 1): prefill seeding and sparse decode steps.

:func:`swa_step` is pure apart from mutating the :class:`~llm_compile.runtime.swa.state.SWAState`
it is given; the state's owner is the caller (the sequence's cache, see
:mod:`llm_compile.runtime.swa.op`; or an offload worker's own table)::

    state = new_state(batch, kv_heads, device, cfg)
    out = swa_step(state, q, k_full, v_full, scale, cfg, attn_mask=mask, is_causal=causal)

What one call does (``q`` [B, Hq, Lq, D], ``k_full``/``v_full`` the whole cache incl. new, n long):

* ``Lq == n`` (prefill, no cache): dense attention, exactly ``llmaccel::attention``; the state is
  reset and seeded with the prompt queries' attention weights, computed per chunk of query rows
  (at most ~4M logits at a time): for "alisa" only the last ``W0`` rows (the window at the first
  decode step), for "h2o" the column sums of all rows, for "streaming" nothing.
* ``Lq == 1`` (decode): budget from ``n`` (see :mod:`~llm_compile.runtime.swa.state`); oldest
  steps leave the score window; sinks + top-scored + recent tokens are selected; attention runs
  over them only (torch: :mod:`~llm_compile.runtime.swa.attend`; Triton: fused gather/attend kernel that also
  returns the weights); the weights of the kept tokens enter the scores.
* ``1 < Lq < n`` (chunked decode / continued prefill): dense fallback (exact). Its query rows
  re-seed the scores like a prompt ("alisa": the older score history is dropped; "h2o": added).
* ``sparsity == 0``: always dense (bit-identical to ``llmaccel::attention``), no state kept.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from llm_compile.ops.attention import dense_attention, full_kv
from llm_compile.runtime.swa import query
from llm_compile.runtime.swa.attend import (_mask_bias, _slot_bias, attend_native, attend_rows,
                                            attend_split_torch, gather_attend_torch)
from llm_compile.runtime.swa.policies import policy_of, seed_of
from llm_compile.runtime.swa.scorers import scorer_of
from llm_compile.runtime.swa.state import SWAState, compute_budget, group_sum, quantize_weights

log = logging.getLogger(__name__)

_CHUNK_ELEMS = 1 << 22


def new_state(batch: int, kv_heads: int, device, cfg) -> SWAState:
    """An empty state for ``batch`` sequences of a site with ``kv_heads`` KV heads."""
    groups = kv_heads if cfg.selection == "kv_head" else 1
    state = SWAState(batch, groups, device, windowed=policy_of(cfg).windowed)
    if policy_of(cfg).pages:
        state.summary = scorer_of(cfg).new(cfg)
    return state


def _reinit(state: SWAState, batch: int, kv_heads: int, device, cfg) -> None:
    state.__dict__.update(new_state(batch, kv_heads, device, cfg).__dict__)


def _needs_scores(cfg) -> bool:
    return cfg.sparsity > 0 and policy_of(cfg).needs_scores


def query_weights(q: Tensor, kf: Tensor, bias: Tensor | None, scale: float, row0: int,
                  is_causal: bool) -> Tensor:
    """Softmax weights [B, Hq, C, n] fp32 of query rows ``row0..row0+C`` (of the call) over all keys.

    ``bias`` is the matching slice [B, 1|Hq, C, n] of the mask bias; ``is_causal`` masks keys after
    the row (SDPA's top-left alignment). Fully masked rows give zeros.
    """
    B, Hq, C, D = q.shape
    Hkv, n = kf.shape[1], kf.shape[2]
    grp = Hq // Hkv
    logits = torch.matmul(q.float().reshape(B, Hkv, grp * C, D), kf.float().transpose(-1, -2))
    logits = logits.view(B, Hq, C, n).mul_(scale)
    if bias is not None:
        logits += bias
    if is_causal:
        rows = torch.arange(row0, row0 + C, device=q.device)[:, None]
        logits.masked_fill_(torch.arange(n, device=q.device)[None, :] > rows, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num_(0.0)


def _seed(state: SWAState, q: Tensor, kf: Tensor, attn_mask: Tensor | None, scale: float,
          is_causal: bool, cfg, accumulate: bool) -> None:
    """Scores from the query rows of a prefill (or chunk): see the module docstring."""
    B, Hq, Lq, _ = q.shape
    n = kf.shape[-2]
    state.grow(n)
    if not _needs_scores(cfg):
        return
    policy, seeding = policy_of(cfg), seed_of(cfg)
    lo = seeding.first_row(policy, Lq, n, cfg)
    bias = _mask_bias(attn_mask, B, Lq, n)
    kf32 = kf.float()
    step = max(1, min(Lq, _CHUNK_ELEMS // max(1, B * Hq * n)))
    rows, totals = [], None
    for r0 in range(lo, Lq, step):
        r1 = min(Lq, r0 + step)
        w = query_weights(q[:, :, r0:r1], kf32, None if bias is None else bias[:, :, r0:r1],
                          scale, r0, is_causal)
        g = seeding.transform(group_sum(w, state.groups))  # [B, G, C, n]
        if policy.windowed:
            rows.append(g)
        else:
            part = quantize_weights(g).sum(2)
            totals = part if totals is None else totals + part
    if policy.windowed:
        state.seed(rows=torch.cat(rows, dim=2))
    else:
        state.seed(totals=totals, accumulate=accumulate)


def _use_triton(cfg, q: Tensor) -> bool:
    return cfg.kernel == "triton" or (cfg.kernel == "auto" and q.is_cuda)


def _sparse_decode(state: SWAState, q: Tensor, kc: Tensor, vc: Tensor, kn: Tensor | None,
                   vn: Tensor | None, attn_mask, scale, cfg, source=None):
    """One-query step. ``kc``/``vc``: the full cache, or (with ``kn``/``vn``) the old part; or
    (``source``, tiered KV) none: rows are read from the source (see :func:`swa_step`)."""
    B, Hq, _, _ = q.shape
    n = source.length if source is not None else kc.shape[-2] + (0 if kn is None else kn.shape[-2])
    b = compute_budget(n, cfg, q.shape[-1], vc.shape[-1] if vc is not None else q.shape[-1],
                       q.element_size())
    state.trim(b.window)
    triton_path = _use_triton(cfg, q)
    dense = b.dense or n < cfg.min_context  # issue 17: short context runs dense (swa.min_context)
    if source is not None and dense:
        kc, vc = source.full()
    if kn is not None and (dense or triton_path):
        kc, vc = full_kv(kn, vn, kc, vc)
        kn = vn = None
    if dense:
        out = dense_attention(q, kc, vc, attn_mask, scale, False)
        if _needs_scores(cfg) and _scores_wanted(n, cfg):
            bias = _mask_bias(attn_mask, B, 1, n)
            w = query_weights(q, kc, bias, scale, 0, False)[:, :, 0]
            idx = torch.arange(n, device=q.device).expand(B, state.groups, n).contiguous()
            state.add_heads(idx, w.contiguous(), n)   # per head, as a sparse step's weights
        return out
    policy = policy_of(cfg)
    query_aware = policy.pages or policy.exact  # quest / recall / oracle: slots in their own order
    if query_aware:
        idx = query.select(state, b, q[:, :, 0], kc, kn, scale, cfg, triton_path, source)
    else:
        idx = state.select(b)
    if source is not None:  # tiered KV: one gather per tier, then attend over the gathered rows
        bias = _slot_bias(attn_mask, idx, b.total, Hq, n)
        kg, vg = source.rows(idx)
        if triton_path:
            from llm_compile.codegen.swa_kernels import swa_decode_attention

            seq = torch.arange(idx.shape[-1], device=q.device).expand(B, 1, idx.shape[-1])
            out, w = swa_decode_attention(q[:, :, 0], kg, vg, seq, bias, scale)
        else:
            out, w = attend_rows(q[:, :, 0], kg, vg, bias, scale)
    elif not triton_path and kn is None and (
            res := attend_native(q[:, :, 0], kc, vc, idx, b.total, attn_mask, scale)) is not None:
        out, w = res    # the C kernel: kept rows read in place (float32 CPU cache)
    elif query_aware and not triton_path:  # no sinks/global/recent layout: plain gather
        bias = _slot_bias(attn_mask, idx, b.total, Hq, n)
        out, w = gather_attend_torch(q[:, :, 0], kc, vc, idx, bias, scale, kn, vn)
    elif triton_path:
        from llm_compile.codegen.swa_kernels import swa_decode_attention

        bias = _slot_bias(attn_mask, idx, b.total, Hq, n)
        out, w = swa_decode_attention(q[:, :, 0], kc, vc, idx, bias, scale)
    else:
        out, w = attend_split_torch(q[:, :, 0], kc, vc, idx, b, attn_mask, scale, kn, vn)
    if _needs_scores(cfg):
        state.add_heads(idx, w.contiguous(), b.total)
    else:
        state.steps += 1
    return out.unsqueeze(2)


def _scores_wanted(n: int, cfg) -> bool:
    """Issue 17 (``swa.min_context``): a dense step below ``min_context`` records its weights only
    if a later sparse step's score window can still reach it. ALISA's window at a step with ``n``
    tokens covers the steps after ``n - W(n)``, and ``n - W(n)`` never decreases, so the steps
    from ``min_context - W(min_context)`` on are all any sparse step sums: the scores at the switch
    are those of SWA having kept them all along. Other policies (``h2o``: whole history) keep all."""
    if not policy_of(cfg).windowed or n >= cfg.min_context:
        return True
    w = compute_budget(cfg.min_context, cfg).window
    return w is None or n >= cfg.min_context - w - 1


def swa_step(state: SWAState, q: Tensor, k_full: Tensor, v_full: Tensor, scale: float, cfg, *,
             attn_mask: Tensor | None = None, is_causal: bool = False,
             k_new: Tensor | None = None, v_new: Tensor | None = None, source=None) -> Tensor:
    """One attention call under SWA on an explicit state (mutated); returns [B, Hq, Lq, Dv].

    ``k_full``/``v_full`` hold the whole cache including this call's tokens; or, if ``k_new``/
    ``v_new`` are given, only the cached tokens before the call, the call's tokens being
    ``k_new``/``v_new`` (the sparse decode path then never concatenates the cache).

    ``source`` (tiered KV, :class:`~llm_compile.runtime.tiers.store.TieredKV`; then ``k_full``/
    ``v_full`` are None): the cache including this call's tokens, read by ``source.rows(idx)``
    (the selected rows) on a sparse step and ``source.full()`` (every row) on any dense one.
    """
    B, Hq, Lq, _ = q.shape
    if source is not None:
        if cfg.sparsity == 0 or Lq != 1 or source.length == 1 or (is_causal and attn_mask is None):
            k_full, v_full = source.full()  # a dense call reads every row
            source = None
        else:
            Hkv, n = source.shape[1], source.length
            _check_state(state, B, Hkv, n - 1, q.device, cfg)
            state.grow(n)
            return _sparse_decode(state, q, None, None, None, None, attn_mask, scale, cfg, source)
    Hkv = k_full.shape[1]
    n = k_full.shape[2] + (0 if k_new is None else k_new.shape[2])
    if Hq % Hkv:
        raise ValueError(f"llmaccel::swa_attention: {Hq} query heads is not a multiple of {Hkv} KV heads")
    if k_new is not None and (cfg.sparsity == 0 or Lq != 1):
        k_full, v_full = full_kv(k_new, v_new, k_full, v_full)
        k_new = v_new = None
    if cfg.sparsity == 0:
        return dense_attention(q, k_full, v_full, attn_mask, scale, is_causal)
    if Lq == n:  # prefill: reset and seed
        return restart_step(state, q, k_full, v_full, scale, cfg, attn_mask=attn_mask, is_causal=is_causal)
    _check_state(state, B, Hkv, n - Lq, q.device, cfg)
    if Lq > 1 or (is_causal and attn_mask is None):
        log.debug("llmaccel swa: %d-query call on a %d-token cache runs dense", Lq, n - Lq)
        if k_new is not None:
            k_full, v_full = full_kv(k_new, v_new, k_full, v_full)
        out = dense_attention(q, k_full, v_full, attn_mask, scale, is_causal)
        _seed(state, q, k_full, attn_mask, scale, is_causal and attn_mask is None, cfg, True)
        return out
    state.grow(n)
    return _sparse_decode(state, q, k_full, v_full, k_new, v_new, attn_mask, scale, cfg)


def restart_step(state: SWAState, q: Tensor, k_full: Tensor, v_full: Tensor, scale: float, cfg, *,
                 attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """The state starts over as after a prompt: dense attention (exact), and the scores are seeded
    from this call's query rows. For a prefill, and for a cache this state has never seen (one a
    dense graph filled below ``swa.min_context``, :mod:`llm_compile.context_dispatch`)."""
    B, Hq, Lq, _ = q.shape
    _reinit(state, B, k_full.shape[1], q.device, cfg)
    out = dense_attention(q, k_full, v_full, attn_mask, scale, is_causal)
    _seed(state, q, k_full, attn_mask, scale, is_causal and attn_mask is None, cfg, False)
    if state.summary is not None:
        state.summary.update(k_full)
    return out


def _check_state(state: SWAState, B: int, Hkv: int, cached: int, device, cfg) -> None:
    groups = Hkv if cfg.selection == "kv_head" else 1
    if not state.matches(B, groups, cached, device):
        raise RuntimeError(
            f"llmaccel swa: the SWA state covers {state.n} tokens of {state.batch} sequence(s), but "
            f"this call's cache holds {cached} tokens of {B}: the cache was changed outside the "
            "compiled model (cropped, reordered, or taken from another sequence). Use "
            "llm_compile.LLMAccelCache for beam search and assisted decoding, or start the "
            "sequence again with a prefill")
