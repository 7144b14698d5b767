"""SWA token-selection policies as small objects (instead of string branches in the math).

A policy decides, over the budget :func:`~llm_compile.runtime.swa.state.compute_budget` gives:
whether token scores are kept at all, over which window of steps they are summed, how many of the
budget's slots go to the most recent tokens, and which prompt rows seed the scores.

* :class:`Alisa` (``"alisa"``, default): scores summed over the last ``W`` steps (``score_window``
  or ``k``), ``recent_fraction`` of the budget recent, the rest top-scored (ALISA Algorithm 1).
* :class:`H2O` (``"h2o"``): scores accumulate over the whole history (Heavy-Hitter Oracle).
* :class:`Streaming` (``"streaming"``): no scores; ``sink_tokens`` sinks + the most recent tokens
  (StreamingLLM).

Query-aware policies (issue 15) also pick tokens for the *current* query, so a token that fell
out of the kept set can come back when a later query needs it (history scores cannot do that: a
token that is not attended receives no new weight):

* :class:`Quest` (``"quest"``): the current page + the tokens of the pages whose key min/max
  summaries (:mod:`~llm_compile.runtime.swa.pages`) bound ``q . k`` highest (Quest).
* :class:`Recall` (``"recall"``): ALISA's recent window and history-scored tokens, plus
  ``query_fraction`` of the rows picked by the query scorer (``swa.scorer``: the key sketch by
  default, or the page bounds; :mod:`~llm_compile.runtime.swa.scorers`).
* :class:`Oracle` (``"oracle"``): exact top-k of the current query's attention; it computes the full
  ``q K^T`` (reads every key), so it is an accuracy bound for analysis, not a speed-up.

For ``quest``/``recall`` the budget counts the summaries: a step reads at most ``n * (1 - sparsity)``
token rows (K+V) *including* the summaries (``2 * D`` per page per KV head), see
:func:`~llm_compile.runtime.swa.state.compute_budget`.

Prefill seeding is a small object too (``swa.seed``): :class:`WindowSeed` (the last prompt rows, as
many as the score window) or :class:`SnapKVSeed` (SnapKV's observation window of the last 32 prompt
rows, each max-pooled over 7 neighbouring tokens and rescaled to its own mass).
"""
from __future__ import annotations

import json
import math
from functools import lru_cache

import torch
from torch import Tensor

from llm_compile.config import SWAConfig
from llm_compile.runtime.swa.scorers import scorer_of


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
    pages = False
    """True: keeps page summaries of the keys and picks tokens by their bound for the query."""
    exact = False
    """True: picks tokens by the exact attention of the current query (reads every key)."""

    def split(self, n: int, rest: int, cfg) -> tuple[int, int]:
        """(recent, query) slots of the ``rest`` rows left after the sinks, for a query-aware
        policy at a step over ``n`` tokens; the remainder is history-scored."""
        return self.recent(rest, rest, cfg), 0

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


class Quest(Policy):
    name = "quest"
    needs_scores = False
    windowed = False
    pages = True

    def split(self, n, rest, cfg):
        recent = min(rest, (n - 1) % cfg.page_size + 1)  # the current (partial) page
        return recent, rest - recent

    def describe(self, cfg):
        return (f"{cfg.sink_tokens} sinks + current page + top tokens by the page bound "
                f"(key min/max per {cfg.page_size} tokens; summaries counted)")


class Recall(Alisa):
    name = "recall"
    pages = True

    def split(self, n, rest, cfg):
        query = min(rest - 1, round_half_up(rest * cfg.query_fraction))
        rem = rest - query
        return min(rem, max(1, round_half_up(rem * cfg.recent_fraction))), query

    def describe(self, cfg):
        return (f"{cfg.query_fraction:.3g} of the rows by {scorer_of(cfg).describe(cfg)}, the rest "
                f"{cfg.recent_fraction:.3g} recent + top by attention summed over {self.history(cfg)} "
                f"per {cfg.selection}; {cfg.sink_tokens} sinks")


class Oracle(Policy):
    name = "oracle"
    needs_scores = False
    windowed = False
    exact = True

    def split(self, n, rest, cfg):
        return 0, rest

    def describe(self, cfg):
        return (f"{cfg.sink_tokens} sinks + exact top-k of the current query (reads every key: "
                "an accuracy bound for analysis, not a speed-up)")


POLICIES: dict[str, Policy] = {p.name: p for p in (Alisa(), H2O(), Streaming(), Quest(), Recall(),
                                                   Oracle())}


class WindowSeed:
    """``seed="window"``: the policy's own rule (ALISA: the last ``W0`` prompt rows)."""

    name = "window"

    def first_row(self, policy: Policy, Lq: int, n: int, cfg) -> int:
        return policy.first_seed_row(Lq, n, cfg)

    def transform(self, rows: Tensor) -> Tensor:
        return rows


class SnapKVSeed:
    """``seed="snapkv"`` (SnapKV, arXiv 2404.14469): the last ``window`` prompt rows (observation
    window), each row max-pooled over ``kernel`` neighbouring tokens (keeps the neighbours of a
    strongly attended token) and rescaled to the row's own mass, so every step counts the same in
    the windowed sums."""

    name = "snapkv"
    window = 32
    kernel = 7

    def first_row(self, policy, Lq, n, cfg):
        return max(0, Lq - self.window)

    def transform(self, rows: Tensor) -> Tensor:
        shape = rows.shape
        flat = rows.reshape(-1, 1, shape[-1])
        pooled = torch.nn.functional.max_pool1d(flat, self.kernel, stride=1, padding=self.kernel // 2)
        mass = flat.sum(-1, keepdim=True)
        pooled = pooled * (mass / pooled.sum(-1, keepdim=True).clamp_min(1e-30))
        return pooled.reshape(shape)


SEEDS = {s.name: s for s in (WindowSeed(), SnapKVSeed())}


def seed_of(cfg) -> WindowSeed | SnapKVSeed:
    return SEEDS[cfg.seed]


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
