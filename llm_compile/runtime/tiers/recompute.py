"""Phase 3's recompute (ALISA §V): K and V of a token recomputed from what is kept instead of them —
the layer's attention input ``x`` (``hidden`` values) and, for rotary models, that token's ``cos``
and ``sin`` rows (``D`` values each, exactly the ones the model used, so every RoPE variant is
recomputed as it ran) — when a step selects the token.

Everything comes from the compiled graph as op inputs, nothing from the model object: the pass
``local_kv_store`` (:mod:`llm_compile.passes.recompute_inputs`) finds, per attention site, the
projection that feeds the new K and V and passes to ``llmaccel::stored_attention`` a tensor list
``rec`` and a JSON ``spec``::

    rec  = [x2d, w_k, b_k?, w_v, b_v?, cos?, sin?]        x2d [B*T, hidden]; w [hidden, out] (x @ w)
    spec = {"hidden": 64, "k": [1, 2, 64, 128], "v": [1, 2, 128, 192], "rope": null}
           # per K/V: index of w, index of the bias (-1: none), first and last column of the slice
           # (and a 5th entry 1 when w is stored [out, hidden]: decode_matmul's weight-major form)

    K = rope((x @ w_k[:, c0:c1] + b_k[c0:c1]).view(Hkv, D), cos, sin)     # rope: k*cos + rotate_half(k)*sin
    V = (x @ w_v[:, c0:c1] + b_v[c0:c1]).view(Hkv, Dv)

Supported (the pass refuses others by name): a K/V projection ``mm``/``addmm`` followed by
views/permutes and a column split or slice (GPT-2's fused ``c_attn``, OPT, Llama-family ``k_proj`` /
``v_proj``), optionally followed, for K, by Llama-style RoPE with ``rotate_half``. A kept row
holds ``hidden (+ 2 * D with RoPE)`` values; recompute frees memory only where that is less than
K+V (``Hkv * (D + Dv)``): multi-head attention, not GQA (:mod:`~llm_compile.runtime.tiers.plan`).
The first call of each spec (prefill, decode graph) recomputes its own tokens and compares them
with the model's K/V (a graph the pass mis-read is an error, never a wrong answer).
"""
from __future__ import annotations

import json

import torch
from torch import Tensor

SUPPORTED = ("K/V from a linear projection (mm/addmm, with or without bias; a fused QKV weight split "
             "by columns as in GPT-2), reshaped to heads, and for K optionally Llama-style RoPE "
             "(k*cos + rotate_half(k)*sin): GPT-2, OPT, Llama, Mistral, Qwen2 with as many KV heads as "
             "query heads")


class RecomputeError(RuntimeError):
    """The inputs a graph passed do not reproduce the site's K/V."""


def _rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def kept_width(spec: dict, d: int) -> int:
    """Values kept per token and sequence."""
    return spec["hidden"] + (2 * d if spec.get("rope") else 0)


class KVRecompute:
    """One call's recompute inputs: ``rec`` and ``spec`` as the op received them (the weights are
    the graph's own inputs of this step, never held past the cache's next call)."""

    def __init__(self, spec: str | dict, rec: list[Tensor], heads: int, d: int, dv: int) -> None:
        self.spec = json.loads(spec) if isinstance(spec, str) else spec
        self.rec, self.heads, self.d, self.dv = rec, heads, d, dv
        self.hidden = self.spec["hidden"]
        self.width = kept_width(self.spec, d)

    def kept(self, batch: int) -> Tensor:
        """The rows to keep for this call's tokens: ``[T, B, width]`` (x, then cos and sin)."""
        x = self.rec[0].reshape(batch, -1, self.hidden)
        parts = [x]
        if self.spec.get("rope"):
            ci, si = self.spec["rope"]
            T = x.shape[1]
            for t in (self.rec[ci], self.rec[si]):
                parts.append(t.reshape(t.shape[0], T, self.d).expand(batch, T, self.d).to(x.dtype))
        return torch.cat(parts, -1).transpose(0, 1)

    def drop_activations(self) -> None:
        """Keep only the weights (the store holds this object until the next call)."""
        used = {self.spec[w][i] for w in ("k", "v") for i in (0, 1)}
        self.rec = [t if i in used else None for i, t in enumerate(self.rec)]

    def _proj(self, x: Tensor, which: str) -> Tensor:
        wi, bi, c0, c1, *wt = self.spec[which]
        w = self.rec[wi].t() if wt and wt[0] else self.rec[wi]
        y = x @ w[:, c0:c1].to(x.dtype)
        if bi >= 0:
            y = y + self.rec[bi].reshape(-1)[c0:c1].to(x.dtype)
        return y

    @torch.no_grad()
    def kv(self, rows: Tensor) -> Tensor:
        """``rows`` [U, width] (kept rows) -> K and V together, ``[U, Hkv, D + Dv]``."""
        U = rows.shape[0]
        x = rows[:, : self.hidden]
        k = self._proj(x, "k").view(U, self.heads, self.d)
        v = self._proj(x, "v").view(U, self.heads, self.dv)
        if self.spec.get("rope"):
            h, D = self.hidden, self.d
            cos, sin = rows[:, None, h: h + D], rows[:, None, h + D: h + 2 * D]
            k = k * cos + _rotate_half(k) * sin
        return torch.cat([k, v.to(k.dtype)], -1)

    def check(self, kept: Tensor, k: Tensor, v: Tensor, site) -> None:
        """Raise unless recomputing ``kept`` [T, B, width] gives ``k``/``v`` [B, Hkv, T, D]."""
        T, B = kept.shape[:2]
        got = self.kv(kept.reshape(T * B, -1)).view(T, B, self.heads, -1).permute(1, 2, 0, 3)
        want = torch.cat([k, v.to(k.dtype)], -1)
        err = float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))
        if not err < 1e-2:
            raise RecomputeError(
                f"llmaccel kv_tiers: site {site}: K/V recomputed from the layer input the graph passed "
                f"differ from the model's (relative error {err:.3g}): this attention is not of a supported "
                f"form ({SUPPORTED}); use kv_tiers.beta=0 or recompute='off'")
