"""Decode matmuls in the weight-major form on CPU: ``x @ W^T`` with few rows -> ``(W @ x^T)^T``.

A decode step multiplies a few activation rows (batch x 1 token) by every weight matrix of the
model. On CPU, BLAS can run that product (``mm(x, permute(W))``: M <= 16 rows against an [N, K]
weight) much slower than the same dot products in the weight-major form ``mm(W, x^T)``; e.g.
SmolLM2's ``lm_head`` (N = 49152, K = 576) at batch 4 on one core of the development machine:
41 ms vs 20 ms. The pass rewrites each such ``mm``/``addmm`` whose weight-major form is faster
*on this machine*: both forms are timed once per (M, K, N, weight layout, dtype, threads) on
tensors of the node's shapes and strides, with the weights cold as in a decode step, in this
process (:func:`measure`), and a node is rewritten only when the weight-major form takes at most
``1 - MARGIN`` of the time.

Before (``lm_head``, batch 4 decode)::

    permute = aten.permute.default(lm_head_weight, [1, 0])   # [576, 49152], a view of [49152, 576]
    mm = aten.mm.default(view, permute)                      # [4, 49152]

After::

    permute_2 = aten.permute.default(view, [1, 0])           # x^T [576, 4]
    mm_1 = aten.mm.default(lm_head_weight, permute_2)        # [49152, 4]: the weight as stored
    permute_3 = aten.permute.default(mm_1, [1, 0])           # [4, 49152], a transposed view
    clone = aten.clone.default(permute_3, memory_format=torch.contiguous_format)  # row-major again

The result is copied back to the row-major layout the graph was traced with (M x N values, small
next to the N x K weight read; Inductor fuses the copy into the next op where it can): users and
outputs keep the strides recorded for them. ``addmm(bias, x, W^T)`` adds the bias before the copy. The dot products are the same, their
summation order inside BLAS is not: outputs differ from eager by float rounding (~1e-6 relative in
float32), which is why the pass is off unless asked for (``options={"decode_matmul": True}``).
Left alone, with the reason in ``passes.json``: non-CPU tensors, dtypes other than float32, more
than ``MAX_ROWS`` rows or a symbolic row count, weights under ``MIN_WEIGHT`` elements, and shapes
where the weight-major form is not faster.
"""
from __future__ import annotations

import time
from functools import lru_cache

import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from llm_compile.config import LLMAccelConfig
from llm_compile.passes.attention_patterns import is_op, val
from llm_compile.passes.base import PassContext, PassResult

aten = torch.ops.aten

MAX_ROWS = 16
"""Activation rows (batch x tokens) up to which a matmul counts as a decode matmul."""
MIN_WEIGHT = 1 << 16
"""Weights with fewer elements are left alone (too small for the form to matter)."""
MARGIN = 0.1
"""The weight-major form must save at least this share of the time to be used."""
REPEATS = 5


COLD_BYTES = 64 << 20
"""Weights are timed cold: copies of the weight totalling this many bytes are used in turn (more
than a CPU's last-level cache), as in a decode step, which streams every weight from memory once."""


@lru_cache(maxsize=256)
def measure(m: int, k: int, n: int, weight_major: bool, dtype: torch.dtype, threads: int) -> dict:
    """Milliseconds of ``mm(x, w)`` and of ``mm(w^T, x^T)^T`` for x [m, k] and w [k, n] (a view of
    an [n, k] weight when ``weight_major``, as ``nn.Linear`` stores it; else [k, n] contiguous),
    per call with cold weights (:data:`COLD_BYTES`), best of ``REPEATS`` interleaved rounds.
    Measured once per process and shape: a property of the machine, not of a sequence."""
    with unset_fake_temporarily():
        copies = max(1, min(64, -(-COLD_BYTES // (n * k * torch.finfo(dtype).bits // 8))))
        x = torch.full((m, k), 0.5, dtype=dtype)
        ws = [torch.full((n, k), 0.25, dtype=dtype).t() if weight_major else torch.full((k, n), 0.25, dtype=dtype)
              for _ in range(copies)]
        forms = {"row_major_ms": lambda w: torch.mm(x, w), "weight_major_ms": lambda w: torch.mm(w.t(), x.t()).t()}
        best = {name: float("inf") for name in forms}
        for fn in forms.values():
            fn(ws[0])
        for _ in range(REPEATS):
            for name, fn in forms.items():
                t0 = time.perf_counter()
                for w in ws:
                    fn(w)
                best[name] = min(best[name], (time.perf_counter() - t0) / copies)
    return {name: round(s * 1e3, 4) for name, s in best.items()}


def _why_not(node: torch.fx.Node, a, b) -> str | None:
    va, vb = val(a), val(b)
    if va is None or vb is None or va.dim() != 2 or vb.dim() != 2:
        return "operands are not 2-D tensors with known shapes"
    if va.device.type != "cpu" or vb.device.type != "cpu":
        return f"on {va.device.type}, not CPU (the rewrite is a CPU BLAS matter)"
    if va.dtype != torch.float32 or vb.dtype != torch.float32:
        return f"dtype {va.dtype} (only float32 is measured)"
    m = va.shape[0]
    if not isinstance(m, int):
        return "the row count is symbolic (a dynamic-shape graph)"
    if m > MAX_ROWS:
        return f"{m} rows (> {MAX_ROWS}: not a decode step)"
    if not all(isinstance(d, int) for d in (*va.shape, *vb.shape)):
        return "symbolic weight shape"
    if vb.numel() < MIN_WEIGHT:
        return f"weight of {vb.numel()} elements (< {MIN_WEIGHT})"
    if node.target is aten.addmm.default and (node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1):
        return "addmm with beta/alpha other than 1"
    return None


def _rewrite(gm: torch.fx.GraphModule, node: torch.fx.Node, a, b, bias) -> torch.fx.Node:
    g = gm.graph
    with g.inserting_before(node):
        if is_op(b, {aten.permute.default, aten.t.default}) and val(b.args[0]) is not None:
            w = b.args[0]  # the weight as stored (nn.Linear's [N, K]); b's permute dies
        else:
            w = g.call_function(aten.permute.default, (b, [1, 0]))
            w.meta["val"] = val(b).permute(1, 0)
        xt = g.call_function(aten.permute.default, (a, [1, 0]))
        xt.meta["val"] = val(a).permute(1, 0)
        mm = g.call_function(aten.mm.default, (w, xt))
        mm.meta["val"] = torch.mm(w.meta["val"], xt.meta["val"])
        out = g.call_function(aten.permute.default, (mm, [1, 0]))
        out.meta["val"] = mm.meta["val"].permute(1, 0)
        if bias is not None:
            out = g.call_function(aten.add.Tensor, (out, bias))
            out.meta["val"] = torch.add(out.args[0].meta["val"], val(bias))
        # the old node's layout (row-major [M, N]): the graph's users and outputs keep the strides
        # they were traced with (a transposed result reinterpreted as row-major is a wrong answer)
        out = g.call_function(aten.clone.default, (out,), {"memory_format": torch.contiguous_format})
        out.meta["val"] = node.meta["val"]
    node.replace_all_uses_with(out)
    g.erase_node(node)
    return out


def run(gm: torch.fx.GraphModule, config: LLMAccelConfig, ctx: PassContext) -> PassResult:
    matched, skipped = [], []
    threads = torch.get_num_threads()
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default):
            continue
        bias, a, b = (None, *node.args[:2]) if node.target is aten.mm.default else node.args[:3]
        why = _why_not(node, a, b)
        if why is not None:
            skipped.append({"node": node.name, "reason": why})
            continue
        va, vb = val(a), val(b)
        m, k, n = va.shape[0], va.shape[1], vb.shape[1]
        weight_major = vb.stride(0) == 1 and vb.stride(1) == k
        times = measure(m, k, n, weight_major, va.dtype, threads)
        entry = {"node": node.name, "m": m, "k": k, "n": n, "weight_major": weight_major, **times}
        if times["weight_major_ms"] > (1 - MARGIN) * times["row_major_ms"]:
            skipped.append({**entry, "reason": "the weight-major form is not faster on this machine"})
            continue
        new = _rewrite(gm, node, a, b, bias)
        matched.append({**entry, "replaced_by": new.name})
    saved = sum(e["row_major_ms"] - e["weight_major_ms"] for e in matched)
    return PassResult(changed=bool(matched), matched=matched, skipped=skipped,
                      stats={"rewritten": len(matched), "predicted_saving_ms": round(saved, 3),
                             "threads": threads})
