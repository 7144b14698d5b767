"""The three-phase placement plan of tiered KV (ALISA §V), from the measured cost model.

Per attention site (layer), for a batch of ``B`` sequences with ``Hkv`` KV heads, one token's K+V
take ``row_bytes = B * Hkv * (D + Dv) * elt``; the device budget is shared by the ``sites``::

    cap   = device_budget // (sites * row_bytes)          tokens per layer the device holds
    p1    = cap (or kv_tiers.p1)                          phase 1: all rows on the device up to p1
    alpha = max(0, 1 - (cap - recent) / (max_context - recent))   (or kv_tiers.alpha)
          phase 2, past p1: of the tokens outside the ``recent`` window, share alpha lives on the
          host (every 1/alpha-th position); the smallest share that fits the budget at
          max_context, because every host row a step selects costs a fetch
    p2    = p1 + host_cap                                 (None: host unlimited; or kv_tiers.p2)
    beta  = share of the positions decided past p2 that keep no KV, only their layer input, and
            are recomputed when selected (phase 3; or kv_tiers.beta)

Budgets count every byte a tier holds. The kept rows of phase 3 (``kept_row_bytes = B * keep *
elt`` per token and layer) live in the host tier (its kind: RAM, pinned, mmap), so with beta > 0
they share ``host_budget`` with the host's K/V rows: ``host_cap`` (K/V tokens per layer on the
host) is the largest ``h`` with ``h * row_bytes + kept(h) * kept_row_bytes <= host_budget // sites``,
where ``kept(h) = min(max_context - recent - h, max_context - p1)`` bounds the phase-3 tokens at
max_context (a position has a kept row only if it was in the recent window when decided, i.e. at
or after ``p1 - recent``; host and phase-3 positions are distinct); ``kept_cap`` is what is left
for kept rows. The kept rows of the positions not decided yet (the recent window, at most
``recent + 1``) wait on the model's device: with beta > 0 they come off the device budget,
``cap = (device_budget // sites - (recent + 1) * kept_row_bytes) // row_bytes``. Without a host
budget both are unlimited. ``predicted_host_bytes`` (all layers, at max_context, an upper bound)
counts K/V rows and kept rows.

Phase 3 pays only if what recompute keeps per token (``keep``: the layer input, ``hidden`` values,
plus the token's RoPE cos and sin rows, ``2 * D``; :mod:`~llm_compile.runtime.tiers.recompute`) is
smaller than K+V (``Hkv * (D + Dv)``): never for GQA models such as SmolLM2 (576 + 128 > 3 * 128 =
384), often for MHA (GPT-2: 768 < 1536). Planned (``kv_tiers.beta`` None): beta = 1 when the host
tier fills before max_context (the host K/V tokens needed there, ``max(alpha * (max_context -
recent), max_context - cap)``, exceed ``host_cap``; with ``kv_tiers.p2``: p2 < max_context) and
recompute frees memory — every position decided
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
import math
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
    kept_row_bytes: int
    """Bytes of one token's kept row (phase 3) in one layer, whole batch; 0 when beta = 0."""
    kept_cap: int | None
    """Phase-3 tokens per layer the host budget holds next to ``host_cap`` K/V rows (None: unlimited)."""
    host_layer_bytes: int | None
    """``host_budget // sites``: what the host tier (K/V rows and kept rows) may hold per layer."""
    predicted_host_bytes: int | None
    """Host tier bytes, all layers, at max_context (an upper bound: K/V rows and kept rows)."""
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


def _host_need(cfg: KVTiersConfig, cap: int, p1: int, alpha: float) -> int:
    """Host K/V tokens per layer at max_context without phase 3: the host share alpha of the
    positions outside the recent window, or what the device cannot hold (spilled), whichever is more."""
    N, R = cfg.max_context, cfg.recent
    return 0 if N <= p1 else max(math.ceil(alpha * (N - R)), N - cap)


def _beta(cfg: KVTiersConfig, cost: Cost, hidden: int, heads: int, d: int, dv: int, p2: int | None,
          keep: int | None, fetch_tok_s: float, need: int = 0, host_cap: int | None = None) -> tuple[float, str]:
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
    if cfg.p2 is not None and p2 >= cfg.max_context:
        return 0.0, f"p2 = {p2} >= max_context {cfg.max_context}: nothing past p2"
    if cfg.p2 is None and host_cap is not None and need <= host_cap:
        return 0.0, (f"the host tier holds max_context ({need} host tokens per layer at {cfg.max_context} "
                     f"<= {host_cap}): nothing past p2")
    fill = (f"p2 = {p2} < max_context {cfg.max_context}" if cfg.p2 is not None else
            f"p2 = {p2} (max_context {cfg.max_context} needs {need} host tokens per layer > {host_cap})")
    return 1.0, f"the host tier fills at {fill}: past p2 every token {frees} (multi-head attention); {cost_txt}"


def _host_kv_cap(host_layer: int, row: int, kept: int, N: int, R: int, p1: int) -> int:
    """The largest host K/V token count ``h`` with ``h * row + min(N - R - h, N - p1) * kept <=
    host_layer`` (the phase-3 tokens' kept rows included, up to max_context ``N``); at least 0."""
    if not kept:
        return host_layer // row
    knee = max(0, p1 - R)                                  # below it, kept(h) = N - p1
    if knee * row + max(0, N - p1) * kept <= host_layer:
        h = (host_layer - max(0, N - R) * kept) // (row - kept)
    else:
        h = (host_layer - max(0, N - p1) * kept) // row
    return max(0, min(h, host_layer // row))


def _layout(cfg: KVTiersConfig, sites: int, batch: int, row: int, kept: int, host_layer: int | None):
    """cap, p1, host_cap, kept_cap, p2 for K/V rows of ``row`` bytes and kept rows of ``kept``
    bytes per token and layer (0: no phase 3)."""
    dev_layer = cfg.device_budget // max(1, sites) - (cfg.recent + 1) * kept
    cap = max(0, dev_layer) // row
    if cap <= cfg.recent:
        raise TiersPlanError(
            f"llmaccel kv_tiers: device_budget={cfg.device_budget} bytes holds {cap} tokens per layer "
            f"({sites} layers x {row} bytes per token for batch {batch}"
            + (f", after {cfg.recent + 1} pending kept rows of {kept} bytes for phase 3" if kept else "")
            + f"), not more than the recent window ({cfg.recent}): raise device_budget, lower "
            "kv_tiers.recent or the batch")
    p1 = cfg.p1 if cfg.p1 is not None else cap
    if p1 > cap:
        raise TiersPlanError(f"llmaccel kv_tiers: p1={p1} tokens exceeds what device_budget holds per "
                             f"layer ({cap}" + (", after the pending kept rows of phase 3" if kept else "")
                             + "); lower p1 or raise device_budget")
    if host_layer is None:
        host_cap = kept_cap = None
    else:
        host_cap = _host_kv_cap(host_layer, row, kept, cfg.max_context, cfg.recent, p1)
        kept_cap = (host_layer - host_cap * row) // kept if kept else 0
    p2 = cfg.p2 if cfg.p2 is not None else (None if host_cap is None else p1 + host_cap)
    return cap, p1, host_cap, kept_cap, p2


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
    kept_row = batch * keep * elt if keep is not None else 0
    N, R = cfg.max_context, cfg.recent
    host_layer = None if cfg.host_budget is None else cfg.host_budget // max(1, sites)
    width = (d + dv) * elt
    fetch_row = cost.host_row_s + width / cost.h2d_bytes_s
    def alpha_of(cap: int, p1: int) -> float:
        auto = 0.0 if N <= p1 else max(0.0, 1.0 - (cap - R) / (N - R))
        return cfg.alpha if cfg.alpha is not None else auto

    cap, p1, host_cap, kept_cap, p2 = _layout(cfg, sites, batch, row_bytes, 0, host_layer)
    alpha = alpha_of(cap, p1)
    beta, why_beta = _beta(cfg, cost, hidden, heads, d, dv, p2, keep, heads * fetch_row,
                           _host_need(cfg, cap, p1, alpha), host_cap)
    if beta > 0:  # phase 3 keeps rows: they count against the device (pending) and host budgets
        cap, p1, host_cap, kept_cap, p2 = _layout(cfg, sites, batch, row_bytes, kept_row, host_layer)
        alpha = alpha_of(cap, p1)
        beta, why_beta = _beta(cfg, cost, hidden, heads, d, dv, p2, keep, heads * fetch_row,
                               _host_need(cfg, cap, p1, alpha), host_cap)
    else:
        kept_row = 0
    m = _swa_rows(N, swa)
    m_host = 0.0 if N <= p1 else alpha * max(0, m - min(R, m))
    rows = sites * batch * heads
    step = rows * ((m - m_host) * cost.dev_row_s + m_host * fetch_row)
    outside = max(0, N - R)
    phase3 = beta > 0 and p2 is not None
    host_rows = min(outside if host_cap is None else host_cap, max(0, p2 - R) if phase3 else outside)
    kept_rows = 0 if not phase3 else min(outside - host_rows, max(0, N - p1))
    host_bytes = sites * (host_rows * row_bytes + kept_rows * kept_row)
    reasons = {
        "p1": (f"override {cfg.p1}" if cfg.p1 is not None else
               f"device_budget {cfg.device_budget} B / ({sites} layers x {row_bytes} B per token) = {cap} tokens"
               + (f" (after {R + 1} pending kept rows of {kept_row} B per layer)" if kept_row else "")),
        "alpha": (f"override {cfg.alpha}" if cfg.alpha is not None else
                  f"smallest host share that fits {cap} device tokens per layer at max_context {N} "
                  f"(recent {R} stay): each host row a step selects costs a fetch"),
        "p2": ("override" if cfg.p2 is not None else "host unlimited" if host_cap is None else
               f"p1 + host K/V tokens = {p1} + {host_cap}"
               + (f" (host_budget per layer {host_layer} B holds {host_cap} x {row_bytes} B of K/V and up to "
                  f"{kept_cap} kept rows of {kept_row} B: phase 3 up to max_context {N})" if kept_row else "")),
        "beta": why_beta,
    }
    if host_layer is not None and host_rows * row_bytes + kept_rows * kept_row > host_layer:
        reasons["p2"] += (f"; host_budget is too small for max_context {N}: the kept rows alone outgrow it "
                          "(HostTierFullError before max_context): raise host_budget or lower max_context")
    return Plan(p1=p1, p2=p2, alpha=alpha, beta=beta, recent=R, cap=cap, host_cap=host_cap,
                row_bytes=row_bytes, kept_row_bytes=kept_row, kept_cap=kept_cap if kept_row else None,
                host_layer_bytes=host_layer, predicted_host_bytes=host_bytes, host=host, predicted_step_s=step,
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
