"""save_quantized / load_quantized round trip; plain from_pretrained refuses; compiled with Anda."""
import os

import pytest
import torch

import llm_compile
from checkpoints.tiny_models import tiny_llama
from llm_compile.quantize import QuantLinear, quantize_weights


def _quantized(symmetric, bits=4, group=32, tie=True):
    return quantize_weights(tiny_llama(seed=5, tie=tie), bits=bits, group_size=group, symmetric=symmetric)


@pytest.mark.parametrize("symmetric,bits,group,tie", [(False, 4, 32, True), (True, 8, 64, False),
                                                      (True, 4, 128, True)])
def test_round_trip_bit_for_bit(tmp_path, symmetric, bits, group, tie):
    model = _quantized(symmetric, bits, group, tie)
    with torch.no_grad():      # fp16 scales/minima survive too
        model.model.layers[0].mlp.down_proj = QuantLinear.from_linear(
            torch.nn.Linear(256, 128, bias=False), bits, group, torch.float16, symmetric)
    llm_compile.save_quantized(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "llmaccel_model.safetensors", "llmaccel_quantized.json"]
    back = llm_compile.load_quantized(tmp_path)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert back.model.layers[0].mlp.down_proj.scales.dtype == torch.float16
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == tie
    assert sorted(back.llmaccel_quantized) == sorted(n for n, m in model.named_modules() if isinstance(m, QuantLinear))
    ids = torch.randint(0, 96, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_from_pretrained_refuses(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    from transformers.quantizers import auto

    llm_compile.save_quantized(_quantized(False), tmp_path)
    for cls in (AutoModelForCausalLM, LlamaForCausalLM):
        with pytest.raises(ValueError, match=r"llm_compile\.load_quantized"):
            cls.from_pretrained(tmp_path)
    # without llm_compile's registration (a process that never imported it): still no random weights
    monkeypatch.delitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "llmaccel")
    monkeypatch.delitem(auto.AUTO_QUANTIZER_MAPPING, "llmaccel")
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_save_refuses_float_model(tmp_path):
    with pytest.raises(ValueError, match="no QuantLinear"):
        llm_compile.save_quantized(tiny_llama(), tmp_path)


def test_loaded_model_compiles_with_anda(tmp_path):
    from checkpoints.tiny_models import anda_compile_matches_eager_op

    llm_compile.save_quantized(_quantized(False, 4, 64), tmp_path)
    got, plain = anda_compile_matches_eager_op(llm_compile.load_quantized(tmp_path))
    assert not torch.allclose(got, plain, rtol=1e-4, atol=1e-4)      # Anda really ran
