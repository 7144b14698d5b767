"""Tiny Llama configs shared by the checkpoint tests."""
import torch


def tiny_llama(seed: int = 0, tie: bool = True, vocab: int = 96):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=tie,
                      max_position_embeddings=256)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def anda_compile_matches_eager_op(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Compile ``model`` (a tiny loaded quantized Llama) with Anda (reference kernel): every one of
    its 14 quantized linears runs the op, and the compiled logits equal the eager op's. Returns
    ``(compiled logits, plain logits)``."""
    import llm_compile  # noqa: F401  (backend registration)
    from llm_compile.anda_eval import anda_eager

    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(2))
    widths = {"qkv": 6, "o": 7, "gate_up": 5, "down": 8}
    with torch.no_grad(), anda_eager(model, widths) as n:
        want = model(ids, use_cache=False).logits
    assert n == 14
    fwd = torch.compile(model.forward, backend="llmaccel",
                        options={"anda": {"mantissa_bits": widths, "kernel": "reference"}, "inner": "eager"})
    with torch.no_grad():
        got = fwd(ids, use_cache=False).logits
        plain = model(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    return got, plain
