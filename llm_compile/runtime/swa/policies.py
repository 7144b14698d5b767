"""SWA token-selection policies as small objects (instead of string branches in the math).

A policy decides, over the budget :func:`~llm_compile.runtime.swa.state.compute_budget` gives:
whether token scores are kept at all, over which window of steps they are summed, how many of the
budget's slots go to the most recent tokens, and which prompt rows seed the scores.

* :class:`Alisa` (``"alisa"``, default): scores summed over the last ``W`` steps (``score_window``
  or ``k``), ``recent_fraction`` of the budget recent, the rest top-scored (ALISA Algorithm 1).
* :class:`H2O` (``"h2o"``): scores accumulate over the whole history (Heavy-Hitter Oracle).
* :class:`Streaming` (``"streaming"``): no scores; ``sink_tokens`` sinks + the most recent tokens
  (StreamingLLM).

Room for query-aware policies (``oracle``, ``quest``, ``recall``): they would add a ``select``
hook that sees the current query; none is implemented here.
"""
from __future__ import annotations

import json
import math
from functools import lru_cache

from llm_compile.config import SWAConfig


def round_half_up(x: float) -> int:
    """Round half up, ignoring float noise (``25 * (1 - 0.8) / 2`` is 2.4999999999999996)."""
    return int(math.floor(round(x, 9) + 0.5))


def half_budget(n: int, cfg) -> int:
    """ALISA's ``k = round(n * (1 - sparsity) / 2)`` at a step over ``n`` tokens."""
    return round_half_up(n * (1.0 - cfg.sparsity) / 2.0)


class Policy:
    name = ""
    needs_scores = True
    """False: selection uses positions only, no attention weights are summed."""
    windowed = True
    """True: scores are a sliding-window sum (rows are kept so they can leave the window)."""

    def window(self, k: int, cfg) -> int | None:
        """Score window in steps at a step whose half budget is ``k`` (None: no window)."""
        return None

    def recent(self, rest: int, total: int, cfg) -> int:
        """Slots (of the ``rest`` left after the sinks) given to the most recent tokens."""
        return min(rest, max(1, round_half_up(total * cfg.recent_fraction)))

    def first_seed_row(self, Lq: int, n: int, cfg) -> int:
        """First prompt query row whose weights seed the scores."""
        return 0

    def describe(self, cfg) -> str:
        return (f"{cfg.recent_fraction:.3g}*2k recent + {cfg.sink_tokens} sinks + rest top by "
                f"attention summed over {self.history(cfg)} per {cfg.selection}")

    def history(self, cfg) -> str:
        return "whole history"


class Alisa(Policy):
    name = "alisa"

    def window(self, k, cfg):
        return cfg.score_window or max(k, 1)

    def first_seed_row(self, Lq, n, cfg):
        return max(0, Lq - self.window(half_budget(n + 1, cfg), cfg))

    def history(self, cfg):
        return f"last {cfg.score_window or 'k'} steps"


class H2O(Policy):
    name = "h2o"
    windowed = False


class Streaming(Policy):
    name = "streaming"
    needs_scores = False
    windowed = False

    def recent(self, rest, total, cfg):
        return rest

    def describe(self, cfg):
        return f"{cfg.sink_tokens} sinks + recent"


POLICIES: dict[str, Policy] = {p.name: p for p in (Alisa(), H2O(), Streaming())}


def policy_of(cfg) -> Policy:
    try:
        return POLICIES[cfg.policy]
    except KeyError:
        raise ValueError(f"llmaccel swa: unknown policy {cfg.policy!r} (one of {sorted(POLICIES)})") from None


@lru_cache(maxsize=64)
def config_from_json(text: str) -> SWAConfig | None:
    """The ``SWAConfig`` a graph's op carries as JSON (``""``: dense); parsed once per string."""
    if not text:
        return None
    return SWAConfig(**json.loads(text))
