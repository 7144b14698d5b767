"""The ``"llmaccel"`` torch.compile backend.

Flow for every graph Dynamo captures::

    Dynamo FX graph --AOTAutograd (inference, Inductor decompositions)--> functionalized ATen graph
      --> ordered pass pipeline (llm_compile.passes.pipeline.PIPELINE)
      --> Inductor ``compile_fx_inner``  (or the graph as is, with options={"inner": "eager"})

It is registered through the ``torch_dynamo_backends`` entry point, so
``torch.compile(fn, backend="llmaccel")`` works without importing ``llm_compile`` first.
"""
from __future__ import annotations

import itertools
from collections import deque
import logging
import threading

import torch
from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func

import llm_compile.ops  # noqa: F401  (registers llmaccel:: ops)
from llm_compile.config import OptionsError, parse_options
from llm_compile.debug import DebugDump
from llm_compile.passes.base import PassContext
from llm_compile.passes.manager import run_pipeline
from llm_compile.runtime.context import instance_key_from_args, running

log = logging.getLogger(__name__)

_graph_ids = itertools.count()
_graph_lock = threading.Lock()

COMPILED: deque[dict] = deque(maxlen=256)
"""The most recent compiled graphs of this process: ``{"graph_id", "passes"}`` (pass records as in
``passes.json``). Handy to count graphs (recompiles) and sites without a debug dump."""


def _next_graph_id() -> str:
    with _graph_lock:
        return f"graph_{next(_graph_ids):03d}"


def _placeholder_names(gm: torch.fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "placeholder"]


def _inner_compile(gm: torch.fx.GraphModule, example_inputs, inner: str):
    if inner == "eager":
        return make_boxed_func(gm.forward)
    from torch._inductor.compile_fx import compile_fx_inner

    return compile_fx_inner(gm, example_inputs, is_inference=True)


def llmaccel(gm: torch.fx.GraphModule, example_inputs, *, options=None, mode=None):
    """Dynamo backend entry: ``torch.compile(fn, backend="llmaccel", options={...})``."""
    if mode not in (None, "default"):
        raise OptionsError(f"llmaccel: mode={mode!r} is not supported; configure it with options={{...}}")
    config = parse_options(options)
    graph_id = _next_graph_id()
    dump = DebugDump(config.debug_dir, graph_id, config.debug_passes)
    dump.stage("dynamo", gm)
    dynamo_names = _placeholder_names(gm)
    fallback_instance = id(gm)

    def fw_compiler(aten_gm: torch.fx.GraphModule, aten_inputs):
        aten_names = _placeholder_names(aten_gm)
        sources = dict(zip(aten_names, dynamo_names)) if len(aten_names) == len(dynamo_names) else {}
        ctx = PassContext(graph_id=graph_id, example_inputs=list(aten_inputs), placeholder_sources=sources)
        dump.stage("aten", aten_gm)
        records = run_pipeline(aten_gm, config, ctx, dump)
        COMPILED.append({"graph_id": graph_id, "passes": records})
        dump.repro(aten_gm, aten_inputs)
        _refuse_phantom_reads(aten_gm, graph_id)
        return _inner_compile(aten_gm, aten_inputs, config.inner)

    # --- training mode (issue 13, item 9): refused with passes on; plain autograd with all off ---
    if torch.is_grad_enabled() and any(getattr(x, "requires_grad", False) for x in example_inputs):
        return _training_graph(gm, example_inputs, config, graph_id)
    # --- end training mode ---
    with torch.no_grad():
        compiled = aot_module_simplified(
            gm, example_inputs, fw_compiler=fw_compiler, inference_compiler=fw_compiler,
            decompositions=_decompositions(),
        )

    def run(*args):
        with running(instance_key_from_args(args, fallback_instance)):
            return compiled(*args)

    run._llmaccel_graph_id = graph_id  # type: ignore[attr-defined]
    return run


class TrainingModeError(RuntimeError):
    """A graph compiled for training (grad mode on, inputs that require grad) with a pass on."""


def _training_graph(gm: torch.fx.GraphModule, example_inputs, config, graph_id: str):
    """Grad mode is on and some input requires grad: training, or inference without no_grad.
    The passes' ops have no backward, so any pass on is refused here, at compile time, rather than
    failing later in ``backward()``. With every pass off there is nothing to rewrite (attention is
    not canonicalised either): the graph keeps autograd (``inner="eager"``: as captured; else
    Inductor's own training compile)."""
    on = [name for name in ("swa", "anda", "offload", "kv_store") if getattr(config, name) is not None]
    if on:
        raise TrainingModeError(
            f"llmaccel is an inference-only backend: {graph_id} is compiled with grad mode on and inputs "
            f"that require grad (training, or inference outside torch.no_grad()), and the passes {on} "
            "have no backward. For inference, call the model under torch.no_grad() or "
            "torch.inference_mode() (generate() already does); to train, compile with every pass off "
            "(no swa/anda/offload/kv_store options) or with backend=\"inductor\"")
    log.info("llmaccel: %s compiled for training with every pass off: graph kept as captured", graph_id)
    if config.inner == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def _refuse_phantom_reads(gm: torch.fx.GraphModule, graph_id: str) -> None:
    """A KV-cache input that is a phantom (its KV lives in the kv_store or offload workers) may
    only be read for its length. If the final graph reads its values (a site the passes could not
    rewrite, a cache filled under kv_store/offload passed to a model compiled without it), the
    graph would attend to zeros: refuse to compile it instead."""
    from llm_compile.passes.attention_offload import check_phantom_inputs

    bad = check_phantom_inputs(gm.graph)
    if bad:
        raise RuntimeError(
            f"llmaccel: {graph_id} would read the values of a phantom KV cache (its keys/values live "
            f"in the kv_store or in offload workers, the model's cache holds only its shape): "
            f"{'; '.join(bad[:3])}. Run the whole sequence through one model compiled with the same "
            "kv_store/offload options (see passes.json for sites that were not rewritten), or pass "
            "\"kv_store\": False to keep the KV cache in the model")


def _decompositions():
    from torch._inductor.decomposition import select_decomp_table

    return select_decomp_table()
