"""GPTQ import: a checkpoint packed here in GPTQ's layout loads with its exact integers."""
import json

import pytest
import torch
from safetensors.torch import save_file

import llm_compile
from checkpoints.tiny_models import tiny_llama
from llm_compile.quantize import QuantLinear

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _pack(vals: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """GPTQ packing: ``32 / bits`` unsigned values per int32 along ``dim``, low bits first."""
    per = 32 // bits
    v = vals.to(torch.int64)
    if dim == 0:
        v = v.reshape(v.shape[0] // per, per, v.shape[1])
        words = sum(v[:, j, :] << (bits * j) for j in range(per))
    else:
        v = v.reshape(v.shape[0], v.shape[1] // per, per)
        words = sum(v[:, :, j] << (bits * j) for j in range(per))
    return ((words + 2 ** 31) % 2 ** 32 - 2 ** 31).to(torch.int32)     # two's complement int32


def _gptq_rtn(w: torch.Tensor, bits: int, g: int, sym: bool, gen, zero_lo: int = 0):
    """A GPTQ-style quantization (the integers are what matters): u [K, N], zero [K/g, N], s fp16.
    Zero points in ``zero_lo .. zero_lo + 2**bits - 1`` (format "gptq" stores zero - 1: 1..16)."""
    n, k = w.shape
    wg = w.t().reshape(k // g, g, n)
    umax = 2 ** bits - 1
    if sym:
        s = (wg.abs().amax(1) * 2 / umax).to(torch.float16)
        z = torch.full_like(s, 2 ** (bits - 1), dtype=torch.int64)
    else:
        lo, hi = wg.amin(1), wg.amax(1)
        s = ((hi - lo) / umax).to(torch.float16)
        z = torch.randint(zero_lo, zero_lo + umax + 1, s.shape, generator=gen)
    u = torch.randint(0, umax + 1, (k, n), generator=gen)
    return u, z, s


def _write_gptq(folder, model, bits, g, sym, fmt="gptq", desc_act=False):
    gen = torch.Generator().manual_seed(1)
    tensors, exact = {}, {}
    for name, t in model.state_dict().items():
        if not any(name.endswith(lin + ".weight") for lin in LINEARS):
            tensors[name] = t.to(torch.float16).contiguous()
            continue
        prefix = name[: -len(".weight")]
        n, k = t.shape
        u, z, s = _gptq_rtn(t, bits, g, sym, gen, zero_lo=1 if fmt == "gptq" else 0)
        stored_z = z - 1 if fmt == "gptq" else z
        assert stored_z.min() >= 0 and stored_z.max() < 2 ** bits
        tensors[prefix + ".qweight"] = _pack(u, bits, 0)
        tensors[prefix + ".qzeros"] = _pack(stored_z, bits, 1)
        tensors[prefix + ".scales"] = s
        tensors[prefix + ".g_idx"] = (torch.arange(k) // g).to(torch.int32)
        zg = z.repeat_interleave(g, 0).to(torch.float64)
        sg = s.to(torch.float64).repeat_interleave(g, 0)
        exact[prefix] = ((u.to(torch.float64) - zg) * sg).t()          # W[n, k], exact in float64
    tensors.pop("lm_head.weight", None)       # tied
    save_file(tensors, str(folder / "model.safetensors"))
    model.config.save_pretrained(folder)
    with open(folder / "quantize_config.json", "w") as f:
        json.dump({"bits": bits, "group_size": g, "desc_act": desc_act, "sym": sym,
                   "checkpoint_format": fmt}, f)
    return tensors, exact


@pytest.mark.parametrize("bits,g,sym,fmt", [(4, 32, False, "gptq"), (4, 64, True, "gptq"),
                                            (8, 128, False, "gptq_v2"), (8, 64, True, "gptq")])
def test_gptq_lossless(tmp_path, bits, g, sym, fmt):
    float_model = tiny_llama(seed=3)
    tensors, exact = _write_gptq(tmp_path, float_model, bits, g, sym, fmt)
    model = llm_compile.load_quantized(tmp_path)
    assert len(model.llmaccel_quantized) == 14
    for prefix, w in exact.items():
        ql = model.get_submodule(prefix)
        assert isinstance(ql, QuantLinear) and ql.bits == bits and ql.group_size == g
        assert ql.symmetric == sym
        assert torch.equal(ql.dequantized_weight().double(), w.to(torch.float32).double()), prefix
    # the whole model: same logits as a float model holding exactly these weights
    ref = tiny_llama(seed=3)
    with torch.no_grad():
        for name, t in tensors.items():
            if not name.endswith((".qweight", ".qzeros", ".scales", ".g_idx")):
                ref.get_parameter(name).copy_(t.float())
        for prefix, w in exact.items():
            ref.get_submodule(prefix).weight.copy_(w.float())
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_gptq_desc_act_and_bad_configs_refused(tmp_path):
    _write_gptq(tmp_path, tiny_llama(), 4, 64, False, desc_act=True)
    with pytest.raises(ValueError, match="desc_act=True"):
        llm_compile.load_quantized(tmp_path)
    qc = tmp_path / "quantize_config.json"
    qc.write_text(json.dumps({"bits": 3, "group_size": 64, "desc_act": False}))
    with pytest.raises(ValueError, match="bits=3"):
        llm_compile.load_quantized(tmp_path)


def test_gptq_permuted_g_idx_refused(tmp_path):
    from safetensors.torch import load_file

    tensors, _ = _write_gptq(tmp_path, tiny_llama(), 4, 64, False)
    t = load_file(str(tmp_path / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.g_idx"
    t[key] = t[key].flip(0).contiguous()
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="g_idx is not k // 64"):
        llm_compile.load_quantized(tmp_path)


def test_unpack_matches_pack():
    from llm_compile.checkpoints.gptq_import import unpack_gptq_int32

    v = torch.randint(0, 16, (16, 6))
    assert torch.equal(unpack_gptq_int32(_pack(v, 4, 0), 4, 0), v.to(torch.int32))
    assert torch.equal(unpack_gptq_int32(_pack(v.t(), 4, 1), 4, 1), v.t().to(torch.int32))
    v8 = torch.randint(0, 256, (8, 4))
    assert torch.equal(unpack_gptq_int32(_pack(v8, 8, 0), 8, 0), v8.to(torch.int32))
