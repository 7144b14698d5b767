"""``offload.overlap``: two micro-batches in ping-pong (Lamina), so that one half of the batch's
attention runs on the workers while the other half's non-attention part computes here.

The offload pass hands the rewritten ATen graph to :class:`OverlapRunner` and replaces the graph's
body by one call to :func:`run_overlap` (an opaque Python call: ``inner="eager"`` only). At run
time the runner splits every batch-major input in two halves along dim 0 and interprets the graph
once per half, segment by segment (a segment ends at an ``llmaccel::offload_attention`` call)::

    seg0(A) send0(A) | seg0(B) send0(B) | wait0(A) seg1(A) send1(A) | wait0(B) seg1(B) send1(B) | ...

so ``seg_i(B)`` computes while ``attention_i(A)`` is in flight (``decode_async``), and the other
way round. Each half is its own sub-batch of the sequence on the workers (worker key
``seq_id + (h + 1) << 52``, :func:`~llm_compile.ops.offload.worker_key`; releasing the sequence
releases both), so prefill and decode must both run split: they do, since the decision depends
only on the batch size. The prefill's ``llmaccel::offload_sequence`` runs once per call, shared by
both halves.

Batch dimension. Only graphs whose batch size is *symbolic* (``torch.compile(..., dynamic=True)``,
or ``torch._dynamo.mark_dynamic(input_ids, 0)``) can run on half batches: a static batch is baked
into shape arguments (``view(x, [2, 1, 9, 64])``). The batch symbol is dim 0 of the first
attention site's query; an input is split when its dim 0 is that symbol, a SymInt input equal to
it becomes the half size. Outputs with that leading dim are concatenated (phantom caches are
rebuilt as one phantom of the same sequence, no memory). Halves are ``B - B//2`` and ``B//2`` (an odd batch splits
unevenly; a batch of 1 is one "half").

A graph whose batch is static (or a batch of 1) runs whole, without overlap, but its attention
calls still go out per half, under the halves' keys: prefill and decode graphs of one model may
differ in that respect (Dynamo may specialise the batch in one of them), and the workers must
find each half's cache whichever graph runs.
"""
from __future__ import annotations

import logging
import operator

import torch
import torch.fx
from torch import Tensor

from llm_compile.ops.attention import to_out_layout
from llm_compile.ops.offload import cache_sequence, sub_batch, worker_key
from llm_compile.runtime.context import lookup_handle, register_handle
from llm_compile.runtime.offload.protocol import SUB_BATCH_SHIFT
from llm_compile.runtime.offload.sequences import live_handle, sequence_of, sequence_phantom

log = logging.getLogger(__name__)

HALF_KEY = 1 << SUB_BATCH_SHIFT
"""Worker key of half ``h`` (0, 1) of sequence ``s``: ``s + (h + 1) * HALF_KEY``."""
SEQUENCE = torch.ops.llmaccel.offload_sequence.default


def _expr(x):
    return x.node.expr if isinstance(x, torch.SymInt) else x


def batch_symbol(gm: torch.fx.GraphModule, offload_target):
    """The symbolic batch size (sympy expr) of the graph, or ``None`` if it is static/unknown."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target == offload_target:
            q = n.args[0].meta.get("val") if isinstance(n.args[0], torch.fx.Node) else None
            if isinstance(q, Tensor) and isinstance(q.shape[0], torch.SymInt) and q.shape[0].node.expr.is_symbol:
                return q.shape[0].node.expr
            return None
    return None


def _static_batch(gm: torch.fx.GraphModule, offload_target):
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target == offload_target:
            return n.args[0].meta["val"].shape[0]
    return None


def _batch_major(val, sym) -> bool:
    return isinstance(val, Tensor) and val.dim() > 0 and isinstance(val.shape[0], torch.SymInt) \
        and val.shape[0].node.expr == sym


class OverlapRunner:
    """Runs one offloaded graph as two ping-ponged half batches (see the module docstring)."""

    def __init__(self, gm: torch.fx.GraphModule, sym, offload_target) -> None:
        self.gm, self.sym, self.offload = gm, sym, offload_target
        nodes = list(gm.graph.nodes)
        self.placeholders = [n for n in nodes if n.op == "placeholder"]
        self.output = nodes[-1]
        self.split_in = [_batch_major(n.meta.get("val"), sym) for n in self.placeholders]
        self.static_batch = None if sym is not None else int(_static_batch(gm, offload_target))
        self.sym_in = [isinstance(n.meta.get("val"), torch.SymInt) and _expr(n.meta["val"]) == sym
                       for n in self.placeholders]
        outs = self.output.args[0]
        self.split_out = [isinstance(o, torch.fx.Node) and _batch_major(o.meta.get("val"), sym) for o in outs]
        self.sym_out = [isinstance(o, torch.fx.Node) and isinstance(o.meta.get("val"), torch.SymInt)
                        and _expr(o.meta["val"]) == sym for o in outs]
        body = [n for n in nodes if n.op in ("call_function", "get_attr")]
        self.segments: list[list[torch.fx.Node]] = [[]]
        for n in body:  # each segment ends with (and includes) one offload_attention call
            self.segments[-1].append(n)
            if n.op == "call_function" and n.target == offload_target:
                self.segments.append([])
        self.handle = register_handle(self)
        self.calls = 0
        self.split_calls = 0
        self.last_keys: list[int] = []
        """Worker keys of the halves in the last call."""

    # -- interpretation -----------------------------------------------------------------------
    def _eval(self, n: torch.fx.Node, env: dict):
        if n.op == "get_attr":
            obj = self.gm
            for part in n.target.split("."):
                obj = getattr(obj, part)
            return obj
        args = torch.fx.node.map_arg(n.args, env.__getitem__)
        kwargs = torch.fx.node.map_arg(n.kwargs, env.__getitem__)
        return n.target(*args, **kwargs)

    def _issue(self, n: torch.fx.Node, env: dict, half: int):
        """The segment's final offload call: a decode goes out asynchronously; a prefill (store-only
        or SWA on the workers) runs as the op does."""
        q, k, v, kc, vc, mask, scale, causal, site, pool_h, swa_h, *_ = torch.fx.node.map_arg(n.args, env.__getitem__)
        with sub_batch(half):
            if kc is None:
                return None, self._eval(n, env)
            key = worker_key(cache_sequence(kc, site))
            self._record(half, key)
            pool = lookup_handle(pool_h)
            return pool.decode_async(key, site, q, k, v, scale, mask, causal, cached_len=kc.shape[-2]), None

    def _record(self, half: int, key: int) -> None:
        if half < len(self.last_keys):
            self.last_keys[half] = key

    def _eval_once(self, n: torch.fx.Node, env: dict, shared: dict):
        """Evaluate ``n``; a sequence allocation is made once per call and shared by the halves."""
        if n.op == "call_function" and n.target == SEQUENCE:
            if n not in shared:
                shared[n] = self._eval(n, env)
                seq_id = sequence_of(shared[n])
                self.last_keys = [seq_id + (h + 1) * HALF_KEY for h in range(len(self.last_keys))]
            return shared[n]
        return self._eval(n, env)

    def _run_segment(self, seg, env, half, pending, shared):
        if pending is not None:  # the previous segment's attention of this half
            node, fut = pending
            env[node] = to_out_layout(fut.wait())
        last = seg[-1] if seg else None
        for n in seg:
            if n is last and n.op == "call_function" and n.target == self.offload:
                break
            env[n] = self._eval_once(n, env, shared)
        if last is not None and last.op == "call_function" and last.target == self.offload:
            fut, out = self._issue(last, env, half)
            if fut is None:
                env[last] = out
                return None
            return (last, fut)
        return None

    def _attend_unsplit(self, n: torch.fx.Node, env: dict, sizes):
        """An offload call of a graph run whole: each half still goes to (and stays on) the workers
        under that half's key, so split and unsplit graphs of one model agree."""
        q, k, v, kc, vc, mask, scale, causal, site, pool_h, swa_h, *seq = torch.fx.node.map_arg(n.args, env.__getitem__)
        B, outs, futs, start = q.shape[0], [], [], 0
        for half, size in enumerate(sizes):
            sl = [None if t is None else (t.narrow(0, start, size) if t.dim() and t.shape[0] == B else t)
                  for t in (q, k, v, kc, vc, mask)]
            start += size
            with sub_batch(half):
                if kc is None:
                    outs.append(torch.ops.llmaccel.offload_attention(*sl, scale, causal, site, pool_h, swa_h, *seq))
                else:
                    key = worker_key(cache_sequence(kc, site))
                    self._record(half, key)
                    futs.append(lookup_handle(pool_h).decode_async(key, site, sl[0], sl[1], sl[2], scale, sl[5],
                                                                   causal, cached_len=sl[3].shape[-2]))
        outs += [f.wait() for f in futs]
        return to_out_layout(torch.cat(outs, 0)) if len(outs) > 1 else to_out_layout(outs[0])

    def __call__(self, *args):
        self.calls += 1
        B = self.static_batch
        if B is None:
            B = next(a.shape[0] for a, s in zip(args, self.split_in) if s)
        sizes = [B - B // 2, B // 2]
        if sizes[1] == 0:
            sizes = sizes[:1]
        self.last_keys = [0] * len(sizes)
        shared: dict = {}
        if self.sym is None or len(sizes) == 1:
            env = dict(zip(self.placeholders, args))
            for seg in self.segments:
                for n in seg:
                    off = n.op == "call_function" and n.target == self.offload
                    env[n] = self._attend_unsplit(n, env, sizes) if off else self._eval_once(n, env, shared)
            return tuple(torch.fx.node.map_arg(self.output.args[0], env.__getitem__))
        self.split_calls += 1
        envs, start = [], 0
        for size in sizes:
            vals = [a.narrow(0, start, size) if s else (size if si else a)
                    for a, s, si in zip(args, self.split_in, self.sym_in)]
            start += size
            envs.append(dict(zip(self.placeholders, vals)))
        pending = [None, None]
        for seg in self.segments:
            for i in range(2):
                pending[i] = self._run_segment(seg, envs[i], i, pending[i], shared)
        outs = [torch.fx.node.map_arg(self.output.args[0], e.__getitem__) for e in envs]
        return tuple(self._join(a, b, split, is_sym, B) for a, b, split, is_sym
                     in zip(outs[0], outs[1], self.split_out, self.sym_out))

    @staticmethod
    def _join(a, b, split: bool, is_sym: bool, B: int):
        if is_sym:
            return B
        if not split:
            return a
        if a.dim() and not any(a.stride()) and a.numel() > 1:  # phantoms: one phantom, no memory
            shape = [B, *a.shape[1:]]
            seq_id = sequence_of(a)
            if seq_id is not None:
                return sequence_phantom(live_handle(seq_id), a, shape)
            return a.new_zeros(1).as_strided(shape, [0] * len(shape))
        return torch.cat([a, b], 0)


def run_overlap(handle: int, *args):
    """Graph body under ``offload.overlap``: the :class:`OverlapRunner` of ``handle``."""
    return lookup_handle(handle)(*args)


run_overlap.llmaccel_reads_phantoms_by_length = True  # type: ignore[attr-defined]
"""The runner passes the phantom caches only to offload ops (the backend's phantom check)."""


def install(gm: torch.fx.GraphModule, offload_target) -> str:
    """Replace ``gm``'s body by a call to an :class:`OverlapRunner` over a copy of it (its runtime
    handle in ``gm.meta["llmaccel_overlap_runner"]``). Returns a short status for the pass report
    (``"applied"`` or why not)."""
    sym = batch_symbol(gm, offload_target)
    inner = torch.fx.GraphModule(gm, _copy(gm.graph))
    runner = OverlapRunner(inner, sym, offload_target)
    g = gm.graph
    phs = [n for n in g.nodes if n.op == "placeholder"]
    out = next(n for n in reversed(g.nodes) if n.op == "output")
    n_out = len(out.args[0])
    with g.inserting_before(out):
        call = g.call_function(run_overlap, (runner.handle, *phs))
        new_out = [g.call_function(operator.getitem, (call, i)) for i in range(n_out)]
    out.args = (tuple(new_out),)
    for n in reversed(list(g.nodes)):
        if n.op not in ("placeholder", "output") and n is not call and n not in new_out:
            g.erase_node(n)
    gm.recompile()
    gm.meta["llmaccel_overlap_runner"] = runner.handle
    if sym is None:
        return ("applied unsplit: the batch size is static, so the graph runs whole (no overlap; "
                "attention still per half); compile with dynamic=True to overlap")
    return "applied"


def _copy(graph: torch.fx.Graph) -> torch.fx.Graph:
    new = torch.fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    return new
