"""Find, per attention site, what recomputes its new K and V (phase 3 of ``kv_tiers``): the layer
input, the projection weights and (for K) the RoPE rows — all nodes of the graph itself, passed to
``llmaccel::stored_attention`` as its ``rec`` list with a JSON ``rec_spec``
(:mod:`llm_compile.runtime.tiers.recompute` says what they mean and how K/V are recomputed).

Walked backwards from the site's ``k`` / ``v`` arguments::

    GPT-2:  addmm(b, x2d, W) -> view -> split(64, 2)[1] -> view -> permute       K = cols 64:128 of x2d @ W + b
    Llama:  mm(x2d, permute(Wk)) -> view -> view -> permute -> (k*cos + cat(-k2, k1)*sin)   (RoPE on K)

``decode_matmul``'s weight-major form of a decode step (``[add](permute(mm(W, permute(x2d))), b)``,
``W`` as stored, ``[out, hidden]``) is recognised too (a 5th spec entry 1: the weight is transposed).
Layout ops (view, reshape, permute, transpose, clone, alias) are passed through; a column split
(``split``/``split_with_sizes`` + ``getitem``) or ``slice`` of the last dim picks columns of the
projection; the projection is ``mm`` or ``addmm`` (bias). K and V must come from the same input
(``x2d`` up to views). Anything else is not supported: :func:`recompute_inputs` returns the reason
(the pass then passes nothing and the plan keeps beta = 0, or, with ``kv_tiers.beta`` > 0, fails the
compile with that reason). The runtime checks the recompute against the model's K/V the first time a
sequence's site sees each spec, so a mis-read graph is an error, never a wrong answer.
"""
from __future__ import annotations

import operator

import torch
import torch.fx

aten = torch.ops.aten
LAYOUT = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
          aten.transpose.int, aten.clone.default, aten.alias.default}
SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}


def _val(n):
    return n.meta.get("val") if isinstance(n, torch.fx.Node) else None


def _last_dim(n: torch.fx.Node, dim: int) -> bool:
    v = _val(n)
    return v is not None and dim in (-1, v.dim() - 1)


def _projection(node) -> tuple | str:
    """``(x2d, w, bias | None, c0, c1)`` for the projection feeding ``node``, or why there is none."""
    c0, width, n = 0, None, node
    while True:
        if not isinstance(n, torch.fx.Node) or n.op != "call_function":
            return f"{getattr(n, 'name', n)} is not computed in the graph by a projection"
        t = n.target
        if (wm := _weight_major(n)) is not None:
            x, w, b = wm
            out = int(_val(w).shape[0])
            return x, w, b, c0, c0 + (width if width is not None else out), 1
        if t in LAYOUT:
            if t in (aten.permute.default, aten.transpose.int) and _val(n) is not None and _val(n).dim() < 3:
                return f"{n.name} transposes the projection's 2-D result: not supported"
            n = n.args[0]
        elif t is operator.getitem and isinstance(n.args[0], torch.fx.Node) and n.args[0].target in SPLITS:
            src, i = n.args[0], n.args[1]
            dim = src.args[2] if len(src.args) > 2 else src.kwargs.get("dim", 0)
            if not _last_dim(src.args[0], dim):
                return f"{src.name} splits a dimension other than the projection's columns"
            size = _val(src.args[0]).shape[-1]
            sizes = src.args[1] if src.target is aten.split_with_sizes.default else \
                [src.args[1]] * -(-int(size) // int(src.args[1]))
            c0 += sum(int(s) for s in sizes[:i])
            width = width if width is not None else int(sizes[i])
            n = src.args[0]
        elif t is aten.slice.Tensor and _last_dim(n.args[0], n.args[1] if len(n.args) > 1 else 0):
            start = n.args[2] if len(n.args) > 2 else 0
            end = n.args[3] if len(n.args) > 3 else None
            size = int(_val(n.args[0]).shape[-1])
            end = size if end is None or end > size else end
            c0 += int(start)
            width = width if width is not None else int(end) - int(start)
            n = n.args[0]
        elif t is aten.mm.default:
            x, w, b = n.args[0], n.args[1], None
            break
        elif t is aten.addmm.default and n.kwargs.get("beta", 1) == 1 and n.kwargs.get("alpha", 1) == 1:
            b, x, w = n.args[:3]
            break
        else:
            return f"{n.name} ({t}) between the projection and the attention is not supported"
    out = int(_val(w).shape[1])
    return x, w, b, c0, c0 + (width if width is not None else out), 0


def _is_t(n) -> bool:
    return (getattr(n, "target", None) in (aten.permute.default, aten.transpose.int, aten.t.default)
            and _val(n) is not None and _val(n).dim() == 2)


def _weight_major(n):
    """``(x2d, W [out, hidden], bias | None)`` for decode_matmul's form ``[add](permute(mm(W, permute(x))), b)``."""
    b = None
    if getattr(n, "target", None) is aten.add.Tensor and _is_t(n.args[0]) and isinstance(n.args[1], torch.fx.Node):
        n, b = n.args[0], n.args[1]
    if not _is_t(n):
        return None
    mm = n.args[0]
    if getattr(mm, "target", None) is not aten.mm.default or not _is_t(mm.args[1]):
        return None
    return mm.args[1].args[0], mm.args[0], b


def _is_rotate_half(rot, k) -> bool:
    if not (isinstance(rot, torch.fx.Node) and rot.target is aten.cat.default and len(rot.args[0]) == 2):
        return False
    neg, second = rot.args[0]
    return (isinstance(neg, torch.fx.Node) and neg.target is aten.neg.default
            and getattr(neg.args[0], "target", None) is aten.slice.Tensor and neg.args[0].args[0] is k
            and getattr(second, "target", None) is aten.slice.Tensor and second.args[0] is k)


def _rope(node):
    """``(k_before_rope, cos, sin)`` when ``node`` = k*cos + rotate_half(k)*sin, else None."""
    if getattr(node, "target", None) is not aten.add.Tensor:
        return None
    a, b = node.args[:2]
    if not all(getattr(m, "target", None) is aten.mul.Tensor for m in (a, b)):
        return None
    for m1, m2 in ((a, b), (b, a)):
        for k, cos in ((m1.args[0], m1.args[1]), (m1.args[1], m1.args[0])):
            for rot, sin in ((m2.args[0], m2.args[1]), (m2.args[1], m2.args[0])):
                if _is_rotate_half(rot, k) and all(_val(c) is not None and _val(c).dim() == 4
                                                   and _val(c).shape[1] == 1 for c in (cos, sin)):
                    return k, cos, sin
    return None


def _base(n):
    while isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in LAYOUT:
        n = n.args[0]
    return n


def recompute_inputs(k, v) -> tuple[list, dict] | str:
    """``(rec nodes, spec)`` for a site whose new K/V nodes are ``k``/``v``, or why not."""
    top = k
    while getattr(top, "target", None) in (aten.clone.default, aten.alias.default):
        top = top.args[0]
    rope = _rope(top)
    kp = _projection(rope[0] if rope else k)
    vp = _projection(v)
    for name, p in (("K", kp), ("V", vp)):
        if isinstance(p, str):
            return f"{name}: {p}"
    if _base(kp[0]) is not _base(vp[0]):
        return "K and V are projected from different inputs"
    nodes: list = [kp[0]]

    def index(n) -> int:
        if n is None:
            return -1
        if n not in nodes:
            nodes.append(n)
        return nodes.index(n)

    spec = {"hidden": int(_val(kp[0]).shape[-1]),
            "k": [index(kp[1]), index(kp[2]), kp[3], kp[4]] + ([1] if kp[5] else []),
            "v": [index(vp[1]), index(vp[2]), vp[3], vp[4]] + ([1] if vp[5] else []),
            "rope": [index(rope[1]), index(rope[2])] if rope else None}
    return nodes, spec
