"""GGUF import: the file's integers land in QuantLinear; logits equal transformers' dequantized load."""
import os

import numpy as np
import pytest
import torch

import llm_compile
from llm_compile.checkpoints.gguf_import import gguf_blocks_to_quant
from llm_compile.quantize import QuantLinear, dequantize_weight

gguf = pytest.importorskip("gguf")


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_blocks_dequantize_like_gguf_py(qtype):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((24, 160)) + 0.2).astype(np.float32)
    t = gguf.GGMLQuantizationType[qtype]
    raw = gguf.quants.quantize(w, t)
    want = torch.from_numpy(gguf.quants.dequantize(raw, t).reshape(24, 160))
    q, s, m, bits = gguf_blocks_to_quant(raw, qtype)
    assert bits == (8 if qtype == "Q8_0" else 4) and s.dtype == torch.float16 and s.shape == (24, 5)
    assert (m is None) == (qtype != "Q4_1")
    got = dequantize_weight(q, s, bits, 32, mins=m)
    assert torch.equal(got, want)                     # bit for bit, not just close
    if qtype == "Q4_0":     # element 1 of a block sits in the low nibble of byte 1 in GGUF, byte 0 here
        assert q[0, 0] & 0xF == raw[0, 2] & 0xF and q[0, 0] >> 4 == raw[0, 3] & 0xF


def _write_tiny_gguf(path, model, types):
    """The tiny Llama as GGUF (llama.cpp's tensor names and q/k row permutation)."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None)
                         else cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)

    def permute(x, heads):      # llama.cpp convert_hf_to_gguf: permute
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    i = 0
    for layer in range(cfg.num_hidden_layers):
        pre = f"model.layers.{layer}."
        w.add_tensor(f"blk.{layer}.attn_norm.weight", sd[pre + "input_layernorm.weight"])
        w.add_tensor(f"blk.{layer}.ffn_norm.weight", sd[pre + "post_attention_layernorm.weight"])
        for hf, g in names.items():
            x = sd[pre + hf + ".weight"]
            if g == "attn_q":
                x = permute(x, cfg.num_attention_heads)
            elif g == "attn_k":
                x = permute(x, cfg.num_key_value_heads)
            t = gguf.GGMLQuantizationType[types[i % len(types)]]
            i += 1
            w.add_tensor(f"blk.{layer}.{g}.weight", gguf.quants.quantize(x, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("types", [("Q4_0",), ("Q4_1",), ("Q8_0",), ("Q4_1", "Q8_0", "Q4_0")])
def test_tiny_gguf_logits_equal_transformers(tmp_path, types):
    from checkpoints.tiny_models import tiny_llama
    from transformers import AutoModelForCausalLM

    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, tiny_llama(), types)
    ours = llm_compile.load_quantized(path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    qls = [m for m in ours.modules() if isinstance(m, QuantLinear)]
    assert len(qls) == 14 and len(ours.llmaccel_quantized) == 14
    assert {("Q8_0" if m.bits == 8 else "Q4_0" if m.symmetric else "Q4_1") for m in qls} == set(types)
    sd = ref.state_dict()
    for name in ours.llmaccel_quantized:     # q/k included: the row permutation followed the integers
        assert torch.equal(ours.get_submodule(name).dequantized_weight(), sd[name + ".weight"]), name
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_not_a_gguf_file_is_refused(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"NOPE" * 8)
    with pytest.raises(ValueError, match="not a GGUF file"):
        llm_compile.load_quantized(p)
    with pytest.raises(ValueError, match="neither a save_quantized folder"):
        llm_compile.load_quantized(tmp_path)


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_gguf_lossless():
    """The shipped SmolLM2 Q4_1 GGUF: W4A16 logits equal the GGUF model dequantized by transformers."""
    from llm_compile.eval.model import GGUF_FILE, gguf_folder, load_smollm2

    ours = llm_compile.load_quantized(os.path.join(gguf_folder(), GGUF_FILE))
    ref, _ = load_smollm2()
    assert len(ours.llmaccel_quantized) == 210 and not ours.llmaccel_float_linears
    q = ours.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and not q.symmetric and q.group_size == 32 and q.bits == 4
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_tiny_gguf_compiles_with_anda(tmp_path):
    """fp16 scales/minima, group 32, all three types: every linear is lowered (matches the eager op)."""
    from checkpoints.tiny_models import anda_compile_matches_eager_op, tiny_llama

    _write_tiny_gguf(tmp_path / "tiny.gguf", tiny_llama(), ("Q4_1", "Q8_0", "Q4_0"))
    anda_compile_matches_eager_op(llm_compile.load_quantized(tmp_path / "tiny.gguf"))
