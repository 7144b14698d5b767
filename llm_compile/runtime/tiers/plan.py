"""The three-phase placement plan of tiered KV (ALISA §V), from the measured cost model.

Per attention site (layer), for a batch of ``B`` sequences with ``Hkv`` KV heads, one token's K+V
take ``row_bytes = B * Hkv * (D + Dv) * elt``; the device budget is shared by the ``sites``::

    cap   = device_budget // (sites * row_bytes)          tokens per layer the device holds
    p1    = cap (or kv_tiers.p1)                          phase 1: all rows on the device up to p1
    alpha = max(0, 1 - (cap - recent) / (max_context - recent))   (or kv_tiers.alpha)
          phase 2, past p1: of the tokens outside the ``recent`` window, share alpha lives on the
          host (every 1/alpha-th position); the smallest share that fits the budget at
          max_context, because every host row a step selects costs a fetch
    p2    = p1 + host_budget // (sites * row_bytes)       (None: host unlimited; or kv_tiers.p2)
    beta  = share of the positions decided past p2 that keep no KV, only their layer input, and
            are recomputed when selected (phase 3; or kv_tiers.beta)

Phase 3 pays only if what recompute keeps per token (``keep``: the layer input, ``hidden`` values,
plus the token's RoPE cos and sin rows, ``2 * D``; :mod:`~llm_compile.runtime.tiers.recompute`) is
smaller than K+V (``Hkv * (D + Dv)``): never for GQA models such as SmolLM2 (576 + 128 > 3 * 128 =
384), often for MHA (GPT-2: 768 < 1536). Planned (``kv_tiers.beta`` None): beta = 1 when the host
tier fills before max_context (p2 < max_context) and recompute frees memory — every position decided
past p2 then keeps only its input, so neither tier outgrows its budget; the reason gives the memory
freed and the recompute time per token next to a host fetch (past p2 there is no room to fetch
from, so recompute is what lets the sequence go on). Otherwise beta = 0 with the reason (GQA, host
unlimited, the host holds max_context, recompute off, or a graph that passes no layer input:
``keep`` None). ``kv_tiers.beta`` > 0 on a model whose recompute frees no memory raises
:class:`TiersPlanError`.

``predicted_step_s``: attention-read time of one decode step (all layers) at ``max_context``
under SWA (its budget ``2k`` rows per layer and KV head) or dense, from the measured costs::

    rows * (m_dev * dev_row_s + m_host * (host_row_s + row_width_bytes / h2d_bytes_s))
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import torch

from llm_compile.config import KVTiersConfig
from llm_compile.runtime.tiers.cost import Cost, load_or_measure


class TiersPlanError(ValueError):
    """The device budget or the plan overrides cannot hold this model's KV as asked."""


@dataclass(frozen=True)
class Plan:
    p1: int
    p2: int | None
    alpha: float
    beta: float
    recent: int
    cap: int
    """Tokens per layer the device budget holds."""
    host_cap: int | None
    row_bytes: int
    """Bytes of one token's K+V in one layer, whole batch."""
    host: str
    """``"ram"``, ``"pinned"`` or ``"mmap"``."""
    predicted_step_s: float
    predicted_all_device_s: float
    predicted_all_host_s: float
    reasons: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def host_share(self, t: int) -> bool:
        """Whether position ``t`` (outside the recent window, past p1) goes to the host."""
        return _share(self.alpha, t)

    def rec_share(self, t: int) -> bool:
        """Whether position ``t``, decided past p2, keeps only its layer input (phase 3)."""
        return _share(self.beta, t)


def _share(a: float, t: int) -> bool:
    """Every ``1/a``-th position (evenly spread), each decided once."""
    return a >= 1.0 or (a > 0 and int((t + 1) * a) > int(t * a))


def host_kind(cfg: KVTiersConfig, device: torch.device) -> str:
    if cfg.mmap_dir is not None:
        if device.type != "cpu":
            raise TiersPlanError(f"llmaccel kv_tiers: mmap_dir is for CPU models (the host tier of a "
                                 f"{device.type} model is pinned RAM); drop kv_tiers.mmap_dir")
        return "mmap"
    return "pinned" if device.type == "cuda" else "ram"


def _swa_rows(n: int, swa: dict | None) -> int:
    if not swa or not swa.get("sparsity"):
        return n
    k = int(n * (1 - swa["sparsity"]) / 2 + 0.5)
    return min(n, 2 * k)


def _beta(cfg: KVTiersConfig, cost: Cost, hidden: int, heads: int, d: int, dv: int, p2: int | None,
          keep: int | None, fetch_tok_s: float) -> tuple[float, str]:
    kv = heads * (d + dv)
    if cfg.recompute == "off":
        if cfg.beta:
            raise TiersPlanError(f"llmaccel kv_tiers: beta={cfg.beta} with recompute='off'; drop one of them")
        return 0.0, "recompute off (kv_tiers.recompute='off')"
    what = (f"the layer input ({hidden} values per token)" if keep is None or keep == hidden else
            f"the layer input and the token's RoPE cos/sin ({hidden} + 2 x {d} = {keep} values per token)")
    if (keep if keep is not None else hidden) >= kv:
        why = (f"recompute keeps {what} to free K+V ({heads} KV heads x ({d}+{dv}) = {kv} values): it frees no "
               "memory (grouped-query attention)")
        if cfg.beta:
            raise TiersPlanError(f"llmaccel kv_tiers: beta={cfg.beta} refused: {why}; use beta=0 (or None) and "
                                 "raise host_budget")
        return 0.0, why + ", beta = 0"
    if keep is None:
        if cfg.beta:
            raise TiersPlanError(f"llmaccel kv_tiers: beta={cfg.beta} but the compiled graph passes no layer input "
                                 "to recompute from (see the local_kv_store record in passes.json)")
        return 0.0, (f"recompute would free {kv - hidden} of {kv} values per token, but the compiled graph passes "
                     "no layer input to recompute from (host unlimited, or a form of attention not supported: "
                     "passes.json says which): beta = 0")
    faster = "faster" if cost.recompute_tok_s < fetch_tok_s else "slower"
    cost_txt = (f"recompute {cost.recompute_tok_s * 1e6:.2f} us per token and sequence ({faster} than a host "
                f"fetch, {fetch_tok_s * 1e6:.2f} us)")
    frees = f"keeps {what} instead of K+V ({kv} values): frees {kv - keep} values per token"
    if cfg.beta is not None:
        return cfg.beta, f"override {cfg.beta}: past p2 = {p2} that share of the tokens {frees}; {cost_txt}"
    if p2 is None:
        return 0.0, f"host unlimited: nothing past p2 (recompute would free {kv - keep} of {kv} values per token)"
    if p2 >= cfg.max_context:
        return 0.0, f"the host tier holds max_context ({p2} >= {cfg.max_context}): nothing past p2"
    return 1.0, (f"the host tier fills at p2 = {p2} < max_context {cfg.max_context}: past p2 every token {frees} "
                 f"(multi-head attention); {cost_txt}")


def make_plan(cfg: KVTiersConfig, *, batch: int, heads: int, q_heads: int, d: int, dv: int,
              dtype: torch.dtype, device: torch.device, sites: int, swa: dict | None = None,
              keep: int | None = None, hidden: int | None = None) -> Plan:
    """The plan for one model shape and batch (see the module docstring). ``keep``: values a
    phase-3 token keeps (None: the graph passes no recompute inputs); ``hidden``: the layer input's
    width (default ``q_heads * d``)."""
    device = torch.device(device)
    elt = torch.empty(0, dtype=dtype).element_size()
    host = host_kind(cfg, device)
    hidden = hidden or q_heads * d
    cost = load_or_measure(device, dtype, hidden, heads, d, dv, host, cfg.cost_cache_dir, cfg.mmap_dir)
    row_bytes = batch * heads * (d + dv) * elt
    cap = cfg.device_budget // (max(1, sites) * row_bytes)
    if cap <= cfg.recent:
        raise TiersPlanError(
            f"llmaccel kv_tiers: device_budget={cfg.device_budget} bytes holds {cap} tokens per layer "
            f"({sites} layers x {row_bytes} bytes per token for batch {batch}), not more than the recent "
            f"window ({cfg.recent}): raise device_budget, lower kv_tiers.recent or the batch")
    p1 = cfg.p1 if cfg.p1 is not None else cap
    if p1 > cap:
        raise TiersPlanError(f"llmaccel kv_tiers: p1={p1} tokens exceeds what device_budget holds per "
                             f"layer ({cap}); lower p1 or raise device_budget")
    host_cap = None if cfg.host_budget is None else cfg.host_budget // (max(1, sites) * row_bytes)
    p2 = cfg.p2 if cfg.p2 is not None else (None if host_cap is None else p1 + host_cap)
    N, R = cfg.max_context, cfg.recent
    auto_alpha = 0.0 if N <= p1 else max(0.0, 1.0 - (cap - R) / (N - R))
    alpha = cfg.alpha if cfg.alpha is not None else auto_alpha
    width = (d + dv) * elt
    fetch_row = cost.host_row_s + width / cost.h2d_bytes_s
    m = _swa_rows(N, swa)
    m_host = 0.0 if N <= p1 else alpha * max(0, m - min(R, m))
    rows = sites * batch * heads
    step = rows * ((m - m_host) * cost.dev_row_s + m_host * fetch_row)
    beta, why_beta = _beta(cfg, cost, hidden, heads, d, dv, p2, keep, heads * fetch_row)
    reasons = {
        "p1": (f"override {cfg.p1}" if cfg.p1 is not None else
               f"device_budget {cfg.device_budget} B / ({sites} layers x {row_bytes} B per token) = {cap} tokens"),
        "alpha": (f"override {cfg.alpha}" if cfg.alpha is not None else
                  f"smallest host share that fits {cap} device tokens per layer at max_context {N} "
                  f"(recent {R} stay): each host row a step selects costs a fetch"),
        "p2": ("override" if cfg.p2 is not None else "host unlimited" if host_cap is None else
               f"p1 + host_budget / row bytes = {p1} + {host_cap}"),
        "beta": why_beta,
    }
    return Plan(p1=p1, p2=p2, alpha=alpha, beta=beta, recent=R, cap=cap, host_cap=host_cap,
                row_bytes=row_bytes, host=host, predicted_step_s=step,
                predicted_all_device_s=rows * m * cost.dev_row_s,
                predicted_all_host_s=rows * m * fetch_row, reasons=reasons,
                cost={k: v for k, v in asdict(cost).items()})


@lru_cache(maxsize=64)
def plan_from_json(tiers: str, batch: int, heads: int, q_heads: int, d: int, dv: int,
                   dtype: torch.dtype, device: torch.device, swa: str, keep: int | None = None,
                   hidden: int | None = None) -> Plan:
    """The plan for the ``tiers`` JSON a graph's op carries (KVTiersConfig fields + ``sites``)."""
    data = json.loads(tiers)
    sites = data.pop("sites")
    return make_plan(KVTiersConfig(**data), batch=batch, heads=heads, q_heads=q_heads, d=d, dv=dv,
                     dtype=dtype, device=device, sites=sites, swa=json.loads(swa) if swa else None,
                     keep=keep, hidden=hidden)
