"""Short context at stock speed: a dense graph below ``swa.min_context``, the SWA graph from then on.

Under ``swa`` every attention site is a Python-dispatched op (KV appended in place, SWA state
checked and updated). At long context that op saves far more than it costs; at a chat-length
context it costs more than the attention itself (about 0.2-0.3 ms per layer and step on a CPU core,
where Inductor's fused dense decode pays nothing). So, when ``swa.min_context`` is set, the
backend compiles each captured graph twice and picks one per call by the sequence's length::

    Dynamo graph --+-- passes off (swa, kv_store off; anda kept) --> dense graph  (stock Inductor)
                   +-- the pipeline as configured                --> SWA graph

    call: n = tokens attended after this call (from the input shapes, see ContextProbe)
          n < min_context and the cache carries no llmaccel state  -> dense graph, and the KV
                                                                      tensors it returns are marked
          otherwise                                                -> SWA graph

The SWA graph's ops adopt a marked cache once (:mod:`llm_compile.runtime.dense_prefix`): the KV is
copied into the in-place store and the SWA scores start from that call's query rows, as after a
prompt. A cache that already carries llmaccel state (phantoms, SWA scores) always goes to the SWA
graph, whose ops handle ``min_context`` themselves (dense and exact below it), so a cache cropped
below ``min_context`` is never read by the dense graph.

A graph whose length cannot be read from its input shapes (HF ``StaticCache``: fixed-size buffers)
or whose shapes fix the length at or above ``min_context`` is compiled once, as before.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Callable

import sympy
import torch

from llm_compile.runtime import dense_prefix
from llm_compile.runtime.kv.store import kv_of
from llm_compile.runtime.swa.op import state_of

log = logging.getLogger(__name__)


def _is_kv_cat(node: torch.fx.Node) -> bool:
    """``torch.cat([past, new], dim=-2)`` of 4-D tensors: a KV-cache append (HF DynamicCache)."""
    if node.op != "call_function" or node.target is not torch.cat:
        return False
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    val = node.meta.get("example_value")
    return dim in (-2, 2) and isinstance(val, torch.Tensor) and val.dim() == 4


def _getter(example_inputs: list, sym: sympy.Symbol) -> Callable[[list], int] | None:
    """How to read the value of ``sym`` from a call's arguments (a SymInt argument, or a tensor dim)."""
    for i, ex in enumerate(example_inputs):
        if isinstance(ex, torch.SymInt) and ex.node.expr == sym:
            return lambda args, i=i: int(args[i])
    for i, ex in enumerate(example_inputs):
        if isinstance(ex, torch.Tensor):
            for d, s in enumerate(ex.shape):
                if isinstance(s, torch.SymInt) and s.node.expr == sym:
                    return lambda args, i=i, d=d: args[i].shape[d]
    return None


@dataclasses.dataclass(frozen=True)
class ContextProbe:
    """What the dispatcher reads from one captured graph."""

    lengths: tuple[Callable[[list], int], ...]
    """Per KV-cache append, the number of tokens in the cache after the call, from the arguments."""
    cache_inputs: tuple[int, ...]
    """Argument positions of the past K/V tensors (to see whether they carry llmaccel state)."""
    cache_outputs: tuple[int, ...]
    """Output positions of the K/V tensors the graph hands back to the model's cache."""
    static_length: int | None
    """The length when the shapes fix it (no symbol), else None."""

    def length(self, args: list) -> int:
        return max(f(args) for f in self.lengths)

    def carries_state(self, args: list) -> bool:
        for i in self.cache_inputs:
            t = args[i]
            if kv_of(t) is not None or state_of(t) is not None or (t.numel() > 1 and not any(t.stride())):
                return True
        return False


def probe(gm: torch.fx.GraphModule, example_inputs: list) -> ContextProbe | None:
    """The probe of a Dynamo graph, or None when its context length is not a function of its input
    shapes (no ``cat``-appended KV cache: StaticCache, no cache) or a symbol cannot be bound."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    vals = [n.meta.get("example_value", ex) for n, ex in zip(placeholders, example_inputs)]
    cats = [n for n in gm.graph.nodes if _is_kv_cat(n)]
    if not cats or len(vals) != len(example_inputs):
        return None
    lengths, static = [], []
    for node in cats:
        n = node.meta["example_value"].shape[-2]
        if not isinstance(n, torch.SymInt):
            static.append(int(n))
            lengths.append(lambda args, n=int(n): n)
            continue
        expr = n.node.expr
        getters = {s: _getter(vals, s) for s in expr.free_symbols}
        if any(g is None for g in getters.values()):
            return None
        syms = sorted(getters, key=str)
        fn = sympy.lambdify(syms, expr, modules="math")
        gets = [getters[s] for s in syms]
        lengths.append(lambda args, fn=fn, gets=gets: int(fn(*(g(args) for g in gets))))
    index = {n: i for i, n in enumerate(placeholders)}
    first = [node.args[0][0] for node in cats]
    cache_inputs = tuple(index[a] for a in first if isinstance(a, torch.fx.Node) and a in index)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    outs = out if isinstance(out, (list, tuple)) else (out,)
    cat_set = set(cats)
    cache_outputs = tuple(i for i, o in enumerate(outs) if o in cat_set)
    return ContextProbe(tuple(lengths), cache_inputs, cache_outputs,
                        max(static) if len(static) == len(cats) else None)


class ContextDispatch:
    """The compiled artefact of one graph under ``swa.min_context``: dense below it, SWA from it on.

    ``calls`` counts the calls per form (``"dense"``, ``"swa"``), for tests and benchmarks."""

    def __init__(self, probe: ContextProbe, min_context: int, swa_fn, dense_fn, graph_id: str) -> None:
        self.probe, self.min_context = probe, min_context
        self.swa_fn, self.dense_fn, self.graph_id = swa_fn, dense_fn, graph_id
        self.calls: Counter = Counter()

    def __call__(self, *args):
        dense = self.probe.length(args) < self.min_context and not self.probe.carries_state(args)
        if not dense and self.swa_fn is None:
            raise RuntimeError(
                f"llmaccel: {self.graph_id} was compiled dense only (its shapes fix the context below "
                f"swa.min_context={self.min_context}) but was called with a cache that carries llmaccel "
                "state; please report this with the debug dump (options['debug_dir'])")
        self.calls["dense" if dense else "swa"] += 1
        out = (self.dense_fn if dense else self.swa_fn)(*args)
        if dense:
            for i in self.probe.cache_outputs:
                dense_prefix.mark(out[i])
        return out


def dense_config(config):
    """``config`` with the stateful per-site passes off (what the dense graph compiles with)."""
    return dataclasses.replace(config, swa=None, kv_store=None, kv_tiers=None, canonicalize=False)


def applies(config) -> bool:
    """Whether ``config`` asks for the two-graph form: ``swa`` with ``min_context`` > 0, and neither
    ``offload`` nor ``kv_tiers`` (their ops keep state the dense graph could not hand over)."""
    return (config.swa is not None and config.swa.min_context > 0 and config.swa.sparsity > 0
            and config.offload is None and config.kv_tiers is None)
