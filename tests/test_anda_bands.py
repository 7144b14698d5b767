"""Layer-band precision search (issue 16, item 4): slots, BOPs accounting, cap, warm start, cache."""
import json

import pytest
import torch

from llm_compile.anda_bands import band_ranges, band_slots, slot_macs, slots_from, to_mantissa_bits
from llm_compile.anda_search import adaptive_precision_search, bops, macs_per_token
from llm_compile.anda_widths import ANDA_MODULE_KINDS as KINDS, bits_for, layer_index

L = 6
MACS = macs_per_token(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2,
                      num_layers=L)
SENS = {"qkv": 3.0, "o": 0.5, "gate_up": 1.0, "down": 6.0}
LAYER_SENS = [4.0, 1.0, 1.0, 1.0, 0.25, 0.25]      # early layers more sensitive


def layer_ppl(mb):
    """Synthetic perplexity of a ``mantissa_bits`` value: monotone in every layer's every width."""
    return 10.0 * (1.0 + sum(LAYER_SENS[i] * SENS[k] * 2.0 ** -bits_for(mb, k, i if isinstance(mb, (list, tuple)) else None)
                             for i in range(L) for k in KINDS) / L)


def test_band_ranges_and_slots():
    assert band_ranges(30, 4) == [(0, 7), (8, 15), (16, 22), (23, 29)]
    assert band_ranges(30, 1) == [(0, 29)] and len(band_ranges(30, 30)) == 30
    assert band_slots(30, 1) == list(KINDS)
    assert band_slots(30, 3)[:5] == ["qkv@0-9", "o@0-9", "gate_up@0-9", "down@0-9", "qkv@10-19"]
    for bad in (0, 31, 2.0):
        with pytest.raises(ValueError, match="bands"):
            band_ranges(30, bad)


@pytest.mark.parametrize("bands", [1, 2, 4, L])
def test_slot_macs_preserve_bops_and_round_trip(bands):
    sm = slot_macs(MACS, L, bands)
    assert sum(sm.values()) == pytest.approx(sum(MACS.values()))
    w = {s: 3 + i % 5 for i, s in enumerate(sm)}
    mb = to_mantissa_bits(w, L, bands)
    # the slot BOPs are the BOPs of the per-layer value they describe
    per_layer = mb if bands > 1 else [mb] * L
    assert bops(w, sm) == pytest.approx(sum(MACS[k] / L * per_layer[i][k] * 4 for i in range(L) for k in KINDS))
    assert slots_from(mb, L, bands) == w
    assert slots_from(7, L, bands) == dict.fromkeys(sm, 7)


def test_slots_from_rejects_a_split_band():
    mb = [dict.fromkeys(KINDS, 7)] * L
    mb = mb[:1] + [dict(mb[0], o=6)] + mb[2:]
    with pytest.raises(ValueError, match="layers 0-2 have different o widths"):
        slots_from(mb, L, 2)
    with pytest.raises(ValueError, match="5 entries for 6 layers"):
        slots_from(mb[:5], L, 2)


@pytest.mark.parametrize("bands, cap", [(1, 32), (3, 32), (3, 7), (L, 20)])
def test_band_search_cap_bops_accounting_and_neighbours(bands, cap):
    sm = slot_macs(MACS, L, bands)
    calls = []

    def ppl(w):
        calls.append(dict(w))
        return layer_ppl(to_mantissa_bits(w, L, bands))
    r = adaptive_precision_search(ppl, 10.0, sm, delta=0.1, start=8, max_evals=cap)
    assert r.evaluations == len(calls) == len(r.history) <= cap
    assert all(set(c) == set(sm) for c in calls)
    for h in r.history:                                    # BOPs recorded = BOPs of the widths
        assert h["bops"] == pytest.approx(bops(h["widths"], sm))
    # best-first: each evaluated candidate is one width below an accepted one, so cheaper than it
    accepted = [h for h in r.history if h["accepted"]]
    for h in r.history[1:]:
        parents = [a for a in accepted if sum(a["widths"][s] - h["widths"][s] for s in sm) == 1
                   and all(a["widths"][s] >= h["widths"][s] for s in sm)]
        assert parents and all(h["bops"] < a["bops"] for a in parents)
    # BOPs are monotone in every slot's width (lowering one width by one saves exactly its MACs x 4)
    w = dict.fromkeys(sm, 8)
    for s_ in sm:
        assert bops(w, sm) - bops(dict(w, **{s_: 7}), sm) == pytest.approx(4 * sm[s_]) and sm[s_] > 0
    assert r.best_bops == min(a["bops"] for a in accepted) == bops(r.best, sm)
    assert r.best_ppl == layer_ppl(to_mantissa_bits(r.best, L, bands)) <= 11.0


def test_bands_reach_the_brute_force_optimum_and_beat_per_kind():
    """With an unlimited cap the search finds the cheapest feasible band assignment (checked by
    brute force over widths 6..8), and two bands beat one when layers differ in sensitivity."""
    import itertools

    best = {}
    for bands in (1, 2):
        sm = slot_macs(MACS, L, bands)
        r = adaptive_precision_search(lambda w: layer_ppl(to_mantissa_bits(w, L, bands)), 10.0, sm,
                                      delta=0.1, start=8, min_bits=6, max_evals=10_000)
        brute = min(bops(w, sm) for t in itertools.product((6, 7, 8), repeat=len(sm))
                    for w in [dict(zip(sm, t))] if layer_ppl(to_mantissa_bits(w, L, bands)) <= 11.0)
        assert r.best_bops == brute
        best[bands] = r.best_bops
    assert best[2] < best[1]


class _Fake:
    """A CLI Evaluator whose model run is :func:`layer_ppl` (counts real evaluations)."""

    def __new__(cls, cache):
        from llm_compile.anda_eval import Evaluator

        class E(Evaluator):
            calls = []

            def _run(self, w):
                E.calls.append(w)
                return layer_ppl(w), {"lowered": 0}

            def reference(self):
                return self._cached("w4a16", lambda: (10.0, {}))

        return E(None, torch.zeros(1, 8, dtype=torch.long), context=8, cache=cache,
                 setting={"split": "calibration"})


def test_run_search_bands_warm_start_and_shared_cache(tmp_path):
    from llm_compile.anda_cli import relative_bops, run_search
    from llm_compile.anda_eval import EvalCache

    path = tmp_path / "cache.json"
    e1 = _Fake(EvalCache(path))
    r1 = run_search(e1, MACS, 0.1, start=8, progress=False)              # per kind
    start = to_mantissa_bits(r1.best, L, 1)
    e3 = _Fake(EvalCache(path))
    r3 = run_search(e3, MACS, 0.1, start=start, max_evals=12, progress=False, bands=3, num_layers=L)
    assert r3.evaluations <= 12 and r3.history[0]["widths"] == slots_from(start, L, 3)
    assert e3.hits >= 2                  # W4A16 and the start (the same model as the per-kind tuple)
    # per-layer values reached the evaluator; a band tuple's BOPs = relative_bops of its per-layer value
    assert any(isinstance(c, list) and len(c) == L for c in type(e3).calls)
    best = to_mantissa_bits(r3.best, L, 3)
    sm = slot_macs(MACS, L, 3)
    assert relative_bops(best, MACS) == pytest.approx(r3.best_bops / bops(dict.fromkeys(sm, 16), sm))
    assert relative_bops(best, MACS) <= relative_bops(start, MACS)
    keys = json.loads(path.read_text())["settings"]
    assert any('"layers"' in k for v in keys.values() for k in v)
    with pytest.raises(ValueError, match="num_layers"):
        run_search(e3, MACS, 0.05, bands=3, progress=False)


def test_cli_start_parsing_and_tuple_file(tmp_path):
    from llm_compile.anda_cli import parse_start, write_tuple
    from llm_compile.config import parse_options

    assert parse_start("11") == (11, None)
    assert parse_start("7,10,7,7") == (dict(zip(KINDS, (7, 10, 7, 7))), None)
    mb = to_mantissa_bits({s: 5 + i % 3 for i, s in enumerate(band_slots(L, 2))}, L, 2)
    path = tmp_path / "t.json"
    write_tuple(path, mb)
    assert len(path.read_text().splitlines()) == L + 2                 # one line per layer
    opt = json.loads(path.read_text())
    assert parse_options({"anda": opt}).anda.bits_for("o", 4) == mb[4]["o"]
    (tmp_path / "t.search.json").write_text(json.dumps({"evaluations": 32}))
    value, summary = parse_start(str(path))
    assert value == tuple(mb) and summary == {"evaluations": 32}
    write_tuple(tmp_path / "k.json", mb[0])
    assert parse_start(str(tmp_path / "k.json")) == (mb[0], None)


def test_eager_widths_follow_layers():
    """``anda_eager`` gives each QuantLinear the width of its kind *and layer*."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llm_compile.anda_eval import anda_eager, linear_kinds
    from llm_compile.ops.anda import anda_linear_reference
    from llm_compile.quantize import quantize_weights

    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=3, vocab_size=64)
    torch.manual_seed(0)
    model = quantize_weights(LlamaForCausalLM(cfg).eval(), 4, 64)
    mb = [dict(zip(KINDS, (9, 5, 6, 8))), 4, dict(zip(KINDS, (3, 12, 2, 16)))]
    x = {128: torch.randn(2, 3, 128), 256: torch.randn(2, 3, 256)}
    checked = 0
    with torch.no_grad(), anda_eager(model, mb) as n:
        for name, kind in linear_kinds(model).items():
            mod = model.get_submodule(name)
            m = bits_for(mb, kind, layer_index(name))
            xi = x[mod.in_features]
            ref = anda_linear_reference(xi, mod.qweight, mod.scales, None, m, 4, 64)
            other = anda_linear_reference(xi, mod.qweight, mod.scales, None, m + 1 if m < 16 else 2, 4, 64)
            got = mod(xi)
            assert torch.equal(got, ref) and not torch.equal(got, other), (name, m)
            checked += 1
    assert n == checked == 21
    with pytest.raises(ValueError, match="lists 2 layers"):
        with anda_eager(model, mb[:2]):
            pass
