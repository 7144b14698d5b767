"""Phase 3's recompute path for Llama-family attention (Llama, Mistral, Qwen2, SmolLM2): the K and V
of tokens whose KV is not kept, recomputed from what is kept instead — the layer's attention input
(the hidden state after ``input_layernorm``), ``hidden`` values per token::

    rec = LlamaKVRecompute(model.model.layers[i].self_attn, model.model.rotary_emb)
    tier = RecomputeRows(rec)
    tier.keep(x, positions)                      # x [B, T, hidden], positions [T]
    k, v = tier.kv(slots)                        # [B, Hkv, P, D]: k_proj/v_proj + RoPE at their positions

It equals the K/V the model computed (``tests/runtime/test_kv_tiers.py``). It frees memory only
where ``hidden < Hkv * (D + Dv)`` (MHA; :mod:`~llm_compile.runtime.tiers.plan` decides, and says so).

**Not wired into compiled graphs**: ``llmaccel::stored_attention`` receives q/k/v, not the layer
input, the projection weights or the rotary tables, so the compiled store cannot use this yet
(the plan keeps ``beta = 0`` and says why). Wiring it needs the ``local_kv_store`` pass to pass
the ``k_proj``/``v_proj`` input node and weights to the op.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class LlamaKVRecompute:
    """K/V from a Llama attention module's input: ``k_proj``/``v_proj`` (with bias if any), then
    RoPE at the tokens' positions from the model's rotary embedding."""

    def __init__(self, attn, rotary) -> None:
        self.attn, self.rotary = attn, rotary
        self.d = attn.head_dim
        self.heads = attn.k_proj.out_features // self.d

    @torch.no_grad()
    def kv(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` [B, P, hidden], ``positions`` [P] or [B, P] -> K, V [B, Hkv, P, D]."""
        B, P, _ = x.shape
        k = self.attn.k_proj(x).view(B, P, self.heads, self.d).transpose(1, 2)
        v = self.attn.v_proj(x).view(B, P, self.heads, -1).transpose(1, 2)
        pos = positions.expand(B, P) if positions.dim() == 1 else positions
        cos, sin = self.rotary(v, pos)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return k * cos + _rotate_half(k) * sin, v

    def kept_values_per_token(self) -> int:
        return self.attn.k_proj.in_features

    def kv_values_per_token(self) -> int:
        return self.attn.k_proj.out_features + self.attn.v_proj.out_features


class RecomputeRows:
    """The recompute tier: per slot the layer input and position of a token; K/V on demand."""

    def __init__(self, rec: LlamaKVRecompute) -> None:
        self.rec = rec
        self.x: Tensor | None = None
        self.pos: Tensor | None = None

    def keep(self, x: Tensor, positions: Tensor) -> int:
        """Keep ``x`` [B, T, hidden] of tokens at ``positions`` [T]; returns their first slot."""
        first = 0 if self.x is None else self.x.shape[1]
        self.x = x.clone() if self.x is None else torch.cat([self.x, x], 1)
        self.pos = positions.clone() if self.pos is None else torch.cat([self.pos, positions])
        return first

    def kv(self, slots: Tensor) -> tuple[Tensor, Tensor]:
        """K, V [B, Hkv, P, D] of the tokens kept in ``slots`` [P], recomputed."""
        return self.rec.kv(self.x[:, slots], self.pos[slots])

    def nbytes(self) -> int:
        return 0 if self.x is None else self.x.nbytes
