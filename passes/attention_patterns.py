"""Pattern helpers for attention sites in functionalized ATen graphs.

They walk producer chains (views, expands, clones, the GQA ``repeat_kv`` expansion, the KV-cache
append) back to the tensors an attention site really reads. Every helper returns ``None`` or raises
:class:`NoMatch` with a human-readable reason when the shape of the graph is not the one expected.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
import torch.fx

aten = torch.ops.aten
prims = torch.ops.prims


class NoMatch(Exception):
    """The site does not have a form this pass understands (the message says why)."""


VIEW_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
COPY_OPS = {aten.clone.default, aten.alias.default, aten.contiguous.default}
CONVERT_OPS = {prims.convert_element_type.default, aten._to_copy.default}

SDPA_OPS = {
    # op -> (index of attn_mask arg or None, index of is_causal arg, index of dropout arg)
    aten._scaled_dot_product_flash_attention_for_cpu.default: ("attn_mask", 4, 3),
    aten._scaled_dot_product_flash_attention.default: (None, 4, 3),
    aten._scaled_dot_product_efficient_attention.default: (3, 6, 5),
    aten._scaled_dot_product_cudnn_attention.default: (3, 6, 5),
    aten._scaled_dot_product_attention_math.default: (3, 5, 4),
    aten.scaled_dot_product_attention.default: (3, 5, 4),
}
SDPA_DEFAULTS = {"dropout": 0.0, "is_causal": False}


def val(node) -> torch.Tensor | None:
    """The fake tensor AOTAutograd recorded for a node (``None`` for non-tensors)."""
    v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def shape(node) -> tuple | None:
    v = val(node)
    return tuple(v.shape) if v is not None else None


def is_op(node, ops) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in ops


def get_arg(node: torch.fx.Node, index, name: str, default=None):
    """Positional-or-keyword argument of an ATen call node."""
    if isinstance(index, int) and index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)


def strip_to_4d(node: torch.fx.Node) -> torch.fx.Node:
    """Peel ``view``/``expand``/``clone``/dtype-keeping copies that feed a bmm back to a 4-D tensor.

    ``view(expand(X, [B,H,L,D]), [B*H,L,D])`` -> ``X`` (and ``X`` may itself be a same-shape
    expand/clone of something 4-D, which is peeled too).
    """
    cur = node
    for _ in range(16):
        s = shape(cur)
        if is_op(cur, VIEW_OPS | COPY_OPS | {aten.expand.default}):
            src = cur.args[0]
            ss = shape(src)
            if s is not None and len(s) == 4 and ss is not None and len(ss) != 4:
                return cur  # a 4-D view of a non-4-D tensor: that view is the tensor of interest
            if is_op(cur, {aten.expand.default}) and ss is not None and len(ss) == 4 and ss != s:
                return cur  # a real broadcast (e.g. of q over a batch of 1): keep it
            cur = src
            continue
        if s is not None and len(s) == 4:
            return cur
        raise NoMatch(f"bmm operand {node.name} does not come from a 4-D tensor (reached {cur.name})")
    raise NoMatch(f"could not peel the operand chain of {node.name}")


def peel_transpose_last2(node: torch.fx.Node) -> torch.fx.Node:
    """``permute(k, [0,1,3,2])`` / ``transpose(k, -1, -2)`` -> ``k``."""
    if is_op(node, {aten.permute.default}) and list(node.args[1]) in ([0, 1, 3, 2], [0, 1, -1, -2]):
        return node.args[0]
    if is_op(node, {aten.transpose.int}):
        dims = sorted(d % 4 for d in node.args[1:3])
        if dims == [2, 3]:
            return node.args[0]
    raise NoMatch(f"key operand {node.name} is not K transposed over its last two dims")


def is_full_slice(node) -> bool:
    """``aten.slice(x, dim, 0|None, None|>=2**62, 1)``: a no-op slice of the whole dimension."""
    if not is_op(node, {aten.slice.Tensor}):
        return False
    a = list(node.args) + [None] * (5 - len(node.args))
    start = node.kwargs.get("start", a[2])
    end = node.kwargs.get("end", a[3])
    step = node.kwargs.get("step", a[4])
    return (start in (0, None) and (end is None or (type(end) is int and end >= 2 ** 62))
            and step in (1, None))


def peel_repeat_kv(node: torch.fx.Node) -> tuple[torch.fx.Node, int]:
    """Undo the GQA expansion ``view(clone(expand(unsqueeze(x, 2), [B,Hkv,G,L,D])), [B,Hkv*G,L,D])``.

    Returns ``(x, G)``; ``(node, 1)`` when there is no such expansion.
    """
    cur = node
    if not is_op(cur, VIEW_OPS):
        return node, 1
    inner = cur.args[0]
    while is_op(inner, COPY_OPS):
        inner = inner.args[0]
    if not is_op(inner, {aten.expand.default}):
        return node, 1
    unsq = inner.args[0]
    while is_full_slice(unsq):  # dynamic shapes keep repeat_kv's ``x[:, :, None, :, :]`` slice
        unsq = unsq.args[0]
    s5 = shape(inner)
    if not is_op(unsq, {aten.unsqueeze.default}) or s5 is None or len(s5) != 5 or unsq.args[1] % 5 != 2:
        return node, 1
    src = unsq.args[0]
    ss = shape(src)
    if ss is None or len(ss) != 4:
        return node, 1
    groups = s5[2]
    return src, int(groups) if isinstance(groups, int) else groups


def split_cache_append(node: torch.fx.Node) -> tuple[torch.fx.Node | None, torch.fx.Node]:
    """``cat([past, new], dim=-2)`` -> ``(past, new)``; anything else -> ``(None, node)``."""
    if is_op(node, {aten.cat.default}):
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if len(tensors) == 2 and dim % 4 == 2:
            return tensors[0], tensors[1]
    return None, node


@dataclass
class StaticKV:
    """A K or V operand read from a preallocated buffer written at ``cache_position``::

        index_put(buf, [None, None, cache_position], new)   # StaticLayer.update's index_copy_
        (optionally sliced [:, :, 0:L])                      # the prefill reads its first L rows
    """

    buffer_after: torch.fx.Node
    """The buffer after the write (whole ``max_cache_len``)."""
    buffer: torch.fx.Node
    new: torch.fx.Node
    cache_position: torch.fx.Node
    anchor: torch.fx.Node | None
    """The ``cumulative_length`` placeholder the positions are computed from (None: not found)."""


def static_cache_write(node: torch.fx.Node) -> StaticKV | None:
    """Recognise a StaticCache read (see :class:`StaticKV`); ``None`` for anything else."""
    cur = node
    if is_op(cur, {aten.slice.Tensor}) and cur.args[1] % 4 == 2 and get_arg(cur, 2, "start", 0) in (0, None):
        cur = cur.args[0]
    if is_op(cur, {aten.index_put.default}) and len(cur.args) >= 3 and not get_arg(cur, 3, "accumulate", False):
        idx = list(cur.args[1])
        if len(idx) != 3 or idx[0] is not None or idx[1] is not None or not isinstance(idx[2], torch.fx.Node):
            return None
        buf, pos, new = cur.args[0], idx[2], cur.args[2]
    elif is_op(cur, {aten.index_copy.default}) and cur.args[1] % 4 == 2:
        buf, pos, new = cur.args[0], cur.args[2], cur.args[3]
    else:
        return None
    anchor = None
    if is_op(pos, {aten.add.Tensor}):
        for a in pos.args:
            if isinstance(a, torch.fx.Node) and a.op == "placeholder" and shape(a) == ():
                anchor = a
    return StaticKV(cur, buf, new, pos, anchor)


def constant_scalar(node) -> float | None:
    """A Python number, or a 0-d constant tensor produced by ``full``/``scalar_tensor``/get_attr."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return float(node)
    if not isinstance(node, torch.fx.Node):
        return None
    if is_op(node, {aten.full.default}) and list(node.args[0]) in ([], [1]):
        return float(node.args[1])
    if is_op(node, {aten.scalar_tensor.default}):
        return float(node.args[0])
    if is_op(node, {aten.lift_fresh_copy.default} | CONVERT_OPS | COPY_OPS):
        return constant_scalar(node.args[0])
    if node.op == "get_attr":
        owner = node.graph.owning_module
        t = getattr(owner, str(node.target), None)
        if isinstance(t, torch.Tensor) and t.numel() == 1:
            return float(t.item())
    return None


_LAYER_RE = re.compile(r"_modules_(\d+)_")


def layer_index(start: torch.fx.Node, sources: dict[str, str], max_nodes: int = 400) -> int | None:
    """Index of the module-list entry (layer) whose parameters are closest upstream of ``start``."""
    seen = {start}
    frontier = [start]
    visited = 0
    while frontier and visited < max_nodes:
        nxt = []
        for n in frontier:
            visited += 1
            if n.op == "placeholder":
                m = _LAYER_RE.search(sources.get(n.name, ""))
                if m:
                    return int(m.group(1))
            for a in n.all_input_nodes:
                if a not in seen:
                    seen.add(a)
                    nxt.append(a)
        frontier = nxt
    return None


@dataclass
class Site:
    """What one attention site computes, in ``llmaccel::attention`` terms."""

    out: torch.fx.Node
    """The node whose value the op replaces ([B, Hq, Lq, Dv])."""
    q: torch.fx.Node
    k: torch.fx.Node
    v: torch.fx.Node
    k_cache: torch.fx.Node | None
    v_cache: torch.fx.Node | None
    attn_mask: object
    scale: float
    is_causal: bool
    form: str
    groups: int = 1
    k_all: torch.fx.Node | None = None
    """The graph's own cache append ``cat([k_cache, k], -2)``, reused by the op (no second copy)."""
    v_all: torch.fx.Node | None = None
    static: "StaticKV | None" = None
    """Set when K/V are read from HF ``StaticCache`` buffers (``k``/``v`` are then the buffers)."""


def only_first_output_used(node: torch.fx.Node) -> torch.fx.Node:
    """For tuple-returning SDPA ops: the ``getitem(node, 0)`` user; other outputs must be unused."""
    first = None
    for u in node.users:
        if u.op == "call_function" and u.target is operator.getitem:
            if u.args[1] == 0:
                first = u
            elif u.users:
                raise NoMatch(f"{node.name}: output {u.args[1]} (logsumexp/debug) is used downstream")
        else:
            raise NoMatch(f"{node.name}: used other than through getitem")
    if first is None:
        raise NoMatch(f"{node.name}: attention output unused")
    return first


def call_args(node: torch.fx.Node) -> dict:
    """A call's arguments by schema name, positional or keyword, defaults filled in: the one
    normalisation of ``llmaccel::`` op nodes (however a pass built them)."""
    out = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value if arg.has_default_value() else None
    return out


def is_cache_append(node, past, new) -> bool:
    """``node`` is ``cat([past, new], -2)`` (see :func:`split_cache_append`)."""
    got_past, got_new = split_cache_append(node) if isinstance(node, torch.fx.Node) else (None, node)
    return got_past is not None and got_past is past and got_new is new


def getitem_of(node, source: torch.fx.Node, index: int) -> bool:
    return (isinstance(node, torch.fx.Node) and node.op == "call_function"
            and node.target is operator.getitem and node.args[0] is source and node.args[1] == index)
