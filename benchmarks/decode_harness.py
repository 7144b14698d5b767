"""What the CPU decode benchmarks share (``bench_swa.py``, ``swa_short_bench.py``,
``bench_decode_matmul.py``): SmolLM2's shapes as a random-weight config, a compiled model with its
own cache that prefills once and then decodes in timed blocks, the top ATen ops of a profile, a median."""
from __future__ import annotations

import time

import torch


def smollm2_config(layers: int):
    import transformers

    return transformers.LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=65536,
        rope_theta=100000.0, tie_word_embeddings=True)


def _top_ops(prof, steps: int, n: int = 6) -> list[dict]:
    """The ``n`` ATen ops with the most self CPU time, in ms per decode step."""
    ev = sorted((e for e in prof.key_averages() if e.key.startswith("aten::")),
                key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [{"op": e.key, "ms_per_step": e.self_cpu_time_total / 1e3 / steps, "calls": e.count}
            for e in ev]


CACHE_KINDS = ("dynamic", "llmaccel", "static")
"""HF ``DynamicCache``, :class:`llm_compile.LLMAccelCache`, HF ``StaticCache`` (``--static-len``)."""


def _new_cache(kind: str, model, max_len: int):
    from transformers import DynamicCache, StaticCache

    from llm_compile import LLMAccelCache

    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=max_len)
    return LLMAccelCache() if kind == "llmaccel" else DynamicCache()


class Decoder:
    """One compiled model with its own cache: prefill once, then decode in timed blocks (so the
    configs of a run can be interleaved block by block on the same machine state)."""

    def __init__(self, model, ids, backend: str, options: dict | None, cache: str, max_len: int,
                 fwd=None):
        kw = {"options": options} if backend == "llmaccel" else {}
        self.fwd = fwd if fwd is not None else torch.compile(model.forward, backend=backend, **kw)
        self.cache = _new_cache(cache, model, max_len)
        self.L = ids.shape[1]
        self.batch = ids.shape[0]
        with torch.no_grad():
            t0 = time.perf_counter()
            out = self.fwd(input_ids=ids, past_key_values=self.cache, use_cache=True,
                           cache_position=torch.arange(self.L))
            self.prefill_s = time.perf_counter() - t0
        self.tok = out.logits[:, -1:].argmax(-1)

    def step(self) -> float:
        with torch.no_grad():
            t0 = time.perf_counter()
            out = self.fwd(input_ids=self.tok, past_key_values=self.cache, use_cache=True,
                           cache_position=torch.tensor([self.L]))
            self.tok = out.logits[:, -1:].argmax(-1)
            dt = time.perf_counter() - t0
        self.L += 1
        return dt

    def block(self, steps: int) -> float:
        """Median seconds per step over ``steps`` decode steps."""
        ts = sorted(self.step() for _ in range(steps))
        return ts[len(ts) // 2]

    def profile(self, steps: int) -> list[dict]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                self.step()
        return _top_ops(prof, steps)


def _median(v: list[float]) -> float:
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
