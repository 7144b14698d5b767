"""Offload keeps worker-side KV per sequence: two caches of one compiled model, interleaved step by
step, each give eager's greedy tokens; a sequence's KV is freed when its cache is collected."""
from __future__ import annotations

import gc

import pytest
import torch
from transformers import DynamicCache

from model_zoo import build
from llm_compile.config import parse_options
from llm_compile.ops.offload import is_phantom
from llm_compile.runtime.offload import get_pool
from llm_compile.runtime.offload.sequences import sequence_of

OPTIONS = {"offload": {"workers": 2, "timeout_s": 60}}
STEPS = 4


pytestmark = pytest.mark.usefixtures("offload_pools_shut_down")


def _prompts():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 128, (1, 6), generator=g), torch.randint(0, 128, (1, 6), generator=g)


def _greedy_alone(model, ids):
    cache = DynamicCache()
    toks = []
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True).logits
        for _ in range(STEPS):
            tok = logits[:, -1:].argmax(-1)
            toks.append(int(tok))
            logits = model(tok, past_key_values=cache, use_cache=True).logits
    return toks


def _interleaved(model, ids_a, ids_b):
    caches = [DynamicCache(), DynamicCache()]
    toks: list[list[int]] = [[], []]
    with torch.no_grad():
        logits = [model(ids, past_key_values=c, use_cache=True).logits for ids, c in zip((ids_a, ids_b), caches)]
        for _ in range(STEPS):
            for i in (0, 1):  # A's step, then B's: each must see only its own KV
                tok = logits[i][:, -1:].argmax(-1)
                toks[i].append(int(tok))
                logits[i] = model(tok, past_key_values=caches[i], use_cache=True).logits
    return toks, caches


@pytest.mark.parametrize("inner", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_two_caches_interleaved_each_equal_eager(inner):
    model = build("llama")
    ids_a, ids_b = _prompts()  # same length: a shared KV would go unnoticed by the length check
    ref_a, ref_b = _greedy_alone(model, ids_a), _greedy_alone(model, ids_b)
    assert ref_a != ref_b, "the two prompts must continue differently, else the test proves nothing"
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="llmaccel", options={**OPTIONS, "inner": inner})
    try:
        (got_a, got_b), caches = _interleaved(model, ids_a, ids_b)
        assert got_a == ref_a and got_b == ref_b
        seqs = []
        for c in caches:  # each cache holds phantoms naming its own sequence
            ids = {sequence_of(layer.keys) for layer in c.layers} | {sequence_of(layer.values) for layer in c.layers}
            assert all(is_phantom(layer.keys) for layer in c.layers) and len(ids) == 1 and None not in ids
            seqs.append(ids.pop())
        assert seqs[0] != seqs[1]
        pool = get_pool(parse_options(OPTIONS).offload)
        pool.flush_releases()
        n = 6 + STEPS
        per_seq = 2 * 1 * 2 * n * 16 * 2 * 4  # layers * batch * KV heads * tokens * D * (k, v) * fp32
        total = sum(pool.kv_bytes())
        assert total >= 2 * per_seq
        del caches, c
        gc.collect()
        assert pool.flush_releases() == 2 * 2 * 2  # two sequences x 2 layers x 2 workers
        assert sum(pool.kv_bytes()) == total - 2 * per_seq
    finally:
        del model.forward
        torch._dynamo.reset()


def test_generate_releases_its_sequence_and_a_foreign_cache_is_refused():
    model = build("llama")
    ids_a, ids_b = _prompts()
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="llmaccel", options={**OPTIONS, "inner": "eager"})
    try:
        pool = get_pool(parse_options(OPTIONS).offload)
        pool.flush_releases()
        before = sum(pool.kv_bytes())
        with torch.no_grad():
            out = model.generate(ids_a, attention_mask=torch.ones_like(ids_a), max_new_tokens=3,
                                 do_sample=False, return_dict_in_generate=True)
        assert sum(pool.kv_bytes()) > before  # the returned cache keeps the sequence alive
        del out
        gc.collect()
        pool.flush_releases()
        assert sum(pool.kv_bytes()) == before
        # a phantom that names no sequence (not made by this model's prefill) is an error, not zeros
        cache = DynamicCache()
        with torch.no_grad():
            model(ids_b, past_key_values=cache, use_cache=True)
        layer = cache.layers[0]
        layer.keys = torch.ops.llmaccel.kv_phantom(None, torch.zeros(layer.keys.shape))
        layer.values = torch.ops.llmaccel.kv_phantom(None, torch.zeros(layer.values.shape))
        with torch.no_grad(), pytest.raises(Exception, match="names no offload sequence"):
            model(ids_b[:, :1], past_key_values=cache, use_cache=True)
    finally:
        del model.forward
        torch._dynamo.reset()
