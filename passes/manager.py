"""Runs the ordered pipeline on one ATen graph: time, stats, cleanup, rollback, dump.

A pass that raises leaves the graph exactly as it was before it ran (the graph is copied first and
restored); the exception is logged and recorded in ``passes.json``, and compilation goes on: every
pass here only ever replaces a computation by an equivalent or approximate one, so leaving a site
unrewritten is always correct. Except when the user asked for what the pass does and it cannot
apply: the pass raises :class:`~llm_compile.passes.base.RequestedPassError`, which fails the
compilation with its message instead (offload: the KV cache must not silently stay local).
"""
from __future__ import annotations

import logging
import time
import traceback
from collections import Counter

import torch.fx

from llm_compile.config import LLMAccelConfig
from llm_compile.passes.base import PassContext, PassResult, RequestedPassError
from llm_compile.passes.cleanup import cleanup
from llm_compile.passes.pipeline import PIPELINE

log = logging.getLogger(__name__)


def op_counts(gm: torch.fx.GraphModule) -> Counter:
    return Counter(str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module"))


def _copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    new = torch.fx.Graph(owning_module=graph.owning_module, tracer_cls=graph._tracer_cls)
    out = new.graph_copy(graph, {})
    new.output(out)
    new._codegen = graph._codegen
    return new


def run_pipeline(gm: torch.fx.GraphModule, config: LLMAccelConfig, ctx: PassContext, dump=None) -> list[dict]:
    """Apply every enabled pass of :data:`PIPELINE` in order; returns one record per pass."""
    records = []
    for spec in PIPELINE:
        if not spec.enabled(config):
            continue
        before_counts = op_counts(gm)
        n_before = len(gm.graph.nodes)
        saved = _copy_graph(gm.graph)
        t0 = time.perf_counter()
        error = None
        try:
            result = spec.load()(gm, config, ctx)
            if not isinstance(result, PassResult):
                raise TypeError(f"pass {spec.name} returned {type(result).__name__}, not PassResult")
            cleanup(gm)
        except RequestedPassError:
            raise
        except Exception as e:  # a pass must never break compilation: roll back and report
            gm.graph = saved
            gm.recompile()
            error = f"{type(e).__name__}: {e}"
            log.warning("llmaccel: pass %s failed on %s and was rolled back: %s", spec.name, ctx.graph_id, error)
            log.debug("%s", traceback.format_exc())
            result = PassResult(changed=False, skipped=[{"reason": f"pass raised, graph rolled back: {error}"}])
        after_counts = op_counts(gm)
        delta = {k: after_counts[k] - before_counts[k] for k in set(before_counts) | set(after_counts)
                 if after_counts[k] != before_counts[k]}
        record = {
            "pass": spec.name,
            "changed": bool(result.changed),
            "time_s": round(time.perf_counter() - t0, 6),
            "nodes_before": n_before,
            "nodes_after": len(gm.graph.nodes),
            "op_count_delta": dict(sorted(delta.items())),
            "matched": result.matched,
            "skipped": result.skipped,
            "stats": result.stats,
        }
        if error:
            record["error"] = error
        for s in result.skipped:
            log.info("llmaccel: %s skipped a site in %s: %s", spec.name, ctx.graph_id, s.get("reason"))
        records.append(record)
        if dump is not None:
            dump.stage(spec.name, gm)
    if dump is not None:
        dump.passes_json(records)
        for name, text in ctx.artifacts.items():
            dump.artifact(name, text)
    return records
