"""Anda search: the per-part acceptance rule (``--calib-parts``), its cache keys and CLI checks.

Synthetic perplexities only (no model runs): a fake Evaluator returns a whole-split ppl and part
ppls chosen so that the whole-split rule and the per-part rule disagree.
"""
import json
import math

import pytest
import torch

from llm_compile.anda_search import adaptive_precision_search, macs_per_token

KINDS = ("qkv", "o", "gate_up", "down")
MACS = macs_per_token(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2)
REF_PARTS = [4.0, 8.0]                       # W4A16 per part; the whole-split W4A16 ppl is 6.0


def test_accept_predicate_and_extra_fields_in_history():
    def ppl(w):
        return {"ppl": 10.0, "score": w["o"]}
    # the default rule would accept everything (ppl == reference); the predicate refuses o < 7
    r = adaptive_precision_search(ppl, 10.0, MACS, delta=0.0, start=8, max_evals=50,
                                  accept=lambda e: e["score"] >= 7)
    assert r.feasible and r.best["o"] == 7
    assert all(h["accepted"] == (h["widths"]["o"] >= 7) for h in r.history)
    assert all(h["score"] == h["widths"]["o"] and set(h) == {"widths", "ppl", "bops", "score", "accepted"}
               for h in r.history)
    # a float callback and no predicate: the entries are as before (no extra keys)
    r = adaptive_precision_search(lambda w: 10.0, 10.0, MACS, delta=0.0, start=2, max_evals=3)
    assert set(r.history[0]) == {"widths", "ppl", "bops", "accepted"}


def test_part_bounds_and_part_perplexities():
    from llm_compile.anda_eval import MIN_PART_TOKENS, part_bounds, part_perplexities
    from llm_compile.eval.data import part_lengths

    assert part_bounds(2048, 1) == [(0, 2048)]
    b = part_bounds(1030, 8)
    assert [e - s for s, e in b] == part_lengths("calibration-wide", 1030)      # one part per book
    assert b[0][0] == 0 and b[-1][1] == 1030 and all(b[i][1] == b[i + 1][0] for i in range(7))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=">= 1"):
            part_bounds(2048, bad)
    with pytest.raises(ValueError, match="at most 2 parts"):
        part_bounds(2 * MIN_PART_TOKENS + 10, 3)
    # NLLs of positions 1..N-1: part [0, 4) holds positions 1..3, part [4, 8) positions 4..7
    nll = torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    assert part_perplexities(nll, [(0, 4), (4, 8)]) == pytest.approx([math.e, math.e ** 2])


class _PartsEvaluator:
    """An Evaluator whose model run returns ``table[widths]`` = (whole ppl, [part ppls])."""

    def __new__(cls, cache, parts, table, default, n_tokens=256, split="calibration-wide"):
        from llm_compile.anda_eval import Evaluator

        class E(Evaluator):
            calls = 0

            def _run(self, w):
                E.calls += 1
                whole, per = table.get(tuple(w[k] for k in KINDS), default)
                return whole, ({"lowered": 0, "parts": per} if self.parts > 1 else {"lowered": 0})

            def reference(self):
                return self._cached("w4a16", lambda: (6.0, {"parts": REF_PARTS} if self.parts > 1 else {}))

        return E(None, torch.zeros(1, n_tokens, dtype=torch.long), context=n_tokens, cache=cache,
                 setting={"split": split}, parts=parts)


# start (8,8,8,8): fine everywhere. Lowering gate_up (the cheapest step) keeps the whole-split ppl
# within 1 % of 6.0 (6.05) but part 0 goes 4.0 -> 4.2 (+5 %); every other tuple is far off.
TABLE = {(8, 8, 8, 8): (6.0, [4.0, 8.0]), (8, 8, 7, 8): (6.05, [4.2, 7.9])}
BAD = (9.0, [6.0, 12.0])


def test_per_part_rule_rejects_a_part_the_whole_split_hides(tmp_path):
    from llm_compile.anda_cli import run_search
    from llm_compile.anda_eval import EvalCache

    whole = run_search(_PartsEvaluator(EvalCache(tmp_path / "c.json"), 1, TABLE, BAD), MACS, 0.01,
                       start=8, progress=False)
    assert whole.best == {"qkv": 8, "o": 8, "gate_up": 7, "down": 8}           # whole split: accepted
    assert whole.reference_parts is None and "part_ratio" not in whole.history[1]

    per = run_search(_PartsEvaluator(EvalCache(tmp_path / "c.json"), 2, TABLE, BAD), MACS, 0.01,
                     start=8, progress=False)
    assert per.feasible and per.best == dict.fromkeys(KINDS, 8)               # per part: rejected
    assert per.reference_parts == REF_PARTS
    h = next(h for h in per.history if h["widths"]["gate_up"] == 7 and h["widths"]["qkv"] == 8
             and h["widths"]["o"] == 8 and h["widths"]["down"] == 8)
    assert not h["accepted"] and h["ppl"] == 6.05                             # reported: whole split
    assert h["part_ppl"] == [4.2, 7.9]
    assert h["part_ratio"] == pytest.approx([1.05, 7.9 / 8.0])
    assert h["worst_part_ratio"] == pytest.approx(1.05)
    # the same table with a looser delta: every part within 6 % -> accepted
    loose = run_search(_PartsEvaluator(EvalCache(None), 2, TABLE, BAD), MACS, 0.06, start=8, progress=False)
    assert loose.best["gate_up"] == 7


def test_nan_part_is_rejected():
    from llm_compile.anda_cli import part_scores, run_search
    from llm_compile.anda_eval import EvalCache

    s = part_scores([4.0, float("nan")], REF_PARTS)
    assert math.isnan(s["worst_part_ratio"])
    table = {(8, 8, 8, 8): (6.0, [4.0, 8.0]), (8, 8, 7, 8): (6.0, [float("nan"), 8.0])}
    r = run_search(_PartsEvaluator(EvalCache(None), 2, table, BAD), MACS, 0.01, start=8, progress=False)
    assert r.best == dict.fromkeys(KINDS, 8)


def test_cache_settings_differ_by_parts_and_split(tmp_path):
    from llm_compile.anda_eval import EvalCache

    path = tmp_path / "c.json"
    e1 = _PartsEvaluator(EvalCache(path), 1, TABLE, BAD, split="calibration")
    # K = 1: the setting string is exactly the one used before --calib-parts existed
    assert e1.setting == json.dumps({"split": "calibration", "tokens": 256, "context": 256,
                                     "stride": 256, "kernel": "reference"}, sort_keys=True)
    e1(dict.fromkeys(KINDS, 8))
    e2 = _PartsEvaluator(EvalCache(path), 2, TABLE, BAD, split="calibration")
    e2(dict.fromkeys(KINDS, 8))
    assert e2.misses == 1 and e2.hits == 0 and e2.last["parts"] == [4.0, 8.0]  # no stale K=1 hit
    e3 = _PartsEvaluator(EvalCache(path), 2, TABLE, BAD, split="calibration-wide")
    e3(dict.fromkeys(KINDS, 8))
    assert e3.misses == 1 and e3.hits == 0
    e4 = _PartsEvaluator(EvalCache(path), 2, TABLE, BAD, split="calibration-wide")
    e4(dict.fromkeys(KINDS, 8))
    assert e4.hits == 1 and e4.last["parts"] == [4.0, 8.0]                   # parts kept in the record
    assert len(json.loads(path.read_text())["settings"]) == 3


@pytest.mark.parametrize("argv, message", [
    (["--calib-parts", "0"], "integer >= 1"),
    (["--calib-parts", "x"], "integer >= 1"),
    (["--calib-split", "evaluation"], "invalid choice"),
    (["--tokens", "256", "--calib-parts", "8"], "at most 4 parts"),
    (["--holdout-tokens", "-1"], "--holdout-tokens"),
])
def test_cli_rejects_bad_calibration_flags(argv, message, capsys):
    from llm_compile.anda_cli import main

    with pytest.raises(SystemExit) as e:
        main(argv + ["--cache", "", "--out", "/nonexistent/never_written.json"])
    assert e.value.code == 2 and message in capsys.readouterr().err


class _HoldoutEvaluator:
    """An Evaluator on held-out tokens: W4A16 ppl 10.0, ``table[widths]`` for the candidates."""

    def __new__(cls, table, default=10.0):
        from llm_compile.anda_eval import EvalCache, Evaluator

        class H(Evaluator):
            seen = []

            def _run(self, w):
                H.seen.append(tuple(w[k] for k in KINDS))
                return table.get(tuple(w[k] for k in KINDS), default), {"lowered": 0}

            def reference(self):
                return self._cached("w4a16", lambda: (10.0, {}))

        return H(None, torch.zeros(1, 256, dtype=torch.long), context=256, cache=EvalCache(None),
                 setting={"split": "holdout"})


# calibration: (8,8,8,8) and both one-step tuples below are within 1 % (whole split); lowering
# gate_up is the cheapest step. Held out: gate_up 7 costs +3 % (rejected, so never expanded),
# o 7 costs +0.5 % (accepted).
CAL = {(8, 8, 8, 8): (6.0, [4.0, 8.0]), (8, 8, 7, 8): (6.03, [4.0, 8.0]),
       (8, 7, 8, 8): (6.05, [4.0, 8.0])}
HELD = {(8, 8, 7, 8): 10.3, (8, 7, 8, 8): 10.05}


def test_holdout_check_rejects_what_calibration_accepts(tmp_path):
    from llm_compile.anda_cli import run_search
    from llm_compile.anda_eval import EvalCache

    plain = run_search(_PartsEvaluator(EvalCache(None), 1, CAL, BAD), MACS, 0.01, start=8, progress=False)
    assert plain.best["gate_up"] == 7                                         # without the check
    assert plain.holdout_reference is None and plain.holdout_evaluations == 0

    hv = _HoldoutEvaluator(HELD)
    res = run_search(_PartsEvaluator(EvalCache(None), 1, CAL, BAD), MACS, 0.01, start=8, progress=False,
                     holdout=hv)
    assert res.feasible and res.best == {"qkv": 8, "o": 7, "gate_up": 8, "down": 8}
    assert res.holdout_reference == 10.0
    by = {tuple(h["widths"][k] for k in KINDS): h for h in res.history}
    g = by[(8, 8, 7, 8)]
    assert not g["accepted"] and g["holdout_ppl"] == 10.3 and g["holdout_ratio"] == pytest.approx(1.03)
    assert by[(8, 7, 8, 8)]["accepted"] and by[(8, 7, 8, 8)]["holdout_ratio"] == pytest.approx(1.005)
    # (8, 8, 7, 8) was not expanded: gate_up never went to 6 (the plain search's queue has it)
    assert not any(t[2] < 7 for t in by) and any(h["widths"]["gate_up"] < 7 for h in plain.history)
    # only the calibration-accepted candidates (the start included) are measured held out
    assert sorted(hv.seen) == sorted({(8, 8, 8, 8), (8, 8, 7, 8), (8, 7, 8, 8)})
    assert res.holdout_evaluations == sum("holdout_ppl" in h for h in res.history)
    assert all(("holdout_ppl" in h) == (h["ppl"] <= 6.06) for h in res.history)


def test_holdout_check_with_the_per_part_rule():
    from llm_compile.anda_cli import run_search
    from llm_compile.anda_eval import EvalCache

    # the per-part rule rejects gate_up 7 (part 0 +5 %): it is never measured held out
    table = {(8, 8, 8, 8): (6.0, [4.0, 8.0]), (8, 8, 7, 8): (6.0, [4.2, 7.9]),
             (8, 7, 8, 8): (6.0, [4.0, 8.0])}
    hv = _HoldoutEvaluator({(8, 7, 8, 8): 10.2})
    res = run_search(_PartsEvaluator(EvalCache(None), 2, table, BAD), MACS, 0.01, start=8, progress=False,
                     holdout=hv)
    assert res.best == dict.fromkeys(KINDS, 8)
    assert (8, 8, 7, 8) not in hv.seen and (8, 7, 8, 8) in hv.seen
    o7 = next(h for h in res.history if h["widths"]["o"] == 7)
    assert not o7["accepted"] and o7["holdout_ratio"] == pytest.approx(1.02)
