"""Attention offload on the real SmolLM2-135M-Instruct (30 layers, 9 heads, 3 KV heads), offline:
greedy tokens equal the local model's, the KV cache lives only in the two workers (2 + 1 KV heads)
and the model's ``DynamicCache`` holds phantoms; with ``inner="eager"`` and ``"inductor"``.

Compile time dominates (Dynamo + AOTAutograd over 30 layers, three graphs: prefill, first decode,
decode with a symbolic cache length): on 2 busy cores the eager case takes ~2 min and the
Inductor case ~7 min cold, so the Inductor case is also marked ``slow`` (run it with
``-m real_model``); Inductor's FX graph cache makes later runs faster.
"""
from __future__ import annotations

import pytest
import torch

from helpers import pass_record, record_compiles
from llm_compile.config import parse_options
from llm_compile.ops.offload import is_phantom
from llm_compile.runtime.offload import get_pool, shutdown_pools
from llm_compile.runtime.offload.sequences import sequence_of

pytestmark = pytest.mark.real_model

NEW = 4  # prefill + first decode + symbolic decode graph (used twice)
LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64


@pytest.fixture(scope="module")
def smollm2():
    from llm_compile.eval.model import load_smollm2

    model, tok = load_smollm2()
    ids = tok("For God so loved the world, that he gave his one and only Son,", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=NEW, do_sample=False)
    yield model, ids, ref
    shutdown_pools()
    assert not torch.multiprocessing.active_children()


@pytest.mark.slow  # ~5 min on 2 cores (CI budget); the tiny-model offload tests cover the same paths
@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_smollm2_offload_same_tokens_kv_only_in_workers(smollm2, inner):
    model, ids, ref = smollm2
    opts = {"offload": {"workers": 2, "timeout_s": 60}, "inner": inner}
    model.forward = torch.compile(model.forward, backend="llmaccel", options=opts)
    try:
        with torch.no_grad(), record_compiles() as rec:
            out = model.generate(ids, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
    finally:
        del model.forward
    assert out.sequences.tolist() == ref.tolist()
    records = [pass_record(r, "attention_offload") for r in rec]
    assert len(records) == 3 and all(r["changed"] and "error" not in r for r in records)
    assert all(len(r["matched"]) == LAYERS for r in records)
    n = ids.shape[1] + NEW - 1
    cache = out.past_key_values
    assert cache.get_seq_length() == n and len(cache.layers) == LAYERS
    for layer in cache.layers:  # no KV on the compute side: 16-byte phantoms (the sequence id)
        assert layer.keys.shape == (1, KV_HEADS, n, HEAD_DIM) and is_phantom(layer.keys)
        assert is_phantom(layer.values) and layer.keys.untyped_storage().nbytes() == 16
        assert sequence_of(layer.keys) == sequence_of(cache.layers[0].values) is not None
    per_head = LAYERS * 1 * n * HEAD_DIM * 2 * 4  # layers * batch * tokens * D * (k, v) * fp32
    pool = get_pool(parse_options(opts).offload)
    assert pool.kv_bytes() == [2 * per_head, 1 * per_head]  # 3 KV heads over 2 workers: 2 + 1
    assert pool.local_bytes() == 0
    shutdown_pools()  # the next case starts from an empty pool
