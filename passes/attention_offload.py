"""Pass: attention offload (Lamina) — attention runs on attention workers holding the KV cache.

Every canonical attention site (``llmaccel::attention``, or ``llmaccel::swa_attention`` when the SWA
pass ran first) becomes ``llmaccel::offload_attention`` with the same arguments (minus the
optional ``k_all``/``v_all`` cache appends, which no longer exist) plus a runtime
handle of the :class:`~llm_compile.runtime.offload.pool.AttentionWorkerPool` (one shared pool per
``OffloadConfig``, spawned on first use or joined via ``offload.init_method``) and the SWA handle
(0 = dense). The KV cache then lives only in the workers, so the cache tensors the graph *returns*
to the model (Hugging Face's ``DynamicCache`` stores them) become zero-memory phantoms
(``llmaccel::kv_phantom``: right shape, all strides 0, one element of storage), and the cache
append ``cat([past_k, k_new], -2)`` disappears from the compute device.

Before (decode step of one layer)::

    cat_2 = aten.cat.default([arg_past_k, k_new], -2)      # returned to the KV cache
    cat_3 = aten.cat.default([arg_past_v, v_new], -2)
    attention = llmaccel.attention.default(q, k_new, v_new, arg_past_k, arg_past_v, None, 0.25, False, 0,
                                           cat_2, cat_3)
    ...
    return (cat_3, cat_2, ..., logits)

After::

    offload_attention = llmaccel.offload_attention.default(q, k_new, v_new, arg_past_k, arg_past_v,
                                                           None, 0.25, False, 0, 7, 0)  # pool handle 7
    ...
    kv_phantom = llmaccel.kv_phantom.default(arg_past_v, v_new)    # [B, Hkv, L+1, D], 4 bytes
    kv_phantom_1 = llmaccel.kv_phantom.default(arg_past_k, k_new)
    return (kv_phantom, kv_phantom_1, ..., logits)

At prefill (no cache) the returned cache is ``k``/``v`` themselves; they become
``kv_phantom(None, k, seq)``, where ``seq = llmaccel.offload_sequence(q, 7)`` (first in the graph,
also passed to every prefill site) allocates the sequence whose KV the workers keep: the phantoms
carry it (and own it: the workers free the KV when the cache is collected), and a decode graph
reads it back from its phantom inputs. Prefill, after::

    offload_sequence = llmaccel.offload_sequence.default(q, 7)
    offload_attention = llmaccel.offload_attention.default(q, k, v, None, None, None, 0.25, True, 0, 7, 0,
                                                           offload_sequence)
    kv_phantom = llmaccel.kv_phantom.default(None, k, offload_sequence)
 ``arg_past_k`` is the previous step's phantom: the op reads only its length
(checked against the workers' cache: a mismatch, e.g. a cropped cache, is a clear error).

The cut. Each ``offload_attention`` call is the boundary between compute partitions: Inductor
treats the custom op as an opaque extern call, so the graph compiles to fused compute kernels
(QKV projection + RoPE of layer i | O projection + FFN of layer i + QKV of layer i+1 | ...) with one
blocking round trip to the workers between them; with ``inner="eager"`` the graph runs as is.
:func:`split_at_attention` makes the same cut explicit with ``torch.fx.passes.split_module``
(``compute_0, attention_1, compute_2, ...``) for inspection or a custom scheduler.

All or nothing, and never silently local. A site whose cache append feeds anything besides the
returned cache cannot be cut (its KV would have to stay local); offloading the other sites would
leave a mixed graph, and at decode the model's cache holds phantoms whose values are zeros. The
same holds if, after the rewrite, anything but the offload ops and size queries still reads a
phantom cache input, if an SDPA site was left uncanonicalised, or if the workers cannot be started
(bad ``init_method``, a script without a ``__main__`` guard, a start-up timeout). The user asked
for the KV to leave the compute process, so each of these raises :class:`OffloadError` (a
:class:`~llm_compile.passes.base.RequestedPassError`): compilation fails with the reason, instead
of the manager's usual rollback to a local graph. A local
attention op that receives a phantom anyway (a graph rolled back at decode, a cache filled under
offload passed to a model compiled without it) raises ``RuntimeError``
(:func:`llm_compile.ops.attention.check_not_phantom`) rather than attend to zeros.

SWA. ``llmaccel::swa_attention`` sites become offload sites carrying the SWA handle: the workers
run :class:`~llm_compile.runtime.offload.modes.SWAMode` (prefill on the workers too, it seeds the
scores). ``swa.selection="layer"`` with more than one worker is refused by the config (each worker
sees only its heads); use ``"kv_head"`` or one worker.

Overlap. With ``offload.overlap`` (and ``inner="eager"``, a symbolic batch size: compile with
``dynamic=True``) the graph body becomes one call to an
:class:`~llm_compile.runtime.offload.overlap.OverlapRunner` that runs the two halves of the batch
in ping-pong around the attention calls (``stats["overlap"] == "applied"``); otherwise the graph
runs without overlap and ``stats["overlap"]`` says why (a warning too).
"""
from __future__ import annotations

import logging
import warnings

import torch
import torch.fx

import llm_compile.ops  # noqa: F401  (declares the llmaccel:: ops)
from llm_compile.config import LLMAccelConfig
from llm_compile.passes.base import PassContext, PassResult, RequestedPassError
from llm_compile.passes.kv_relocation import (  # noqa: F401  (re-exported for older imports)
    PHANTOM, RelocationIncomplete, check_phantom_inputs, fake_call, relocate_kv,
)
from llm_compile.runtime.context import register_handle
from llm_compile.runtime.swa.policies import config_from_json

log = logging.getLogger(__name__)

aten = torch.ops.aten
OFFLOAD = torch.ops.llmaccel.offload_attention.default
SEQUENCE = torch.ops.llmaccel.offload_sequence.default
OffloadIncomplete = RelocationIncomplete
_SWA_HANDLES: dict = {}


def pool_handle(pool) -> int:
    """One runtime handle per pool (shared by the prefill and decode graphs), kept on the pool."""
    h = getattr(pool, "graph_handle", None)
    if h is None:
        h = pool.graph_handle = register_handle(pool)
    return h


def _swa_handle(swa_json: str) -> int:
    """The workers' handle of an SWA site's config (0 = dense)."""
    cfg = config_from_json(swa_json or "")
    if cfg is None:
        return 0
    h = _SWA_HANDLES.get(cfg)
    if h is None:
        h = _SWA_HANDLES[cfg] = register_handle(cfg)
    return h


def move_kv_out(gm: torch.fx.GraphModule, op, make_handle, what: str) -> list[dict]:
    """Every canonical site -> ``op(q, k, v, k_cache, v_cache, mask, scale, causal, site, handle,
    swa_handle)``, returned caches -> ``kv_phantom`` (see :mod:`llm_compile.passes.kv_relocation`)."""
    box = {}

    def build(g, node, a):
        if "handle" not in box:
            box["handle"] = make_handle()
        args = (a["q"], a["k"], a["v"], a["k_cache"], a["v_cache"], a["attn_mask"], a["scale"],
                a["is_causal"], a["site"], box["handle"], _swa_handle(a.get("swa")))
        new = g.call_function(op, args)
        val = node.meta.get("val")
        new.meta.update({k_: v_ for k_, v_ in node.meta.items() if k_ in ("stack_trace", "nn_module_stack")})
        if val is not None:
            new.meta["val"] = val[0] if isinstance(val, (tuple, list)) else val
        return new, None, None

    return relocate_kv(gm, build, what, refuse_static="offload keeps the KV in attention workers; "
                       "use a DynamicCache (the default of generate()) with offload")


class OffloadError(RequestedPassError):
    """``offload`` was requested but cannot apply to a graph; compilation fails with the reason."""


_SDPA = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
         "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
         "scaled_dot_product_attention", "_scaled_dot_product_attention_math")


def _uncanonicalised_sdpa(gm: torch.fx.GraphModule) -> list[str]:
    """SDPA calls that canonicalisation left alone: their KV would stay on the compute process."""
    return [n.name for n in gm.graph.nodes if n.op == "call_function"
            and getattr(getattr(n.target, "overloadpacket", None), "__name__", None) in _SDPA]


def run(gm: torch.fx.GraphModule, config: LLMAccelConfig, ctx: PassContext) -> PassResult:
    """Offload every attention site, or fail: anything that keeps KV local raises
    :class:`OffloadError` (compilation fails), so a graph is never mixed, never silently local,
    and a phantom cache never reaches local attention unnoticed."""
    try:
        return _run(gm, config, ctx)
    except OffloadError:
        raise
    except Exception as e:
        raise OffloadError(
            f"llmaccel: offload was requested (the KV cache placed in attention workers) but cannot "
            f"apply to {getattr(ctx, 'graph_id', 'the graph')}: {type(e).__name__}: {e}") from e


def _warn_no_site(graph_id: str) -> None:
    log.info("llmaccel: offload found no attention site in %s", graph_id)
    warnings.warn("llmaccel: offload was requested but a graph has a softmax and no attention site it "
                  "can offload (none was canonicalised; see passes.json): if it is attention, its KV "
                  "cache stays local")  # a constant message: Python shows it once


def _run(gm: torch.fx.GraphModule, config: LLMAccelConfig, ctx: PassContext) -> PassResult:
    cfg = config.offload
    box = {}
    left = _uncanonicalised_sdpa(gm)
    if left:
        raise OffloadError(
            f"llmaccel: offload was requested but attention site(s) {left} of "
            f"{getattr(ctx, 'graph_id', 'the graph')} were not canonicalised (see the canonicalize "
            "pass's skip reasons in passes.json), so their KV cache would stay local")

    def make_handle() -> int:
        from llm_compile.runtime.offload import get_pool

        box["pool"] = get_pool(cfg)
        return pool_handle(box["pool"])

    matched = move_kv_out(gm, OFFLOAD, make_handle, "offload")
    if not matched:
        if any(n.op == "call_function" and n.target in (aten._softmax.default, aten.softmax.int)
               for n in gm.graph.nodes):  # a softmax but no site: likely attention left local
            _warn_no_site(getattr(ctx, "graph_id", "a graph"))
        return PassResult(changed=False, stats={"sites": 0},
                          skipped=[{"reason": "no canonical attention site: nothing to offload"}])
    pool = box["pool"]
    _thread_sequence(gm, pool_handle(pool))
    stats = {"sites": len(matched), "workers": pool.n_workers, "pool_handle": pool_handle(pool),
             "transport": pool.backend, "overlap": "off"}
    if cfg.overlap:
        if config.inner != "eager":
            stats["overlap"] = "not applied: needs inner='eager' (the ping-pong runner is Python)"
        else:
            from llm_compile.runtime.offload.overlap import install

            stats["overlap"] = install(gm, OFFLOAD)
            if "llmaccel_overlap_runner" in gm.meta:
                stats["overlap_runner"] = gm.meta["llmaccel_overlap_runner"]
        if stats["overlap"] != "applied":
            log.warning("llmaccel: offload.overlap %s; %s runs without overlap", stats["overlap"],
                        getattr(ctx, "graph_id", "the graph"))
    return PassResult(changed=True, matched=matched, skipped=[], stats=stats)


def _thread_sequence(gm: torch.fx.GraphModule, handle: int) -> None:
    """A prefill graph allocates its sequence first (``llmaccel::offload_sequence``) and hands it
    to every prefill site and every phantom it returns, so that the phantoms the model's cache
    keeps name (and own) the sequence; decode graphs read it back from their phantom inputs."""
    g = gm.graph
    prefill = [n for n in g.nodes if n.op == "call_function" and n.target == OFFLOAD and n.args[3] is None]
    if not prefill:
        return
    with g.inserting_before(prefill[0]):
        seq = g.call_function(SEQUENCE, (prefill[0].args[0], handle))
    val = fake_call(lambda q: SEQUENCE(q, handle), prefill[0].args[0].meta.get("val"))
    if val is not None:
        seq.meta["val"] = val
    for n in prefill:
        n.args = tuple(n.args[:11]) + (seq,)
    for n in g.nodes:
        if n.op == "call_function" and n.target == PHANTOM and n.args[0] is None:
            n.args = (None, n.args[1], seq)


def split_at_attention(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The cut made explicit: ``split_module`` into ``submod_0`` (compute), ``submod_1`` (one
    ``offload_attention`` call), ``submod_2`` (compute), ... in graph order."""
    from torch.fx.passes.split_module import split_module

    part = {"i": 0}

    def which(node: torch.fx.Node) -> int:
        if node.op == "call_function" and node.target == OFFLOAD:
            part["i"] += 2
            return part["i"] - 1
        return part["i"]

    return split_module(gm, gm, which, keep_original_order=True)
