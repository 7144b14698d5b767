"""The ``"llmaccel"`` torch.compile backend.

Flow for every graph Dynamo captures, by ``options["inner"]``::

    "inductor" (default): Dynamo FX graph --> torch._inductor.compile_fx.compile_fx  (Inductor's own
        entry: pre-grad passes, AOTAutograd with its decompositions, joint-graph passes, FX graph
        cache, mode=) --> post-grad: our pass pipeline as post_grad_custom_pre_pass
        (llm_compile.inductor_hook) --> Inductor's post-grad passes, lowering, codegen.
        With every pass off there is no hook: exactly ``backend="inductor"``.
    "eager": Dynamo FX graph --AOTAutograd (inference, Inductor's decompositions)--> functionalized
        ATen graph --> the pass pipeline --> the graph runs as is (fast to compile; unit tests).

Both paths run the same ordered pipeline (llm_compile.passes.pipeline.PIPELINE) on the same kind of
graph (functionalized ATen after Inductor's decompositions), write the same debug dump stages and
append one record per compiled graph to :data:`COMPILED`.

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
from llm_compile import context_dispatch
from llm_compile.config import INDUCTOR_MODES, LLMAccelConfig, OptionsError, parse_options
from llm_compile.debug import DebugDump
from llm_compile.inductor_hook import PROCESS_STATE_SECTIONS, PipelinePass, RecordStore, bakes_handles
from llm_compile.passes.base import PassContext
from llm_compile.passes.manager import run_pipeline
from llm_compile.passes.pipeline import PIPELINE

log = logging.getLogger(__name__)

_graph_ids = itertools.count()
_graph_lock = threading.Lock()

COMPILED: deque[dict] = deque(maxlen=256)
"""The most recent compiled graphs of this process: ``{"graph_id", "passes", "inner"}`` (pass
records as in ``passes.json``; ``"cache": "hit"`` when Inductor served the graph from its cache and
the records were read back). Handy to count graphs (recompiles) and sites without a debug dump."""

MODES = INDUCTOR_MODES
"""``torch.compile(mode=...)`` (or ``options={"mode": ...}``, since torch.compile refuses both at
once) values handed to Inductor (``inner="inductor"``). Inductor's ``"lite"`` mode is refused: it
skips the post-grad passes our pipeline runs in."""

_STATEFUL_PASSES = ("swa", "kv_store", "offload")
"""Passes whose ops keep per-sequence state in Python objects between calls: CUDA graphs (which
replay recorded kernels without running Python) would silently skip that bookkeeping."""


def _next_graph_id() -> str:
    with _graph_lock:
        return f"graph_{next(_graph_ids):03d}"


def _placeholder_names(gm: torch.fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "placeholder"]


def passes_enabled(config: LLMAccelConfig) -> bool:
    """Whether any pipeline pass runs under ``config`` (else the backend is plain Inductor)."""
    return any(spec.enabled(config) for spec in PIPELINE)


def inductor_config_patches(mode: str | None, config: LLMAccelConfig) -> dict:
    """Inductor config for ``mode`` (as ``backend="inductor"`` would use); a clear error otherwise."""
    from torch._inductor import list_mode_options

    patches = dict(list_mode_options(mode or "default"))
    stateful = [p for p in _STATEFUL_PASSES if getattr(config, p) is not None]
    if patches.get("triton.cudagraphs") and stateful:
        log.warning("llmaccel: mode=%r: CUDA graphs are off for graphs with %s (their ops keep "
                    "per-sequence state in Python, which a graph replay would skip)", mode, stateful)
        patches["triton.cudagraphs"] = False
    return patches


class _Pipeline:
    """Runs the pass pipeline on one ATen graph of one compiled graph: dump stages, records,
    repro, phantom-read check. Shared by both inner compilers."""

    def __init__(self, config: LLMAccelConfig, graph_id: str, dump: DebugDump, dynamo_names: list[str],
                 inner: str):
        self.config, self.graph_id, self.dump = config, graph_id, dump
        self.dynamo_names, self.inner = dynamo_names, inner

    def __call__(self, aten_gm: torch.fx.GraphModule, aten_inputs=None) -> list[dict]:
        if aten_inputs is None:  # inside Inductor: the graph's fake values
            aten_inputs = [n.meta.get("val") for n in aten_gm.graph.nodes if n.op == "placeholder"]
        aten_names = _placeholder_names(aten_gm)
        names = self.dynamo_names
        sources = dict(zip(aten_names, names)) if len(aten_names) == len(names) else {}
        ctx = PassContext(graph_id=self.graph_id, example_inputs=list(aten_inputs), placeholder_sources=sources)
        self.dump.stage("aten", aten_gm)
        records = run_pipeline(aten_gm, self.config, ctx, self.dump)
        COMPILED.append({"graph_id": self.graph_id, "passes": records, "inner": self.inner})
        self.dump.repro(aten_gm, aten_inputs)
        _refuse_phantom_reads(aten_gm, self.graph_id)
        return records


class EagerInner:
    """``inner="eager"``: AOTAutograd (inference, Inductor's decompositions), pipeline, run as is."""

    name = "eager"

    def compile(self, gm, example_inputs, pipeline: _Pipeline, mode: str | None):
        if mode not in (None, "default"):
            log.warning("llmaccel: mode=%r has no effect with inner='eager' (nothing is compiled)", mode)

        def fw_compiler(aten_gm: torch.fx.GraphModule, aten_inputs):
            pipeline(aten_gm, aten_inputs)
            return make_boxed_func(aten_gm.forward)

        with torch.no_grad():
            return aot_module_simplified(gm, example_inputs, fw_compiler=fw_compiler,
                                         inference_compiler=fw_compiler, decompositions=_decompositions())


class InductorInner:
    """``inner="inductor"``: Inductor's ``compile_fx`` with the pipeline as its post-grad pre-pass."""

    name = "inductor"

    def __init__(self, records: RecordStore | None = None):
        self._records = records

    def compile(self, gm, example_inputs, pipeline: _Pipeline, mode: str | None):
        from torch._inductor.compile_fx import compile_fx

        patches = inductor_config_patches(mode, pipeline.config)
        if not passes_enabled(pipeline.config) and not pipeline.dump.enabled:  # exactly stock Inductor
            COMPILED.append({"graph_id": pipeline.graph_id, "passes": [], "inner": self.name})
            with torch.no_grad():
                return compile_fx(gm, example_inputs, config_patches=patches)
        if not cacheable_outputs(pipeline.config):
            return _compile_before_inductor(gm, example_inputs, pipeline, patches)
        hook = PipelinePass(pipeline.config, pipeline)
        patches["post_grad_custom_pre_pass"] = hook
        uuid = hook.uuid()
        store = self._records or RecordStore()
        key = store.key(uuid, gm, example_inputs) if uuid is not None else None
        with torch.no_grad():
            compiled = compile_fx(gm, example_inputs, config_patches=patches)
        if hook.records is not None:
            if key is not None:
                store.save(key, hook.records)
        else:  # Inductor served the graph from its cache: the pipeline did not run
            saved = store.load(key) if key is not None else None
            COMPILED.append({"graph_id": pipeline.graph_id, "passes": saved or [], "inner": self.name,
                             "cache": "hit" if saved is not None else "hit, records unknown"})
        return compiled


def cacheable_outputs(config: LLMAccelConfig) -> bool:
    """``kv_store``/``offload`` (and ``swa``, which turns ``kv_store`` on) replace the cache tensors the
    graph returns by phantoms. Inside the post-grad hook that is too late: Inductor has already
    recorded the graph's output strides and restores them, turning a phantom back into a dense
    tensor (the next step then refuses it: "got a real KV cache"). Such configs run the pipeline on
    the AOT graph before ``compile_fx_inner``, as before the hook existed. Inductor's FX graph
    cache still serves those graphs (:func:`_fx_cache_patch`)."""
    return all(getattr(config, s) is None for s in PROCESS_STATE_SECTIONS)


def _fx_cache_patch(config: LLMAccelConfig) -> dict:
    """Inductor's FX graph cache for a graph the pipeline rewrote before ``compile_fx_inner``: the
    key is the rewritten graph, whose ops carry their configuration as literals (the SWA config
    JSON, the site, the KV-tier options), and the state they use rides on the caller's cache, so
    another process may reuse the compiled code (warm compile, issue 17 item 3). Graphs that carry
    a process-local handle (:func:`~llm_compile.inductor_hook.bakes_handles`: offload) are never
    cached; otherwise Inductor's own setting (``TORCHINDUCTOR_FX_GRAPH_CACHE``) decides."""
    return {"fx_graph_cache": False} if bakes_handles(config) else {}


def _compile_before_inductor(gm, example_inputs, pipeline: _Pipeline, patches: dict):
    from torch._inductor.compile_fx import compile_fx_inner

    def fw_compiler(aten_gm: torch.fx.GraphModule, aten_inputs):
        pipeline(aten_gm, aten_inputs)
        with torch._inductor.config.patch({**patches, **_fx_cache_patch(pipeline.config)}):
            return compile_fx_inner(aten_gm, aten_inputs, is_inference=True)

    # keep_inference_input_mutations: as compile_fx does, the graph keeps the in-place update of a
    # mutated input (HF StaticCache's index_copy_) for Inductor to re-inplace; without it AOTAutograd
    # copies the whole mutated buffer back after every call (a 16k-token StaticCache: ~80 ms/layer).
    with torch.no_grad():
        return aot_module_simplified(gm, example_inputs, fw_compiler=fw_compiler,
                                     inference_compiler=fw_compiler, decompositions=_decompositions(),
                                     keep_inference_input_mutations=True)


INNER_COMPILERS = {"eager": EagerInner(), "inductor": InductorInner()}


def llmaccel(gm: torch.fx.GraphModule, example_inputs, *, options=None, mode=None):
    """Dynamo backend entry: ``torch.compile(fn, backend="llmaccel", options={...}, mode=...)``."""
    config = parse_options(options)
    if mode is not None and config.mode is not None and mode != config.mode:
        raise OptionsError(f"llmaccel: mode={mode!r} and options['mode']={config.mode!r} disagree; give one")
    mode = mode or config.mode
    if mode is not None and mode not in MODES:
        raise OptionsError(f"llmaccel: mode={mode!r} is not supported; use one of {list(MODES)} "
                           "(or leave mode unset)")
    inner = INNER_COMPILERS[config.inner]
    graph_id = _next_graph_id()
    dump = DebugDump(config.debug_dir, graph_id, config.debug_passes)
    dump.stage("dynamo", gm)
    pipeline = _Pipeline(config, graph_id, dump, _placeholder_names(gm), inner.name)
    # --- training mode (issue 13, item 9): refused with passes on; plain autograd with all off ---
    if torch.is_grad_enabled() and any(getattr(x, "requires_grad", False) for x in example_inputs):
        return _training_graph(gm, example_inputs, config, graph_id)
    # --- end training mode ---
    if context_dispatch.applies(config):  # issue 17: dense graph below swa.min_context
        return _compile_with_dense_prefix(gm, example_inputs, config, pipeline, inner, mode)
    return inner.compile(gm, example_inputs, pipeline, mode)  # no per-call wrapper: state rides on the cache


def _compile_with_dense_prefix(gm, example_inputs, config, pipeline: _Pipeline, inner, mode):
    """``swa.min_context``: the SWA graph and a dense one (passes off), chosen per call by the
    sequence's length (:mod:`llm_compile.context_dispatch`); one graph when the shapes decide."""
    probe = context_dispatch.probe(gm, example_inputs)
    if (probe is None or probe.carries_state(example_inputs)  # traced on phantoms: never dense
            or (probe.static_length is not None and probe.static_length >= config.swa.min_context)):
        if probe is None:
            log.info("llmaccel: %s: context length not readable from the input shapes (no cat-appended "
                     "KV cache); swa.min_context applies inside the attention ops", pipeline.graph_id)
        return inner.compile(gm, example_inputs, pipeline, mode)
    dense_id = f"{pipeline.graph_id}.dense"
    dense = _Pipeline(context_dispatch.dense_config(config), dense_id, DebugDump(config.debug_dir, dense_id, config.debug_passes),
                      pipeline.dynamo_names, inner.name)
    dense_fn = inner.compile(gm, example_inputs, dense, mode)
    # Shapes that fix the length below min_context need the SWA graph only for a cache carrying
    # state; under kv_store that state rides on phantoms, which Dynamo guards into another graph.
    only_dense = probe.static_length is not None and config.kv_store is not None
    swa_fn = None if only_dense else inner.compile(gm, example_inputs, pipeline, mode)
    fn = context_dispatch.ContextDispatch(probe, config.swa.min_context, swa_fn, dense_fn, pipeline.graph_id)
    for record in COMPILED:  # calls per form, on the dense graph's record (always compiled here)
        if record["graph_id"] == dense_id:
            record["calls"] = fn.calls
    return fn


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
