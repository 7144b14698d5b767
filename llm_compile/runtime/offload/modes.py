"""Pluggable attention steps run by the attention workers.

A worker keeps, per (seq_id, site), its KV-head slice of the cache and a mode *state*; each
request with a query calls ``mode.attend(q, k_full, v_full, attn_mask, scale, is_causal, state)``
where ``k_full``/``v_full`` are the whole cached keys/values of its heads *including* the ones just
appended (``[B, h_kv, n, D]``, views of the worker's buffers). A new prefill (reset) creates a fresh
state with ``mode.new_state(...)``.

Modes travel to the workers as a JSON *spec* (:meth:`AttentionMode.to_spec`, at pool creation as
the default, or per (seq_id, site) at prefill); a worker rebuilds them with :func:`mode_from_spec`,
which knows only the classes below (nothing received is unpickled).

* :class:`DenseMode` (default): exactly ``llmaccel::attention``'s math.
* :class:`SWAMode`: sparse window attention (ALISA) through :func:`llm_compile.runtime.swa.swa_step`.
  Prefill must then run on the workers (it seeds the scores), so ``needs_prefill_query`` is true.
  Under offload, ``selection="layer"`` would sum scores over the heads *one worker holds* (a worker
  never sees the other workers' heads), so the config refuses it with more than one worker
  (:func:`llm_compile.config.parse_options`); with one worker, or ``selection="kv_head"``, the
  workers select exactly the tokens local SWA selects.
* :class:`CallableMode`: any ``"module:function"`` with the same signature as ``attend``, plus an
  optional ``"module:function"`` state factory; the way to plug in a new kernel without editing the
  worker.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
from typing import Any

from torch import Tensor

from llm_compile.ops.attention import dense_attention

log = logging.getLogger(__name__)


def dense_step(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float, is_causal: bool,
               state: Any = None) -> Tensor:
    """The dense attention step (stateless), in the signature :class:`CallableMode` expects."""
    return dense_attention(q, k, v, attn_mask, scale, is_causal)


class AttentionMode:
    """Base class: dense attention, no state."""

    needs_prefill_query = False
    """True when the prefill attention must run on the workers (the mode keeps state from it)."""

    def new_state(self, *, batch: int, kv_heads: int, q_heads: int, head_dim: int, device,
                  head_offset: int) -> Any:
        return None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float,
               is_causal: bool, state: Any) -> Tensor:
        return dense_step(q, k, v, attn_mask, scale, is_causal, state)

    def to_spec(self) -> dict:
        """A JSON-serialisable description that :func:`mode_from_spec` turns back into the mode."""
        if type(self) not in (AttentionMode, DenseMode):
            raise TypeError(f"llmaccel offload: attention mode {type(self).__name__} cannot be sent to "
                            "workers; use DenseMode, SWAMode or CallableMode('module:function')")
        return {"kind": "dense"}

    def __repr__(self) -> str:
        return type(self).__name__ + "()"


class DenseMode(AttentionMode):
    """Dense SDPA over the whole cache (``llmaccel::attention``'s math). The default."""


class SWAMode(AttentionMode):
    """Sparse window attention (ALISA) with the given :class:`~llm_compile.config.SWAConfig`."""

    needs_prefill_query = True

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def new_state(self, *, batch, kv_heads, q_heads, head_dim, device, head_offset):
        from llm_compile.runtime.swa import new_state

        return new_state(batch, kv_heads, device, self.cfg)

    def attend(self, q, k, v, attn_mask, scale, is_causal, state):
        from llm_compile.runtime.swa import swa_step

        return swa_step(state, q, k, v, scale, self.cfg, attn_mask=attn_mask, is_causal=is_causal)

    def to_spec(self) -> dict:
        return {"kind": "swa", "config": dataclasses.asdict(self.cfg)}

    def __repr__(self) -> str:
        return f"SWAMode({self.cfg!r})"


def _resolve(target: str):
    mod, _, name = target.partition(":")
    if not name:
        raise ValueError(f"llmaccel offload: callable {target!r} must be 'module:function'")
    return getattr(importlib.import_module(mod), name)


class CallableMode(AttentionMode):
    """``fn(q, k, v, attn_mask, scale, is_causal, state, **kwargs)`` named as ``"module:function"``.

    ``state_factory`` (optional, same naming) is called as ``factory(batch=..., kv_heads=...,
    q_heads=..., head_dim=..., device=..., head_offset=..., **kwargs)``.
    """

    def __init__(self, target: str, kwargs: dict | None = None, state_factory: str | None = None,
                 needs_prefill_query: bool = False) -> None:
        self.target = target
        self.kwargs = dict(kwargs or {})
        self.state_factory = state_factory
        self.needs_prefill_query = needs_prefill_query
        self._fn = None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_fn"] = None
        return d

    def new_state(self, **kw):
        if self.state_factory is None:
            return None
        return _resolve(self.state_factory)(**kw, **self.kwargs)

    def attend(self, q, k, v, attn_mask, scale, is_causal, state):
        if self._fn is None:
            self._fn = _resolve(self.target)
        return self._fn(q, k, v, attn_mask, scale, is_causal, state, **self.kwargs)

    def to_spec(self) -> dict:
        return {"kind": "callable", "target": self.target, "kwargs": self.kwargs,
                "state_factory": self.state_factory, "needs_prefill_query": bool(self.needs_prefill_query)}

    def __repr__(self) -> str:
        return f"CallableMode({self.target!r})"


def mode_from_spec(spec: Any) -> AttentionMode:
    """The mode a :meth:`AttentionMode.to_spec` dict describes; anything else raises ``ValueError``."""
    if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
        raise ValueError(f"llmaccel offload: malformed attention-mode spec {spec!r}")
    kind = spec["kind"]
    if kind == "dense" and set(spec) == {"kind"}:
        return DenseMode()
    if kind == "swa" and set(spec) == {"kind", "config"} and isinstance(spec["config"], dict):
        from llm_compile.config import SWAConfig

        known = {f.name for f in dataclasses.fields(SWAConfig)}
        if not set(spec["config"]) <= known:
            raise ValueError(f"llmaccel offload: unknown SWA fields {sorted(set(spec['config']) - known)}")
        return SWAMode(SWAConfig(**spec["config"]))
    if kind == "callable" and set(spec) == {"kind", "target", "kwargs", "state_factory", "needs_prefill_query"}:
        if not isinstance(spec["target"], str) or not isinstance(spec["kwargs"], dict) \
                or not isinstance(spec["state_factory"], (str, type(None))):
            raise ValueError(f"llmaccel offload: malformed callable-mode spec {spec!r}")
        return CallableMode(spec["target"], spec["kwargs"], spec["state_factory"],
                            bool(spec["needs_prefill_query"]))
    raise ValueError(f"llmaccel offload: unknown attention-mode spec {spec!r}")
