"""Anda lowering: FP-INT matmuls -> ``llmaccel::anda_linear`` (Anda activations x INT4/INT8 weights).

An FP-INT matmul is an ``mm``/``addmm``/``bmm`` whose weight operand is computed, only through
elementwise, view and concatenation ops, from an integer-dtype graph input (``QuantLinear.qweight``)
and one float graph input (``QuantLinear.scales``), or two for asymmetric groups (``scales`` and
``mins``, ``u * scale + min``; which is which is found numerically); see :mod:`llm_compile.quantize`.
The weight bits come from the activations' K (asymmetric INT4 and INT8 are both ``uint8``). The
weight sub-graph is checked numerically once per distinct shape (it is run on random packed weights
and compared with :func:`llm_compile.quantize.dequantize_weight`), so any other integer scheme or a
transposed/permuted use is reported in ``skipped`` instead of being rewritten wrongly. The mantissa
width comes from ``config.anda.bits_for(kind, layer)``: the module kind (``qkv``, ``o``, ``gate_up``,
``down``) and the decoder layer (first integer of the module path) from the Dynamo source of
``qweight`` (``ctx.placeholder_sources``); a per-layer ``mantissa_bits`` without an entry for the
linear's layer leaves it unlowered, with the reason in ``skipped``
(:mod:`llm_compile.anda_widths`).

Before (INT4 ``q_proj``, group 64; view/permute of the dequantized weight, then ``mm``)::

    and_1 = aten.bitwise_and.Scalar(qweight, 15); ...; rshift = aten.__rshift__.Scalar(qweight, 4); ...
    cat = aten.cat([unsqueeze_3, unsqueeze_4], -1); view_1 = aten.view(cat, [128, -1])
    convert = prims.convert_element_type(view_1, f32); view_2 = aten.view(convert, [128, 2, 64])
    mul_5 = aten.mul(view_2, aten.unsqueeze(scales, -1)); view_3 = aten.view(mul_5, [128, 128])
    permute = aten.permute(view_3, [1, 0]); view_4 = aten.view(x, [8, 128])
    mm = aten.mm(view_4, permute); view_5 = aten.view(mm, [1, 8, 128])

After (the dequantization chain is dead and removed)::

    view_4 = aten.view(x, [8, 128])
    anda_linear = llmaccel.anda_linear(view_4, qweight, scales, None, None, 7, 4, 64, 'triton')

Asymmetric groups add ``add(mul_5, unsqueeze(mins, -1))`` before the view; the op then gets
``mins`` in place of the first ``None``.
    view_5 = aten.view(anda_linear, [1, 8, 128])
"""
from __future__ import annotations

import logging
import re

import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

import llm_compile.ops.anda  # noqa: F401  (registers llmaccel::anda_linear)
from llm_compile.codegen.anda_kernels import interpreter_active, kernel_source
from llm_compile.codegen.anda_launch import GEMV_MAX_ROWS, plan
from llm_compile.anda_widths import layer_index
from llm_compile.config import LLMAccelConfig
from llm_compile.passes.base import PassContext, PassResult
from llm_compile.quantize import dequantize_weight

log = logging.getLogger(__name__)
aten, prims = torch.ops.aten, torch.ops.prims

MATMULS = {aten.mm.default: (0, 1), aten.addmm.default: (1, 2), aten.bmm.default: (0, 1)}
"""matmul op -> (activation arg index, weight arg index)."""

_CHAIN_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
    aten.t.default, aten.transpose.int, aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default,
    aten.clone.default, aten.cat.default, aten.stack.default, aten.slice.Tensor, aten.select.int,
    aten._to_copy.default, prims.convert_element_type.default, aten.alias.default,
    aten.repeat_interleave.self_int, aten.contiguous.default,
}

KIND_BY_LEAF = {
    "qkv": ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn", "wqkv",
            "query", "key", "value", "q_a_proj", "kv_a_proj_with_mqa"),
    "o": ("o_proj", "out_proj", "wo", "attention.dense", "attn.c_proj", "self_attn.dense"),
    "gate_up": ("gate_proj", "up_proj", "gate_up_proj", "fc1", "c_fc", "w1", "w3", "dense_h_to_4h",
                "mlp.c_fc"),
    "down": ("down_proj", "fc2", "w2", "dense_4h_to_h", "mlp.c_proj"),
}


def module_path_from_source(source: str) -> list[str]:
    """``L_self_modules_model_modules_layers_modules_0_modules_mlp_modules_down_proj_buffers_qweight_``
    -> ``['model', 'layers', '0', 'mlp', 'down_proj']`` (Dynamo source names, any case of ``L_``)."""
    s = re.sub(r"^[lL]_(self_)?", "", source)
    s = re.split(r"_(?:buffers|parameters)_[A-Za-z0-9_]*$", s)[0]
    s = re.sub(r"^modules_", "", s)
    return [p for p in s.split("_modules_") if p]


def module_kind(source: str | None) -> str | None:
    """Anda module kind (``qkv``, ``o``, ``gate_up``, ``down``) of the linear owning ``source``."""
    if not source:
        return None
    parts = [p.lower() for p in module_path_from_source(source)]
    if not parts:
        return None
    leaf, pair = parts[-1], ".".join(parts[-2:])
    for kind, names in KIND_BY_LEAF.items():
        if pair in names:
            return kind
    for kind, names in KIND_BY_LEAF.items():
        if leaf in names:
            return kind
    return None


def _is_chain_op(node: torch.fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target in _CHAIN_OPS:
        return True
    return isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags


def weight_chain(weight: torch.fx.Node, limit: int = 64):
    """``(chain, leaves, blockers)``: the nodes computing ``weight`` through chain ops
    (elementwise/view/cat) in graph order, the graph inputs they read, and the first nodes of other
    kinds met on the way (the walk does not go through those)."""
    chain, leaves, blockers, stack, seen = [], [], [], [weight], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op in ("placeholder", "get_attr"):
            leaves.append(n)
        elif not _is_chain_op(n) or len(chain) >= limit:
            blockers.append(n)
        else:
            chain.append(n)
            stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(weight.graph.nodes)}
    return sorted(chain, key=order.__getitem__), sorted(leaves, key=order.__getitem__), blockers


def _reaches_int_input(nodes, limit: int = 256) -> bool:
    stack, seen = list(nodes), set()
    while stack and len(seen) < limit:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if _int_placeholders([n]):
            return True
        stack.extend(n.all_input_nodes)
    return False


def _val(node):
    v = node.meta.get("val")
    return v if isinstance(v, torch.Tensor) else None


def _random_like(v: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    shape = tuple(int(s) for s in v.shape)
    if v.dtype.is_floating_point:
        return (torch.rand(shape, generator=gen) + 0.5).to(v.dtype)
    info = torch.iinfo(v.dtype)
    return torch.randint(max(info.min, -128), min(info.max, 255) + 1, shape, generator=gen, dtype=v.dtype)


def _run_chain(gm, chain, env) -> torch.Tensor:
    def arg(a):
        return torch.fx.node.map_arg(a, lambda n: env[n])

    for n in chain:
        env[n] = n.target(*arg(n.args), **arg(n.kwargs))
    return env[chain[-1]]


_VERIFIED: dict[tuple, bool] = {}


def _verify(gm, chain, leaves, qw, sc, mn, weight, bits: int, gs: int) -> bool:
    """Run the weight sub-graph on random packed weights; it must equal QuantLinear's dequantization
    (symmetric when ``mn`` is None, else asymmetric with ``mn`` the minima; transposed to ``[K, N]``,
    broadcast for ``bmm``). Cached per op sequence, shapes and roles of the inputs."""
    ids = {n: f"%{i}" for i, n in enumerate(leaves + chain)}
    canon = lambda a: str(torch.fx.node.map_arg(a, ids.__getitem__))  # noqa: E731
    key = (tuple((str(n.target), canon(n.args), canon(n.kwargs)) for n in chain),
           tuple((str(_val(leaf).dtype), tuple(_val(leaf).shape)) if _val(leaf) is not None else leaf.name
                 for leaf in leaves), leaves.index(qw), leaves.index(sc),
           None if mn is None else leaves.index(mn), bits, gs)
    if key in _VERIFIED:
        return _VERIFIED[key]
    ok = False
    try:
        # The backend runs the passes inside AOTAutograd's compile, where a FakeTensorMode is
        # active: without leaving it, the random weights are fake and allclose raises.
        with unset_fake_temporarily(), torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            env = {}
            for leaf in leaves:
                if leaf.op == "get_attr":
                    env[leaf] = getattr(gm, leaf.target)
                else:
                    env[leaf] = _random_like(_val(leaf), gen)
            if mn is not None:   # minima of either sign, distinct from the scales
                env[mn] = env[mn] - 1.0
            got = _run_chain(gm, chain, env)
            expect = dequantize_weight(env[qw], env[sc], bits, gs, got.dtype,
                                       None if mn is None else env[mn]).t()
            want_shape = tuple(int(s) for s in _val(weight).shape)
            ok = tuple(got.shape) == want_shape and torch.allclose(
                got.to(torch.float32), expect.expand(want_shape).to(torch.float32), rtol=1e-2, atol=1e-3)
    except Exception as e:  # an op we cannot run concretely: not a pattern we understand
        log.debug("anda_lowering: weight chain evaluation failed: %s", e)
    _VERIFIED[key] = ok
    return ok


def _int_placeholders(leaves):
    out = []
    for leaf in leaves:
        v = _val(leaf)
        if leaf.op == "placeholder" and v is not None and not v.dtype.is_floating_point \
                and not v.dtype.is_complex and v.dtype != torch.bool:
            out.append(leaf)
    return out


def _site(gm, node: torch.fx.Node, config: LLMAccelConfig, ctx: PassContext, kernel: str):
    """``(replacement args, info)`` for an FP-INT matmul, ``(None, reason)`` if it cannot be lowered,
    ``None`` if ``node`` is not an FP-INT matmul."""
    xi, wi = MATMULS[node.target]
    weight = node.args[wi]
    if not isinstance(weight, torch.fx.Node):
        return None
    chain, leaves, blockers = weight_chain(weight)
    ints = _int_placeholders(leaves)
    if blockers:
        if ints or _reaches_int_input(blockers):
            ops = sorted({str(b.target) for b in blockers})
            return None, f"weight derives from an integer input through non-elementwise ops {ops}"
        return None
    if not ints or not chain:
        return None
    floats = [n for n in leaves if n not in ints and n.op == "placeholder"]
    if len(ints) != 1 or len(floats) not in (1, 2) or any(n.op != "placeholder" and _val(n) is not None
                                                          and _val(n).numel() > 1 for n in leaves):
        return None, "weight derives from integer inputs but not from one (qweight, scales[, mins]) set"
    qw = ints[0]
    qv, fvals = _val(qw), [_val(f) for f in floats]
    xv = _val(node.args[xi]) if isinstance(node.args[xi], torch.fx.Node) else None
    if qv.dim() != 2 or any(v.dim() != 2 for v in fvals) or qv.dtype not in (torch.uint8, torch.int8) \
            or xv is None:
        return None, (f"qweight {qv.dtype}{tuple(qv.shape)} / scales {[tuple(v.shape) for v in fvals]} "
                      "are not QuantLinear's")
    n_out, k = int(qv.shape[0]), int(xv.shape[-1])
    # asymmetric INT8 and INT4 are both uint8: the activations' K tells them apart
    bits = 8 if int(qv.shape[1]) == k else 4 if 2 * int(qv.shape[1]) == k else None
    if bits is None or any(tuple(int(d) for d in v.shape) != tuple(int(d) for d in fvals[0].shape)
                           for v in fvals) or int(fvals[0].shape[0]) != n_out \
            or int(fvals[0].shape[1]) == 0 or k % int(fvals[0].shape[1]):
        return None, f"scales {[tuple(v.shape) for v in fvals]} do not fit qweight {tuple(qv.shape)}, K={k}"
    gs = k // int(fvals[0].shape[1])
    roles = [(floats[0], None)] if len(floats) == 1 else [(floats[0], floats[1]), (floats[1], floats[0])]
    found = [(a, b) for a, b in roles if _verify(gm, chain, leaves, qw, a, b, weight, bits, gs)]
    if not found:
        form = "symmetric" if len(floats) == 1 else "asymmetric"
        return None, f"weight sub-graph is not QuantLinear's {form} INT{bits} dequantization (group {gs})"
    sc, mn = found[0]
    if node.target == aten.addmm.default:
        bias = node.args[0]
        bv = _val(bias) if isinstance(bias, torch.fx.Node) else None
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 \
                or bv is None or tuple(bv.shape) != (n_out,):
            return None, "addmm with alpha/beta != 1 or a bias that is not [N]"
    else:
        bias = None
    source = ctx.placeholder_sources.get(qw.name)
    kind = module_kind(source)
    if kind is None:
        return None, f"unknown module kind for {source or qw.name!r}"
    path = ".".join(module_path_from_source(source))
    layer = layer_index(path)
    try:
        m_bits = config.anda.bits_for(kind, layer)
    except LookupError as e:   # names quoted: one warning per kind of reason (manager.warn_once)
        return None, f"{str(e).split(':')[0]}: no entry for '{path}' (layer '{layer}')"
    args = (node.args[xi], qw, sc, mn, bias, m_bits, bits, gs, kernel)
    info = {"node": node.name, "form": str(node.target.overloadpacket.__name__), "kind": kind,
            "layer": layer, "mantissa_bits": m_bits, "weight_bits": bits, "group_size": gs, "N": n_out, "K": k,
            "symmetric": mn is None,
            "source": source, "kernel": kernel}
    return args, info


def _on_cpu(ctx: PassContext, gm) -> bool:
    for v in list(ctx.example_inputs) + [_val(n) for n in gm.graph.nodes if n.op == "placeholder"]:
        if isinstance(v, torch.Tensor):
            return v.device.type != "cuda"
    return True


def run(gm: torch.fx.GraphModule, config: LLMAccelConfig, ctx: PassContext) -> PassResult:
    """Rewrite every FP-INT matmul of ``gm`` to ``llmaccel::anda_linear`` (see module docstring)."""
    kernel = config.anda.kernel
    stats = {"kernel": kernel}
    if kernel == "triton" and _on_cpu(ctx, gm) and not interpreter_active():
        kernel = "reference"
        stats["kernel"] = "reference"
        stats["note"] = ("CPU graph and triton not imported with TRITON_INTERPRET=1: using the "
                         "reference (torch) implementation of anda_linear")
    matched, skipped, used = [], [], set()
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in MATMULS:
            continue
        site = _site(gm, node, config, ctx, kernel)
        if site is None:
            continue
        args, info = site
        if args is None:
            skipped.append({"node": node.name, "reason": info})
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.llmaccel.anda_linear.default, args)
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "stack_trace", "nn_module_stack")})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        matched.append({"site": len(matched), **info, "node": new.name, "replaced": info["node"]})
        used.add((info["mantissa_bits"], info["weight_bits"], info["group_size"]))
    if kernel == "triton":
        for m_bits, bits, gs in sorted(used):
            if gs % 64:
                continue
            for rows in (1, GEMV_MAX_ROWS + 1):
                for spec in plan(rows, m_bits, bits, gs):
                    ctx.artifacts[f"{spec.name}.py"] = kernel_source(spec)
    stats["by_kind"] = {k: sum(1 for m in matched if m["kind"] == k) for k in KIND_BY_LEAF}
    return PassResult(changed=bool(matched), matched=matched, skipped=skipped, stats=stats)


__all__ = ["run", "module_kind", "module_path_from_source", "weight_chain", "MATMULS", "KIND_BY_LEAF"]
