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


# --- CLI pieces (llm_compile.anda_cli): options, BOPs, memoisation, kinds ---------------------------

def test_cli_options_bops_and_tuple_file(tmp_path):
    import json

    from llm_compile.anda_cli import relative_bops
    from llm_compile.anda_eval import anda_options
    from llm_compile.config import parse_options

    assert relative_bops(16, MACS) == 1.0 and relative_bops(8, MACS) == 0.5
    w = {"qkv": 8, "o": 4, "gate_up": 6, "down": 8}
    assert relative_bops(w, MACS) == sum(MACS[k] * w[k] for k in KINDS) / (16 * sum(MACS.values()))
    cfg = parse_options(anda_options(w))
    assert cfg.anda.bits_for("o") == 4 and cfg.anda.kernel == "reference" and cfg.inner == "eager"
    path = tmp_path / "t.json"                       # what the CLI writes: {"mantissa_bits": {...}}
    path.write_text(json.dumps({"mantissa_bits": w}))
    assert parse_options({"anda": json.loads(path.read_text())}).anda.bits_for("gate_up") == 6


class _CountingEvaluator:
    """Evaluator whose model call is replaced by a synthetic perplexity (counts real evaluations)."""

    def __new__(cls, cache, setting):
        import torch

        from llm_compile.anda_eval import Evaluator

        class E(Evaluator):
            calls = 0

            def _run(self, w):
                E.calls += 1
                return synthetic_ppl(w), {"lowered": 0}

            def reference(self):
                return self._cached("w4a16", lambda: (10.0, {}))

        return E(None, torch.zeros(1, 8, dtype=torch.long), context=8, cache=cache, setting=setting)


def test_second_delta_reuses_cached_evaluations(tmp_path):
    from llm_compile.anda_cli import run_search
    from llm_compile.anda_eval import EvalCache

    path = tmp_path / "cache.json"
    e1 = _CountingEvaluator(EvalCache(path), {"split": "calibration"})
    r1 = run_search(e1, MACS, 0.05, start=8, progress=False)
    first = type(e1).calls
    assert first == r1.evaluations and e1.misses == first + 1           # + the W4A16 reference
    e2 = _CountingEvaluator(EvalCache(path), {"split": "calibration"})      # new process, same file
    r2 = run_search(e2, MACS, 0.01, start=8, progress=False)
    assert e2.hits >= 2 and type(e2).calls == e2.misses < r2.evaluations   # start + shared prefix cached
    assert r2.best_bops >= r1.best_bops                                     # tighter tolerance
    e3 = _CountingEvaluator(EvalCache(path), {"split": "evaluation"})       # other setting: no reuse
    e3(dict.fromkeys(KINDS, 8))
    assert e3.misses == 1 and e3.hits == 0


def test_linear_kinds_and_eager_op_match_reference():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llm_compile.anda_eval import anda_eager, linear_kinds
    from llm_compile.ops.anda import anda_linear_reference
    from llm_compile.quantize import quantize_weights

    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=1, vocab_size=64)
    torch.manual_seed(0)
    model = quantize_weights(LlamaForCausalLM(cfg).eval(), 4, 64)
    kinds = linear_kinds(model)
    assert sorted(kinds.values()) == sorted(["qkv"] * 3 + ["o"] + ["gate_up"] * 2 + ["down"])
    w = {"qkv": 9, "o": 5, "gate_up": 6, "down": 8}
    mod = model.model.layers[0].mlp.up_proj
    x = torch.randn(2, 3, 128)
    with torch.no_grad(), anda_eager(model, w) as n:
        got = mod(x)
    assert n == 7 and "forward" not in vars(mod)                         # restored after the block
    ref = anda_linear_reference(x, mod.qweight, mod.scales, None, 6, 4, 64)
    assert torch.equal(got, ref)
