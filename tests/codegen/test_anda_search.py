"""Anda adaptive precision search (Algorithm 1) with synthetic perplexity functions."""
import itertools

import pytest

from llm_compile.anda_search import adaptive_precision_search, bops, macs_per_token

KINDS = ("qkv", "o", "gate_up", "down")
MACS = macs_per_token(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2)
SENS = {"qkv": 3.0, "o": 0.5, "gate_up": 1.0, "down": 6.0}      # per-kind sensitivity


def synthetic_ppl(w):
    """Monotone: fewer mantissa bits -> higher perplexity; kinds differ in sensitivity."""
    return 10.0 * (1.0 + sum(SENS[k] * 2.0 ** -w[k] for k in KINDS))


class Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, w):
        self.calls.append(dict(w))
        return self.fn(w)


def test_macs_and_bops():
    assert MACS == {"qkv": 128 * (128 + 2 * 64), "o": 128 * 128, "gate_up": 2 * 128 * 352, "down": 352 * 128}
    w = dict.fromkeys(KINDS, 2)
    assert bops(w, MACS, weight_bits=4) == sum(MACS.values()) * 2 * 4


def test_respects_tolerance_budget_and_reduces_bops():
    ref = 10.0
    f = Counting(synthetic_ppl)
    r = adaptive_precision_search(f, ref, MACS, delta=0.02, start=11)
    assert r.evaluations == len(f.calls) <= 32 and r.feasible
    assert r.best_ppl == synthetic_ppl(r.best) <= 1.02 * ref
    assert r.best_bops < bops(dict.fromkeys(KINDS, 11), MACS)
    assert r.best_bops == min(h["bops"] for h in r.history if h["accepted"])
    assert f.calls[0] == dict.fromkeys(KINDS, 11)
    # every evaluated tuple (after the start) is one step below an accepted tuple
    accepted = [tuple(h["widths"][k] for k in KINDS) for h in r.history if h["accepted"]]
    for h in r.history[1:]:
        t = tuple(h["widths"][k] for k in KINDS)
        assert any(sum(a - b for a, b in zip(acc, t)) == 1 and all(a >= b for a, b in zip(acc, t))
                   for acc in accepted)


def test_cheapest_neighbour_first():
    f = Counting(synthetic_ppl)
    adaptive_precision_search(f, 10.0, MACS, delta=1.0, start=8, max_evals=2)
    # gate_up has the most MACs, so lowering it saves the most BOPs: evaluated right after the start
    assert f.calls[1] == {"qkv": 8, "o": 8, "gate_up": 7, "down": 8}


def test_finds_brute_force_optimum_with_enough_evaluations():
    ref, delta, lo, hi = 10.0, 0.3, 1, 6
    r = adaptive_precision_search(synthetic_ppl, ref, MACS, delta=delta, start=hi, min_bits=lo,
                                  max_evals=10_000)
    feasible = [dict(zip(KINDS, t)) for t in itertools.product(range(lo, hi + 1), repeat=4)
                if synthetic_ppl(dict(zip(KINDS, t))) <= (1 + delta) * ref]
    best = min(bops(w, MACS) for w in feasible)
    assert r.best_bops == best and r.evaluations < (hi - lo + 1) ** 4
    # the less sensitive kinds end at fewer bits
    assert r.best["o"] <= r.best["down"]


def test_start_infeasible_and_bad_args():
    r = adaptive_precision_search(lambda w: 100.0, 10.0, MACS, delta=0.01, start=5)
    assert not r.feasible and r.evaluations == 1 and r.best == dict.fromkeys(KINDS, 5)
    with pytest.raises(ValueError):
        adaptive_precision_search(synthetic_ppl, 10.0, MACS, max_evals=0)
    with pytest.raises(ValueError):
        adaptive_precision_search(synthetic_ppl, 10.0, MACS, start=17)


def test_dict_start_and_min_bits_floor():
    start = {"qkv": 3, "o": 2, "gate_up": 2, "down": 4}
    r = adaptive_precision_search(lambda w: 10.0, 10.0, MACS, delta=0.0, start=start, min_bits=2)
    assert r.best == {"qkv": 2, "o": 2, "gate_up": 2, "down": 2} and r.feasible
    assert all(min(h["widths"].values()) >= 2 for h in r.history)
