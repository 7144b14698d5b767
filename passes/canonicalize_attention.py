"""canonicalize_attention: every attention site -> one ``llmaccel::attention`` call.

Recognised forms (functionalized ATen, after Inductor's decompositions):

* any SDPA variant: ``_scaled_dot_product_flash_attention_for_cpu``, ``_flash_attention``,
  ``_efficient_attention``, ``_cudnn_attention``, ``_attention_math``, ``scaled_dot_product_attention``
  (dropout 0, only the output used);
* the eager form ``bmm(q, kᵀ) -> *scale | /c -> + mask -> softmax (or its decomposition
  amax/sub/exp/sum/div) -> bmm(p, v)``;

each with the GQA ``repeat_kv`` expansion peeled off (the op groups heads itself) and the decode-time
cache append ``cat([past, new], -2)`` split so the op knows which keys are cached and which are new.

Hugging Face's ``StaticCache`` writes into preallocated ``[B, Hkv, max_cache_len, D]`` buffers
(``index_put(buf, [None, None, cache_position], new)``) that SDPA then reads whole, with a mask.
Such a site becomes ``llmaccel::static_attention(q, k_buf_after, v_buf_after, cache_position,
cumulative_length, None, mask, scale, is_causal, site)``, which attends over the filled rows
only; the write itself stays in the graph (it is the cache update)::

    index_put = aten.index_put(arg_k_buf, [None, None, cache_position], k_new)
    sdpa = aten._scaled_dot_product_flash_attention_for_cpu(q, index_put, index_put_1, attn_mask=m)
      ->
    static_attention = llmaccel.static_attention(q, index_put, index_put_1, cache_position,
                                                 arg_cumulative_length, None, m, 0.125, False, 0)

Before (decode step of one Llama layer, SDPA)::

    cat_2 = aten.cat([past_k, k_new], -2)          # also returned to the KV cache
    cat_3 = aten.cat([past_v, v_new], -2)
    sdpa = aten._scaled_dot_product_flash_attention_for_cpu(q, cat_2, cat_3, scale=0.125)
    out = getitem(sdpa, 0)

After::

    cat_2 = aten.cat([past_k, k_new], -2)          # untouched: still the cache update,
    cat_3 = aten.cat([past_v, v_new], -2)          # passed along so the op does not copy it again
    attention = llmaccel.attention(q, k_new, v_new, past_k, past_v, None, 0.125, False, 3, cat_2, cat_3)

The site id (last argument) is the layer index read from the nearest upstream parameter's name
(``..._layers_modules_3_...``), or the site's order in the graph when names are unavailable.
Sites that do not fit are left as they were and listed in ``skipped`` with the reason.
"""
from __future__ import annotations

import math

import torch
import torch.fx

import llm_compile.ops  # noqa: F401  (registers llmaccel::attention)
from llm_compile.config import LLMAccelConfig
from llm_compile.passes.attention_patterns import (
    CONVERT_OPS, COPY_OPS, SDPA_OPS, VIEW_OPS, NoMatch, Site, aten, constant_scalar, get_arg, is_op,
    layer_index, only_first_output_used, peel_repeat_kv, peel_transpose_last2, shape,
    split_cache_append, static_cache_write, strip_to_4d,
)
from llm_compile.passes.base import PassContext, PassResult

ATTENTION = torch.ops.llmaccel.attention.default
STATIC = torch.ops.llmaccel.static_attention.default
_SDPA_MASK = {  # op -> (positional index of the mask or None, keyword name)
    aten._scaled_dot_product_flash_attention_for_cpu.default: (None, "attn_mask"),
    aten._scaled_dot_product_flash_attention.default: (None, None),
    aten._scaled_dot_product_efficient_attention.default: (3, "attn_bias"),
    aten._scaled_dot_product_cudnn_attention.default: (3, "attn_bias"),
    aten._scaled_dot_product_attention_math.default: (3, "attn_mask"),
    aten.scaled_dot_product_attention.default: (3, "attn_mask"),
}


def _kv(node: torch.fx.Node):
    """Peel GQA expansion and the cache append off a K or V operand: (new, cache, all, groups);
    for a StaticCache read, ``all`` is its :class:`StaticKV`."""
    src, groups = peel_repeat_kv(node)
    static = static_cache_write(src)
    if static is not None:
        return static.new, None, static, groups
    cache, new = split_cache_append(src)
    return new, cache, (src if cache is not None else None), groups


def _site(out, q, k, v, mask, scale, is_causal, form) -> Site:
    k_new, k_cache, k_all, gk = _kv(k)
    v_new, v_cache, v_all, _ = _kv(v)
    static = [x for x in (k_all, v_all) if x is not None and not isinstance(x, torch.fx.Node)]
    if static:
        if len(static) != 2 or k_all.cache_position is not v_all.cache_position:
            raise NoMatch("keys and values are not written to a StaticCache the same way")
        return Site(out, q, k_all.buffer_after, v_all.buffer_after, None, None, mask, scale, is_causal,
                    form, gk, None, None, static=k_all)
    if (k_cache is None) != (v_cache is None):
        raise NoMatch("keys and values are not appended to a cache the same way")
    return Site(out, q, k_new, v_new, k_cache, v_cache, mask, scale, is_causal, form, gk, k_all, v_all)


def _default_scale(q: torch.fx.Node) -> float:
    d = shape(q)[-1]
    if not isinstance(d, int):
        raise NoMatch("head dimension is symbolic; cannot derive the default scale")
    return 1.0 / math.sqrt(d)


def match_sdpa(node: torch.fx.Node) -> Site:
    _, causal_i, dropout_i = SDPA_OPS[node.target]
    dropout = get_arg(node, dropout_i, "dropout_p", 0.0)
    if dropout:
        raise NoMatch(f"dropout_p={dropout} (only inference attention is rewritten)")
    if node.target == aten._scaled_dot_product_attention_math.default and get_arg(node, 6, "dropout_mask") is not None:
        raise NoMatch("explicit dropout mask")
    out = node if node.target == aten.scaled_dot_product_attention.default else only_first_output_used(node)
    q, k, v = node.args[:3]
    mask_pos, mask_kw = _SDPA_MASK[node.target]
    mask = get_arg(node, mask_pos, mask_kw) if mask_kw else None
    is_causal = bool(get_arg(node, causal_i, "is_causal", False))
    scale = node.kwargs.get("scale")
    scale = _default_scale(q) if scale is None else float(scale)
    return _site(out, q, k, v, mask, scale, is_causal, "sdpa")


def _softmax_input(node: torch.fx.Node) -> torch.fx.Node | None:
    """If ``node`` is a last-dim softmax (fused or decomposed), its input; else ``None``."""
    if is_op(node, {aten._softmax.default}) and node.args[1] in (-1, 3):
        return node.args[0]
    if not is_op(node, {aten.div.Tensor}):
        return None
    exp, total = node.args
    if not (is_op(exp, {aten.exp.default}) and is_op(total, {aten.sum.dim_IntList}) and total.args[0] is exp):
        return None
    sub = exp.args[0]
    if not (is_op(sub, {aten.sub.Tensor}) and is_op(sub.args[1], {aten.amax.default})):
        return None
    amax = sub.args[1]
    if amax.args[0] is not sub.args[0] or list(amax.args[1]) not in ([-1], [3]):
        return None
    return sub.args[0]


def _down_to_bmm(p: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node]:
    """softmax output -> (converts/clones/expand/view) -> bmm(p, v) -> view 4-D: (bmm, out)."""
    cur = p
    for _ in range(8):
        users = list(cur.users)
        if len(users) != 1:
            raise NoMatch(f"softmax output {p.name} has {len(users)} users")
        u = users[0]
        if is_op(u, {aten.bmm.default}) and u.args[0] is cur:
            outs = list(u.users)
            if len(outs) == 1 and is_op(outs[0], VIEW_OPS) and len(shape(outs[0]) or ()) == 4:
                return u, outs[0]
            raise NoMatch(f"{u.name}: attention output is not reshaped back to 4-D")
        if not is_op(u, CONVERT_OPS | COPY_OPS | VIEW_OPS | {aten.expand.default}):
            raise NoMatch(f"softmax output {p.name} feeds {u.target}, not a bmm")
        cur = u
    raise NoMatch(f"softmax output {p.name}: no bmm within 8 ops")


def _feeds_bmm(node, depth=6) -> bool:
    cur = node
    for _ in range(depth):
        if is_op(cur, {aten.bmm.default}):
            return True
        if not isinstance(cur, torch.fx.Node) or not cur.args or not isinstance(cur.args[0], torch.fx.Node):
            return False
        cur = cur.args[0]
    return False


def match_eager(softmax: torch.fx.Node, x: torch.fx.Node) -> Site:
    bmm_pv, out = _down_to_bmm(softmax)
    scale, mask, cur = 1.0, None, x
    for _ in range(12):
        if is_op(cur, CONVERT_OPS | COPY_OPS):
            cur = cur.args[0]
        elif is_op(cur, {aten.add.Tensor}) and len(cur.args) == 2 and cur.kwargs.get("alpha", 1) == 1:
            a, b = cur.args
            if mask is not None:
                raise NoMatch("more than one additive mask")
            if _feeds_bmm(a):
                cur, mask = a, b
            elif _feeds_bmm(b):
                cur, mask = b, a
            else:
                raise NoMatch(f"{cur.name}: neither addend comes from the QK^T bmm")
        elif is_op(cur, {aten.mul.Tensor, aten.div.Tensor}):
            a, b = cur.args
            c = constant_scalar(b)
            if c is None and cur.target == aten.mul.Tensor:
                c, a = constant_scalar(a), b
            if c is None:
                raise NoMatch(f"{cur.name}: scores scaled by a non-constant")
            scale = scale * c if cur.target == aten.mul.Tensor else scale / c
            cur = a
        elif is_op(cur, VIEW_OPS) and is_op(cur.args[0], {aten.bmm.default}):
            cur = cur.args[0]
            break
        else:
            raise NoMatch(f"unexpected {cur.target} between QK^T and softmax")
    if not is_op(cur, {aten.bmm.default}):
        raise NoMatch("no QK^T bmm upstream of the softmax")
    q = strip_to_4d(cur.args[0])
    k = peel_transpose_last2(strip_to_4d(cur.args[1]))
    v = strip_to_4d(bmm_pv.args[1])
    if isinstance(mask, (int, float)):
        raise NoMatch("constant added to the scores")
    return _site(out, q, k, v, mask, scale, False, "eager")


def _check(site: Site) -> None:
    qs, ks, vs = shape(site.q), shape(site.k), shape(site.v)
    if qs is None or ks is None or vs is None or len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        raise NoMatch("q/k/v are not 4-D [B, H, L, D] tensors")
    hq, hkv = qs[1], ks[1]
    if isinstance(hq, int) and isinstance(hkv, int) and hq % hkv:
        raise NoMatch(f"{hq} query heads not a multiple of {hkv} KV heads")


def find_sites(gm: torch.fx.GraphModule) -> tuple[list[Site], list[dict]]:
    sites, skipped = [], []
    for node in list(gm.graph.nodes):
        try:
            if is_op(node, SDPA_OPS):
                site = match_sdpa(node)
            else:
                x = _softmax_input(node)
                if x is None or not _feeds_bmm_down(node):
                    continue
                site = match_eager(node, x)
            _check(site)
            sites.append(site)
        except NoMatch as e:
            skipped.append({"node": node.name, "op": str(node.target), "reason": str(e)})
    return sites, skipped


def _feeds_bmm_down(node: torch.fx.Node, depth: int = 6) -> bool:
    """Is this softmax attention-like (its output reaches a bmm through views/copies)?"""
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if is_op(u, {aten.bmm.default}):
                    return True
                nxt.append(u)
        frontier = nxt
    return False


def _site_ids(sites: list[Site], ctx: PassContext) -> tuple[list[int], str]:
    layers = [layer_index(s.q, ctx.placeholder_sources) for s in sites]
    if all(x is not None for x in layers) and len(set(layers)) == len(layers):
        return layers, "layer index from parameter names"
    return list(range(len(sites))), "graph order"


def _rewrite(gm: torch.fx.GraphModule, site: Site, site_id: int) -> torch.fx.Node:
    g = gm.graph
    with g.inserting_before(site.out):
        if site.static is not None:
            st = site.static
            # k_buf=None: the dense op does not need the key buffer's identity, and passing the
            # buffer *before* its in-place write to a call after it would stop Inductor from
            # re-inplacing the write (a copy of the whole max_cache_len buffer per step); the
            # swa pass adds it back for static_swa_attention, which checks it.
            new = g.call_function(STATIC, (site.q, site.k, site.v, st.cache_position, st.anchor, None,
                                           site.attn_mask, site.scale, site.is_causal, site_id))
        else:
            args = (site.q, site.k, site.v, site.k_cache, site.v_cache, site.attn_mask, site.scale,
                    site.is_causal, site_id)
            if site.k_all is not None:
                args += (site.k_all, site.v_all)
            new = g.call_function(ATTENTION, args)
    new.meta["val"] = _fake_output(site)
    old_val = site.out.meta.get("val")
    replacement = new
    if old_val is not None and not _layout_compatible(old_val, new.meta["val"], site.out):
        with g.inserting_after(new):
            replacement = g.call_function(aten.clone.default, (new,), {"memory_format": torch.contiguous_format})
        replacement.meta["val"] = old_val
    site.out.replace_all_uses_with(replacement)
    return new


def _fake_output(site: Site):
    from llm_compile.ops.attention import attention_out_like

    return attention_out_like(site.q.meta["val"], site.v.meta["val"])


def _layout_compatible(old, new, out_node) -> bool:
    """Our op returns [B,H,L,D] in B,L,H,D memory order (as flash attention does)."""
    if all(a == b for a, b, n in zip(old.stride(), new.stride(), old.shape) if n != 1):
        return True
    return all(is_op(u, {aten.permute.default}) and list(u.args[1]) == [0, 2, 1, 3] for u in out_node.users)


def run(gm: torch.fx.GraphModule, config: LLMAccelConfig, ctx: PassContext) -> PassResult:
    sites, skipped = find_sites(gm)
    ids, how = _site_ids(sites, ctx)
    matched = []
    for site, sid in zip(sites, ids):
        new = _rewrite(gm, site, sid)
        matched.append({
            "site": sid, "node": new.name, "form": site.form, "replaces": site.out.name,
            "kv_cache_append": site.k_cache is not None, "static_cache": site.static is not None,
            "gqa_groups": str(site.groups),
            "mask": site.attn_mask is not None, "is_causal": site.is_causal, "scale": site.scale,
        })
    return PassResult(changed=bool(sites), matched=matched, skipped=skipped,
                      stats={"sites": len(sites), "site_ids": how})
