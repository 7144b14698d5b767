"""Small random-weight transformers models of real architectures, for tests."""
from __future__ import annotations

import torch

VOCAB = 128


def build(family: str, attn_implementation: str = "sdpa", layers: int = 2, seed: int = 0,
          kv_heads: int | None = None):
    """A tiny ``family`` causal LM (llama, mistral, qwen2, opt, gpt2) in eval mode, fp32;
    ``kv_heads`` overrides llama's 2 KV heads (4: multi-head attention)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, attn_implementation=attn_implementation)
    if family == "llama":
        cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=kv_heads or 2, max_position_embeddings=512,
                             **common)
        cls = tf.LlamaForCausalLM
    elif family == "mistral":
        cfg = tf.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                               num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
                               sliding_window=None, **common)
        cls = tf.MistralForCausalLM
    elif family == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **common)
        cls = tf.Qwen2ForCausalLM
    elif family == "opt":
        cfg = tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=layers, num_attention_heads=4,
                           max_position_embeddings=512, word_embed_proj_dim=64, **common)
        cls = tf.OPTForCausalLM
    elif family == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=512, **common)
        cls = tf.GPT2LMHeadModel
    else:
        raise ValueError(f"unknown family {family}")
    torch.manual_seed(seed)
    return cls(cfg).eval()


FAMILIES = ["llama", "mistral", "qwen2", "opt", "gpt2"]
