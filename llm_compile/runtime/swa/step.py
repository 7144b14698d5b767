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
  over them only (torch: gather + matmul/softmax; Triton: fused gather/attend kernel that also
  returns the weights); the weights of the kept tokens enter the scores.
* ``1 < Lq < n`` (chunked decode / continued prefill): dense fallback (exact). Its query rows
  re-seed the scores like a prompt ("alisa": the older score history is dropped; "h2o": added).
* ``sparsity == 0``: always dense (bit-identical to ``llmaccel::attention``), no state kept.
"""
from __future__ import annotations

import logging
from functools import lru_cache

import torch
from torch import Tensor

from llm_compile.ops.attention import dense_attention, full_kv
from llm_compile.runtime.swa import query
from llm_compile.runtime.swa.pages import PageSummary
from llm_compile.runtime.swa.policies import policy_of, seed_of
from llm_compile.runtime.swa.state import SWAState, compute_budget, quantize_weights

log = logging.getLogger(__name__)

_CHUNK_ELEMS = 1 << 22


def new_state(batch: int, kv_heads: int, device, cfg) -> SWAState:
    """An empty state for ``batch`` sequences of a site with ``kv_heads`` KV heads."""
    groups = kv_heads if cfg.selection == "kv_head" else 1
    state = SWAState(batch, groups, device, windowed=policy_of(cfg).windowed)
    if policy_of(cfg).pages:
        state.pages = PageSummary(cfg.page_size)
    return state


def _reinit(state: SWAState, batch: int, kv_heads: int, device, cfg) -> None:
    state.__dict__.update(new_state(batch, kv_heads, device, cfg).__dict__)


def _needs_scores(cfg) -> bool:
    return cfg.sparsity > 0 and policy_of(cfg).needs_scores


def _group_sum(w: Tensor, groups: int) -> Tensor:
    """Per-head weights [B, Hq, ..., T] -> per-group sums [B, G, ..., T] (G = 1 or KV heads)."""
    B, Hq = w.shape[:2]
    return w.reshape(B, groups, Hq // groups, *w.shape[2:]).sum(2)


def _mask_bias(attn_mask: Tensor | None, B: int, Lq: int, n: int) -> Tensor | None:
    """``attn_mask`` (bool: True = attend, or additive) as fp32 bias [B, 1|Hq, Lq, n]."""
    if attn_mask is None:
        return None
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(B, m.shape[1], Lq, n)
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill_(~m, float("-inf"))
    return m.float()


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
        g = seeding.transform(_group_sum(w, state.groups))  # [B, G, C, n]
        if policy.windowed:
            rows.append(g)
        else:
            part = quantize_weights(g).sum(2)
            totals = part if totals is None else totals + part
    if policy.windowed:
        state.seed(rows=torch.cat(rows, dim=2))
    else:
        state.seed(totals=totals, accumulate=accumulate)


def _slot_bias(attn_mask: Tensor | None, idx: Tensor, total: int, Hq: int, n: int) -> Tensor:
    """Additive bias [B, 1|Hq, P] for the kept slots: the mask gathered at the kept tokens, and
    -inf on padding slots (``>= total``)."""
    B, G, P = idx.shape
    if attn_mask is None:
        bias = torch.zeros(B, 1, P, dtype=torch.float32, device=idx.device)
    else:
        m = _mask_bias(attn_mask, B, 1, n)[:, :, 0]  # [B, H', n]
        if G > 1 or m.shape[1] > 1:
            m = m.expand(B, Hq, n)
            ii = idx.repeat_interleave(Hq // G, dim=1) if G > 1 else idx.expand(B, Hq, P)
        else:
            ii = idx
        bias = torch.gather(m, 2, ii).contiguous()
    bias[..., total:] = float("-inf")
    return bias


@lru_cache(maxsize=64)
def _row_base(B: int, H: int, s0: int, s1: int, device: torch.device) -> Tensor:
    """Row of ``x[b, h, 0]`` in the rows view of a cache with row strides ``s0``/``s1`` (a shape
    constant, made once per shape: not per-sequence state)."""
    return (torch.arange(B, device=device)[:, None, None] * s0
            + torch.arange(H, device=device)[None, :, None] * s1)


def _row_view(x: Tensor) -> tuple[Tensor, Tensor] | None:
    """``x`` [B, H, n, D] (a possibly sliced contiguous cache) as contiguous rows [R, D] without a
    copy, and the row of ``x[b, h, 0]`` as ``base`` [B, H, 1]; None if its strides do not allow it."""
    B, H, n, D = x.shape
    if not (x.stride(-1) == 1 and x.stride(2) == D and x.stride(1) % D == 0 and x.stride(0) % D == 0):
        return None
    s0, s1 = x.stride(0) // D, x.stride(1) // D
    return (x.as_strided(((B - 1) * s0 + (H - 1) * s1 + n, D), (D, 1), x.storage_offset()),
            _row_base(B, H, s0, s1, x.device))


def gather_rows(x: Tensor, idx: Tensor, new: Tensor | None = None) -> Tensor:
    """Rows ``x[b, h, idx[b, h|0, t]]`` -> [B, H, P, D]. With ``new`` ([B, H, 1, D]), index
    ``x.shape[2]`` means that row (the call's new token, so the cache need not be concatenated)."""
    B, H, n, D = x.shape
    P = idx.shape[-1]
    ii = idx.expand(B, H, P)
    if new is not None:
        is_new = ii == n
        ii = ii.clamp(max=n - 1)
    view = _row_view(x)
    if view is not None:  # rows of a (possibly sliced) contiguous cache: one index_select
        rows, base = view
        out = rows.index_select(0, (base + ii).reshape(-1)).view(B, H, P, D)
    else:
        out = x[torch.arange(B, device=x.device)[:, None, None],
                torch.arange(H, device=x.device)[None, :, None], ii]
    if new is not None:
        out = torch.where(is_new[..., None], new.expand(B, H, P, D), out)
    return out


def weighted_rows(w: Tensor, v: Tensor, idx: Tensor) -> Tensor | None:
    """``out[b, h, g] = sum_p w[b, h, g, p] * v[b, h, idx[b, h|0, p]]`` -> [B, H, G, Dv] fp32, read
    in place by one ``embedding_bag`` (no gathered copy of the rows: one read of each kept row
    instead of a gather's read, write and re-read). None where it does not apply (a cache that is
    not float32 or not rows of a contiguous buffer): the caller gathers instead."""
    if v.dtype != torch.float32:
        return None
    view = _row_view(v)
    if view is None:
        return None
    rows, base = view
    B, H, G, P = w.shape
    bags = (base + idx.expand(B, H, P)).unsqueeze(2).expand(B, H, G, P).reshape(B * H * G, P)
    out = torch.nn.functional.embedding_bag(bags, rows, mode="sum",
                                            per_sample_weights=w.reshape(B * H * G, P))
    return out.view(B, H, G, v.shape[-1])


def gather_attend_torch(q: Tensor, kf: Tensor, vf: Tensor, idx: Tensor, bias: Tensor,
                        scale: float, k_new: Tensor | None = None,
                        v_new: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """CPU/reference path: gather the kept K/V rows, dense attention over them.

    q [B, Hq, D]; kf/vf [B, Hkv, n, D|Dv]; idx [B, 1|Hkv, P]; bias [B, 1|Hq, P]; optional
    ``k_new``/``v_new`` [B, Hkv, 1, D]: then ``kf``/``vf`` are the cache without the new token and
    index ``n`` is the new token. Returns out [B, Hq, Dv] (dtype of q) and weights [B, Hq, P]
    fp32 (same contract as :func:`llm_compile.codegen.swa_kernels.swa_decode_attention`).
    """
    return attend_rows(q, gather_rows(kf, idx, k_new), gather_rows(vf, idx, v_new), bias, scale)


def attend_rows(q: Tensor, kg: Tensor, vg: Tensor, bias: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Dense attention of q [B, Hq, D] over gathered rows kg/vg [B, Hkv, P, D|Dv] with ``bias``
    [B, 1|Hq, P]; returns out [B, Hq, Dv] and weights [B, Hq, P] (see :func:`gather_attend_torch`)."""
    B, Hq, D = q.shape
    Hkv, Dv, P = kg.shape[1], vg.shape[-1], kg.shape[2]
    grp = Hq // Hkv
    kg, vg = kg.float(), vg.float()
    logits = torch.matmul(q.float().reshape(B, Hkv, grp, D), kg.transpose(-1, -2)).mul_(scale)
    logits += bias.expand(B, Hq, P).reshape(B, Hkv, grp, P)
    w = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
    out = torch.matmul(w, vg).reshape(B, Hq, Dv).to(q.dtype)
    return out, w.reshape(B, Hq, P)


def attend_split_torch(q: Tensor, kf: Tensor, vf: Tensor, idx: Tensor, b, attn_mask: Tensor | None,
                       scale: float, k_new: Tensor | None = None,
                       v_new: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """CPU decode path: like :func:`gather_attend_torch` over the first ``b.total`` slots of
    ``idx`` (sinks, global, recent — the layout of :meth:`SWAState.select`), but nothing is
    gathered that can be read in place: the sinks and the recent window (contiguous rows of the
    cache) enter the logits in place, only the global keys are gathered, and the output is one
    weighted ``embedding_bag`` over the kept value rows (:func:`weighted_rows`; a gather where it
    does not apply); no padding slots. Returns out [B, Hq, Dv] and weights [B, Hq, b.total] fp32
    in slot order.
    """
    B, Hq, D = q.shape
    Hkv, Dv = kf.shape[1], vf.shape[-1]
    n, grp = b.n, Hq // Hkv
    s, g, r = b.sinks, b.global_, b.recent
    kr = kf[:, :, n - r: n] if k_new is None else torch.cat([kf[:, :, n - r: n - 1], k_new], dim=2)
    parts_k = [kf[:, :, :s]] if s else []
    if g:
        parts_k.append(gather_rows(kf, idx[..., s: s + g]))
    parts_k.append(kr)
    qf = q.float().reshape(B, Hkv, grp, D) * scale  # the scale on q: grp rows, not P columns
    logits = torch.cat([torch.matmul(qf, kp.float().transpose(-1, -2)) for kp in parts_k], dim=-1)
    if attn_mask is not None:
        m = _mask_bias(attn_mask, B, 1, n)[:, :, 0]  # [B, 1|Hq, n]
        ii = idx[..., : b.total]
        if ii.shape[1] > 1 or m.shape[1] > 1:  # per-KV-head slots or a per-head mask
            m = m.expand(B, Hq, n)
            ii = ii.repeat_interleave(Hq // ii.shape[1], dim=1) if ii.shape[1] > 1 else ii.expand(B, Hq, b.total)
        logits += torch.gather(m, 2, ii).expand(B, Hq, b.total).reshape(B, Hkv, grp, b.total)
    w = torch.softmax(logits, dim=-1)
    if attn_mask is not None:  # a row whose kept tokens are all masked: zeros, not NaN
        w.nan_to_num_(0.0)
    out = None if v_new is not None else weighted_rows(w, vf, idx[..., : b.total])
    if out is None:  # the cache without the new token, or rows embedding_bag cannot read
        vr = vf[:, :, n - r: n] if v_new is None else torch.cat([vf[:, :, n - r: n - 1], v_new], dim=2)
        parts_v = ([vf[:, :, :s]] if s else []) + ([gather_rows(vf, idx[..., s: s + g])] if g else []) + [vr]
        lo = 0
        for vp in parts_v:
            t = vp.shape[2]
            o = torch.matmul(w[..., lo: lo + t], vp.float())
            out = o if out is None else out.add_(o)
            lo += t
    return out.reshape(B, Hq, Dv).to(q.dtype), w.reshape(B, Hq, b.total)


def _use_triton(cfg, q: Tensor) -> bool:
    return cfg.kernel == "triton" or (cfg.kernel == "auto" and q.is_cuda)


def _sparse_decode(state: SWAState, q: Tensor, kc: Tensor, vc: Tensor, kn: Tensor | None,
                   vn: Tensor | None, attn_mask, scale, cfg, source=None):
    """One-query step. ``kc``/``vc``: the full cache, or (with ``kn``/``vn``) the old part; or
    (``source``, tiered KV) none: rows are read from the source (see :func:`swa_step`)."""
    B, Hq, _, _ = q.shape
    n = source.length if source is not None else kc.shape[-2] + (0 if kn is None else kn.shape[-2])
    b = compute_budget(n, cfg, q.shape[-1], vc.shape[-1] if vc is not None else q.shape[-1])
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
            idx = torch.arange(n, device=q.device).expand(B, state.groups, n)
            state.add(idx, _group_sum(w, state.groups))
        return out
    policy = policy_of(cfg)
    query_aware = policy.pages or policy.exact  # quest / recall / oracle: slots in their own order
    if query_aware:
        idx = query.select(state, b, q[:, :, 0], kc, kn, scale, cfg, triton_path)
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
        state.add(idx[..., : b.total], _group_sum(w, state.groups)[..., : b.total])
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
    if state.pages is not None:
        state.pages.update(k_full)
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
