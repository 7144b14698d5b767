"""What every pass receives and returns.

A pass is a function ``run(gm, config, ctx) -> PassResult`` in its own file. It rewrites ``gm.graph``
in place and reports what it did; :mod:`llm_compile.passes.manager` times it, cleans the graph up,
and rolls the graph back if the pass raised.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class PassContext:
    """Per-compiled-graph facts a pass may need."""

    graph_id: str
    """Stable name of the compiled graph (``graph_000``...), also the dump folder name."""
    example_inputs: list
    """Fake/real example inputs of the ATen graph, in placeholder order."""
    placeholder_sources: dict[str, str] = field(default_factory=dict)
    """ATen placeholder name -> Dynamo source name (e.g. ``L_self_modules_model_modules_layers_
    modules_0_modules_self_attn_modules_q_proj_parameters_weight_``) where known."""
    runtime_key: Any = None
    """Handle of the runtime context (state registry) that compiled ops of this graph talk to."""
    artifacts: dict[str, str] = field(default_factory=dict)
    """Extra files for the debug dump (name -> text), e.g. generated kernel sources."""


@dataclass
class PassResult:
    changed: bool
    matched: list[dict] = field(default_factory=list)
    """One entry per site rewritten, e.g. ``{"site": 0, "node": "sdpa_3", "form": "sdpa"}``."""
    skipped: list[dict] = field(default_factory=list)
    """One entry per site left alone, with a ``"reason"``."""
    stats: dict[str, Any] = field(default_factory=dict)


class RequestedPassError(RuntimeError):
    """A pass the user asked for cannot apply to this graph (e.g. offload: the KV placement was
    asked for). The manager does not roll it back: compilation fails with this message."""


PassFn = Callable[..., PassResult]
