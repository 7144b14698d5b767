"""Our pass pipeline as an Inductor post-grad custom pass (``inner="inductor"``).

``compile_fx`` (Inductor's own entry, what ``backend="inductor"`` runs) traces the Dynamo graph
with AOTAutograd and its decompositions, runs its pre-grad and joint-graph passes, looks the graph
up in its FX graph cache, and only on a miss runs the post-grad passes and lowers. Installed as
``torch._inductor.config.post_grad_custom_pre_pass``, :class:`PipelinePass` runs our pipeline at
the *start* of the post-grad passes, on the functionalized ATen graph, i.e. on the same graph the
``inner="eager"`` path hands to the pipeline (Inductor's decompositions, not yet re-inplaced or
pattern-matched). Inductor's pattern matcher, re-inplacing and fusions then run on our output,
exactly as they did when the backend called ``compile_fx_inner`` after the pipeline.

Why the *pre* hook and not ``post_grad_custom_post_pass``: after Inductor's post-grad pattern
passes the graph already has ``addmm``/fused patterns and removed no-op views that the attention
matchers do not expect, and our custom ops (``llmaccel::kv_append`` and the like, which mutate
buffers) would miss the re-inplacing and no-op removal that run after the pre hook.

Caching: :meth:`PipelinePass.uuid` hashes the parsed config and the source of the pipeline
(passes, ops, runtime, codegen, config), so Inductor's FX graph cache (and the AOTAutograd cache on
top of it) stays valid and is keyed by what changes our output. It returns ``None`` (no caching)
for the passes in :data:`PROCESS_STATE_SECTIONS` (offload bakes a runtime handle; SWA and the KV
store are compiled before Inductor by the backend) or when a debug dump is asked for (a cache hit would skip the pipeline, hence the dump). On a cache hit the
pipeline does not run; its records (``COMPILED``) are then read back from a small JSON store
written when the graph was first compiled (:class:`RecordStore`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch
import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass

import llm_compile
from llm_compile.config import LLMAccelConfig

log = logging.getLogger(__name__)

_SOURCE_DIRS = ("passes", "ops", "runtime", "codegen")
_SOURCE_FILES = ("config.py", "backend.py", "inductor_hook.py")


@functools.lru_cache(maxsize=1)
def pipeline_source_version() -> str:
    """sha256 over the source files whose change can change what the pipeline emits."""
    root = Path(llm_compile.__file__).parent

    def package_dir(name: str) -> Path:  # passes/ and codegen/ live beside llm_compile/ (package-dir)
        return Path(importlib.util.find_spec(f"llm_compile.{name}").submodule_search_locations[0])

    files = [root / f for f in _SOURCE_FILES]
    for name in _SOURCE_DIRS:
        files += sorted(package_dir(name).rglob("*.py"))
    h = hashlib.sha256(torch.__version__.encode())
    for f in files:
        h.update(str(f.relative_to(f.parents[1])).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def config_key(config: LLMAccelConfig) -> str:
    """The parts of the config that shape the compiled graph (debug settings excluded)."""
    return repr(dataclasses.replace(config, debug_dir=None, debug_passes=None))


HANDLE_SECTIONS = ("offload",)
"""Passes that bake a runtime handle (``llm_compile.runtime.context.register_handle``: offload's
worker pool and its SWA config) into the graph as an int. Handles are numbered in the order a
process registers them, so a graph served from Inductor's on-disk cache to another process would
call into the wrong object, or none: such graphs are never cached, neither through this hook nor
when the backend rewrites them before Inductor (``backend._fx_cache_patch``)."""

PROCESS_STATE_SECTIONS = ("swa", "kv_store") + HANDLE_SECTIONS
"""Passes whose graphs the hook never caches. ``swa``/``kv_store`` never reach the hook: their graphs
return phantom caches, so the backend rewrites them before Inductor (``backend.cacheable_outputs``),
where Inductor's FX graph cache serves them (their state rides on the caller's cache)."""


def bakes_handles(config: LLMAccelConfig) -> bool:
    """Whether graphs compiled under ``config`` carry a process-local handle (never cached)."""
    return any(getattr(config, s) is not None for s in HANDLE_SECTIONS)


def cacheable(config: LLMAccelConfig) -> bool:
    """Whether Inductor may cache graphs compiled under ``config`` (see ``uuid``)."""
    return config.debug_dir is None and all(getattr(config, s) is None for s in PROCESS_STATE_SECTIONS)


class PipelinePass(CustomGraphPass):
    """``post_grad_custom_pre_pass`` that runs ``run_passes(gm)`` on the post-grad graph."""

    def __init__(self, config: LLMAccelConfig, run_passes: Callable[[torch.fx.GraphModule], list]):
        self.config = config
        self.run_passes = run_passes
        self.records: list[dict] | None = None
        """Set when the pass ran (an FX-graph-cache miss); stays ``None`` on a hit."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        gm = graph.owning_module
        self.records = self.run_passes(gm)
        if gm.graph is not graph:  # a pass was rolled back by replacing the graph object:
            _move_into(graph, gm)  # Inductor holds `graph`, so the result must live in it

    def uuid(self) -> str | None:
        if not cacheable(self.config):
            return None
        return hashlib.sha256(f"{config_key(self.config)}|{pipeline_source_version()}".encode()).hexdigest()


def _move_into(graph: torch.fx.Graph, gm: torch.fx.GraphModule) -> None:
    """Replace the nodes of ``graph`` by those of ``gm.graph`` and make ``graph`` gm's graph again."""
    new = gm.graph
    for node in reversed(list(graph.nodes)):
        graph.erase_node(node)
    out, old_output = graph.graph_copy(new, {}, return_output_node=True)
    graph.output(out, type_expr=old_output.type).meta.update(old_output.meta)  # graph_copy skips it
    gm.graph = graph


class RecordStore:
    """Pass records of cached graphs, as JSON files under Inductor's cache directory, so that
    ``COMPILED`` reports the same sites on an FX-graph-cache hit as on the first compile.

    The key hashes the pipeline's uuid, the Dynamo graph's code and its inputs' shapes, strides and
    dtypes: what determines the ATen graph the pipeline saw."""

    def __init__(self, root: str | None = None):
        if root is None:
            from torch._inductor.runtime.cache_dir_utils import cache_dir

            root = os.path.join(cache_dir(), "llmaccel_records")
        self.root = Path(root)

    @staticmethod
    def key(uuid: str, gm: torch.fx.GraphModule, example_inputs) -> str:
        h = hashlib.sha256(uuid.encode())
        h.update(gm.code.encode())
        for x in example_inputs:
            if isinstance(x, torch.Tensor):
                h.update(f"T{tuple(x.shape)}{x.stride()}{x.dtype}{x.device.type}".encode())
            else:
                h.update(f"S{x!r}".encode())
        return h.hexdigest()

    def save(self, key: str, records: list[dict]) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f"{key}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(records, default=str))
            tmp.replace(self.root / f"{key}.json")
        except OSError as e:  # records are diagnostics: never fail a compile over them
            log.warning("llmaccel: could not store pass records: %s", e)

    def load(self, key: str) -> list[dict] | None:
        try:
            return json.loads((self.root / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None
