"""Adaptive precision search (Anda, arXiv 2411.15982, Algorithm 1).

Finds one mantissa width per module kind (``qkv``, ``o``, ``gate_up``, ``down``), shared by all
layers (or, with layer bands, per kind and band: :mod:`llm_compile.anda_bands`), that minimises bit operations (BOPs) while the perplexity stays within ``(1 + delta)`` of the
W4A16 reference (INT4 weights, FP16 activations):

1. Evaluate the start tuple (default ``M = 11`` everywhere: every FP16 group maximum is exact).
2. Keep a priority queue of candidate tuples ordered by BOPs (fewest first). A candidate's
   neighbours are the tuples that lower exactly one kind's width by one.
3. Pop the cheapest candidate, evaluate its perplexity (the callback); if it is within tolerance it is
   accepted (the best so far if it has fewer BOPs) and its unseen neighbours are pushed. Rejected
   tuples are not expanded: lowering a width further only loses accuracy.
4. Stop when the queue is empty or after ``max_evals`` (32) perplexity evaluations.

BOPs per token = sum over kinds of ``MACs(kind) * M(kind) * weight_bits`` (the bit-serial Anda PE
processes one mantissa plane per cycle, so cost grows linearly with ``M``).

The perplexity callback takes ``{"qkv": m, "o": m, "gate_up": m, "down": m}`` (the value of
``options={"anda": {"mantissa_bits": ...}}``) and returns a float; ``llm_compile.eval`` provides
one for real models. It may instead return a dict with ``"ppl"`` and further fields (e.g. the
perplexity of each part of the calibration tokens), which go into the history entry; an
``accept(entry) -> bool`` predicate then replaces the default rule ``ppl <= (1 + delta) *
reference_ppl`` (the CLI's per-part rule, ``--calib-parts``: :func:`llm_compile.anda_run.run_search`).
``python -m llm_compile.anda_cli`` runs the search on SmolLM2-135M
(:mod:`llm_compile.anda_cli`).
"""
from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping

log = logging.getLogger(__name__)

__all__ = ["SearchResult", "adaptive_precision_search", "bops", "macs_per_token"]


def macs_per_token(hidden_size: int, intermediate_size: int, num_attention_heads: int,
                   num_key_value_heads: int | None = None, head_dim: int | None = None,
                   num_layers: int = 1) -> dict[str, int]:
    """MACs per token of each module kind for a Llama-style decoder (gate and up both counted)."""
    kv = num_key_value_heads or num_attention_heads
    hd = head_dim or hidden_size // num_attention_heads
    q_dim, kv_dim = num_attention_heads * hd, kv * hd
    per_layer = {"qkv": hidden_size * (q_dim + 2 * kv_dim), "o": q_dim * hidden_size,
                 "gate_up": 2 * hidden_size * intermediate_size, "down": intermediate_size * hidden_size}
    return {k: v * num_layers for k, v in per_layer.items()}


def bops(widths: Mapping[str, int], macs: Mapping[str, float], weight_bits: int = 4) -> float:
    """Bit operations per token of a width assignment over the slots of ``macs`` (the four kinds, or
    ``kind@first-last`` layer-band slots from :mod:`llm_compile.anda_bands`)."""
    return float(sum(macs[k] * widths[k] * weight_bits for k in macs))


@dataclass
class SearchResult:
    best: dict[str, int]
    """Accepted tuple with the fewest BOPs (the start tuple if nothing was accepted)."""
    best_ppl: float
    best_bops: float
    reference_ppl: float
    feasible: bool
    """Whether ``best`` meets the tolerance (False only when the start tuple already fails)."""
    evaluations: int
    history: list[dict] = field(default_factory=list)
    """One entry per evaluation, in order: ``{"widths", "ppl", "bops", "accepted"}`` plus the extra
    fields of a dict-returning callback."""


def adaptive_precision_search(perplexity: Callable[[dict[str, int]], float | Mapping],
                              reference_ppl: float, macs: Mapping[str, float], delta: float = 0.01,
                              start: int | Mapping[str, int] = 11, min_bits: int = 1,
                              max_evals: int = 32, weight_bits: int = 4,
                              accept: Callable[[dict], bool] | None = None) -> SearchResult:
    """Anda Algorithm 1 (see the module docstring). ``reference_ppl`` is the W4A16 perplexity. The
    slots searched are the keys of ``macs`` (per kind, or per kind and layer band); ``start`` is one
    width for every slot or a dict over the slots. ``perplexity`` returns a float or a dict with
    ``"ppl"`` and extra fields for the history; ``accept(entry)`` (the history entry without
    ``"accepted"``) decides acceptance, default ``entry["ppl"] <= (1 + delta) * reference_ppl``."""
    if max_evals < 1 or delta < 0:
        raise ValueError("max_evals must be >= 1 and delta >= 0")
    slots = list(macs)

    def _as_dict(t: tuple[int, ...]) -> dict[str, int]:
        return dict(zip(slots, t))

    start_t = (tuple(int(start[k]) for k in slots) if isinstance(start, Mapping)
               else (int(start),) * len(slots))
    if not all(min_bits <= m <= 16 for m in start_t) or not 1 <= min_bits <= 16:
        raise ValueError(f"start widths {start_t} and min_bits={min_bits} must lie in 1..16")
    limit = (1.0 + delta) * reference_ppl

    def cost(t):
        return bops(_as_dict(t), macs, weight_bits)

    history: list[dict] = []
    queue = [(cost(start_t), start_t)]
    seen = {start_t}
    best_t, best_ppl, feasible = start_t, None, False
    while queue and len(history) < max_evals:
        b, t = heapq.heappop(queue)
        value = perplexity(_as_dict(t))
        extra = dict(value) if isinstance(value, Mapping) else {"ppl": value}
        ppl = float(extra.pop("ppl"))
        entry = {"widths": _as_dict(t), "ppl": ppl, "bops": b, **extra}
        ok = bool(accept(entry)) if accept is not None else ppl <= limit
        entry["accepted"] = ok
        history.append(entry)
        log.info("anda search %d: %s ppl=%.4f (limit %.4f) bops=%.3g %s", len(history), _as_dict(t),
                 ppl, limit, b, "accept" if ok else "reject")
        if t == start_t:
            best_ppl = ppl
        if not ok:
            continue
        if not feasible or b < cost(best_t):
            best_t, best_ppl, feasible = t, ppl, True
        for i in range(len(t)):
            if t[i] > min_bits:
                nb = t[:i] + (t[i] - 1,) + t[i + 1:]
                if nb not in seen:
                    seen.add(nb)
                    heapq.heappush(queue, (cost(nb), nb))
    return SearchResult(_as_dict(best_t), best_ppl, cost(best_t), reference_ppl, feasible, len(history),
                        history)
