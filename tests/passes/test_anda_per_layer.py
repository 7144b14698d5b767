"""Per-layer ``anda.mantissa_bits`` (issue 16, item 4): each lowered linear of a compiled Llama gets
the width of its kind *in its layer*; a list without an entry for a layer leaves that layer's
linears unlowered, with the reason (structural, plus numbers against the eager per-layer widths)."""
import warnings

import pytest
import torch

from helpers import pass_record, record_compiles
from llm_compile.anda_widths import ANDA_MODULE_KINDS as KINDS, bits_for

LAYERS = 3
MB = [dict(zip(KINDS, (9, 5, 6, 8))), 4, dict(zip(KINDS, (3, 12, 2, 16)))]


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from llm_compile.quantize import quantize_weights

    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    torch.manual_seed(0)
    return quantize_weights(LlamaForCausalLM(cfg).eval(), bits=4, group_size=64)


def _compile(model, mb):
    torch._dynamo.reset()
    return torch.compile(model.forward, backend="llmaccel",
                         options={"anda": {"mantissa_bits": mb, "kernel": "reference"}, "inner": "eager"})


@pytest.fixture(scope="module")
def model_ids():
    return _llama(), torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))


def test_per_layer_widths_reach_their_layers(model_ids):
    from llm_compile.anda_eval import anda_eager

    model, ids = model_ids
    with torch.no_grad(), record_compiles() as recs:
        got = _compile(model, MB)(ids, use_cache=False).logits
    rec = pass_record(recs[0], "anda_lowering")
    assert len(recs) == 1 and not rec["skipped"] and len(rec["matched"]) == 7 * LAYERS
    by_layer = {}
    for m in rec["matched"]:
        assert m["mantissa_bits"] == bits_for(MB, m["kind"], m["layer"]), m
        by_layer.setdefault(m["layer"], []).append(m["kind"])
    assert sorted(by_layer) == list(range(LAYERS))
    assert all(sorted(v) == sorted(["qkv"] * 3 + ["o"] + ["gate_up"] * 2 + ["down"]) for v in by_layer.values())
    # numbers: the compiled graph computes what the eager model does with the same per-layer widths
    # (and not what one width per kind gives)
    with torch.no_grad():
        with anda_eager(model, MB):
            eager = model(ids, use_cache=False).logits
        with anda_eager(model, MB[0]):
            per_kind = model(ids, use_cache=False).logits
    torch.testing.assert_close(got, eager, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(got, per_kind, rtol=1e-3, atol=1e-3)


def test_short_list_leaves_missing_layers_unlowered_with_reason(model_ids):
    from llm_compile.passes.manager import PassNotAppliedWarning

    model, ids = model_ids
    with torch.no_grad(), record_compiles() as recs, warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _compile(model, MB[:2])(ids, use_cache=False)
    rec = pass_record(recs[0], "anda_lowering")
    assert {m["layer"] for m in rec["matched"]} == {0, 1} and len(rec["matched"]) == 14
    assert len(rec["skipped"]) == 7
    assert all(s["reason"].startswith("anda.mantissa_bits lists 2 layers (give one entry per decoder layer)")
               and "layers.2." in s["reason"] and "(layer '2')" in s["reason"] for s in rec["skipped"])
    # a configuration error: warned although other linears were lowered, once for the 7 linears
    assert sum(issubclass(x.category, PassNotAppliedWarning) and "lists 2 layers" in str(x.message)
               for x in w) == 1
