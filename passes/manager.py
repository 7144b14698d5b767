"""Runs the ordered pipeline on one ATen graph: time, stats, cleanup, rollback, dump.

A pass that raises leaves the graph exactly as it was before it ran (the graph is copied first and
restored); the exception is logged, recorded in ``passes.json`` and raised as a Python warning
(once per pass and error per process), and compilation goes on: every pass here only ever replaces
a computation by an equivalent or approximate one, so leaving a site unrewritten is always correct.

A pass the user asked for (``swa``, ``anda``, ``offload``, ``kv_store`` on its own) that leaves
sites it should have rewritten warns once per reason per process (:class:`PassNotAppliedWarning`),
e.g. ``swa`` on attention that cannot be canonicalised (Gemma2's soft-capping), or ``anda`` on a
model without quantized weights ("call llm_compile.quantize_weights first"). A graph with no
attention (or no matmul) at all warns nothing: there was nothing to rewrite.

A pass the user asked for whose work cannot apply raises
:class:`~llm_compile.passes.base.RequestedPassError`, which fails the compilation with its message
instead of a rollback (offload: the KV cache must not silently stay local).
"""
from __future__ import annotations

import logging
import re
import threading
import time
import traceback
import warnings
from collections import Counter

import torch.fx

from llm_compile.config import LLMAccelConfig
from llm_compile.passes.base import PassContext, PassResult, RequestedPassError
from llm_compile.passes.cleanup import cleanup
from llm_compile.passes.pipeline import PIPELINE

log = logging.getLogger(__name__)

ATTENTION_PASSES = ("sparse_window_attention", "local_kv_store", "attention_offload")
"""Passes that rewrite ``llmaccel::attention``: a site canonicalisation skipped is a site they miss."""

REQUESTED = {
    "sparse_window_attention": lambda c: c.swa is not None,
    "anda_lowering": lambda c: c.anda is not None,
    "attention_offload": lambda c: c.offload is not None,
    "local_kv_store": lambda c: c.kv_store is not None and c.swa is None,  # with swa it is implied
}
"""Passes the user asked for by name (canonicalisation is a means, not a request)."""


class PassNotAppliedWarning(UserWarning):
    """A requested pass left sites unrewritten (or raised and was rolled back); the message says why."""


_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def warn_once(pass_name: str, reason: str, graph_id: str) -> None:
    """``warnings.warn`` once per (pass, reason) per process; later occurrences are only logged.
    Quoted names in the reason (a node, a module) do not count: one warning per kind of reason."""
    key = (pass_name, re.sub(r"'[^']*'", "'…'", reason))
    with _warned_lock:
        first = key not in _warned
        _warned.add(key)
    if first:
        warnings.warn(f"llmaccel: {pass_name} not applied in {graph_id} (and possibly later graphs): "
                      f"{reason}", PassNotAppliedWarning, stacklevel=2)
    else:
        log.info("llmaccel: %s not applied in %s: %s", pass_name, graph_id, reason)


def _has_quantized_weights(gm: torch.fx.GraphModule, ctx: PassContext) -> bool:
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        v = n.meta.get("val")
        if getattr(v, "dtype", None) in (torch.int8, torch.uint8) or "qweight" in ctx.placeholder_sources.get(n.name, ""):
            return True
    return False


def _reasons(entries: list[dict]) -> list[str]:
    return sorted({str(e.get("reason")) for e in entries if e.get("reason")})


def unapplied_reasons(name: str, record: dict, records: list[dict], gm, ctx: PassContext) -> list[str]:
    """Why the requested pass ``name`` left sites of this graph unrewritten ([] if it did not)."""
    if record.get("error"):
        return []  # reported by the rollback warning
    out = []
    if name in ATTENTION_PASSES:
        canon = next((r for r in records if r["pass"] == "canonicalize_attention"), None)
        if canon is not None:
            out += [f"an attention site could not be canonicalised ({r}); it runs as the model wrote it"
                    for r in _reasons(canon["skipped"])]
        if name == "sparse_window_attention":
            out += _reasons(record["skipped"])  # site-level refusals (e.g. sliding-window layers)
        elif not record["matched"] and record["skipped"] and canon is not None and canon["matched"]:
            # a forward without a cache (use_cache=False) has nothing to relocate: not a miss
            out += [r for r in _reasons(record["skipped"]) if "nothing to store" not in r]
    elif name == "anda_lowering" and record["matched"]:
        # a per-layer width list too short for the model: a configuration error, not a miss
        out += [r for r in _reasons(record["skipped"]) if r.startswith("anda.mantissa_bits")]
    elif name == "anda_lowering":
        if not _has_quantized_weights(gm, ctx):
            if any(str(n.target).startswith(("aten.mm", "aten.addmm")) for n in gm.graph.nodes):
                out.append("the graph has no quantized weights (no QuantLinear): call "
                           "llm_compile.quantize_weights(model, bits=4, group_size=64) before torch.compile")
        else:
            out += _reasons(record["skipped"])
    return out


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
            warn_once(spec.name, f"the pass raised and was rolled back (the graph runs without it): {error}",
                      ctx.graph_id)
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
        if REQUESTED.get(spec.name, lambda c: False)(config):
            for reason in unapplied_reasons(spec.name, record, records, gm, ctx):
                warn_once(spec.name, reason, ctx.graph_id)
        if dump is not None:
            dump.stage(spec.name, gm)
    if dump is not None:
        dump.passes_json(records)
        for name, text in ctx.artifacts.items():
            dump.artifact(name, text)
    return records
