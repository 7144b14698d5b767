"""``offload.overlap``: two half batches in ping-pong around the offloaded attention calls give the
tokens of the local model; odd and static batches run unsplit (documented fallback)."""
from __future__ import annotations

import pytest
import torch

from model_zoo import build
from helpers import pass_record, record_compiles
from llm_compile.config import parse_options
from llm_compile.ops.offload import is_phantom
from llm_compile.runtime.context import lookup_handle
from llm_compile.runtime.offload.overlap import HALF_KEY
from llm_compile.runtime.offload import get_pool

OPTIONS = {"offload": {"workers": 2, "timeout_s": 30, "overlap": True}, "inner": "eager"}
NEW = 5


pytestmark = pytest.mark.usefixtures("offload_pools_shut_down")


def _llama():
    return build("llama")


def _run(batch: int, dynamic: bool):
    model = _llama()
    ids = torch.randint(0, 128, (batch, 7), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    model.forward = torch.compile(model.forward, backend="llmaccel", options=OPTIONS, dynamic=dynamic or None)
    with torch.no_grad(), record_compiles() as rec:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                             return_dict_in_generate=True)
    records = [r for r in (pass_record(c, "attention_offload") for c in rec) if r and r["matched"]]
    return ref, out, records


@pytest.mark.parametrize("batch", [4, pytest.param(2, marks=pytest.mark.slow)])  # 2: run with -m slow
def test_ping_pong_halves_generate_the_local_tokens(batch):
    pool = get_pool(parse_options(OPTIONS).offload)
    pool.release(-1)  # nothing else in this pool
    ref, out, records = _run(batch, dynamic=True)
    assert torch.equal(out.sequences, ref)
    status = [r["stats"]["overlap"] for r in records]
    # B=2: Dynamo may specialise the batch of a decode graph (it then runs whole, attention per half)
    assert status and (all(s == "applied" for s in status) if batch == 4 else "applied" in status)
    runners = [lookup_handle(r["stats"]["overlap_runner"]) for r in records]
    split = sum(r.split_calls for r in runners)
    assert split == NEW if batch == 4 else split >= 1  # (B=2: Dynamo may specialise a decode graph)
    n = 7 + NEW - 1
    assert all(is_phantom(layer.keys) and layer.keys.shape == (batch, 2, n, 16)
               for layer in out.past_key_values.layers)
    per_worker = 2 * batch * 1 * n * 16 * 2 * 4  # layers * batch * 1 KV head * tokens * D * (k, v) * fp32
    assert pool.kv_bytes() == [per_worker, per_worker]
    # each half is its own set of sequences on the workers (two instance keys, 2 sites each)
    keys = runners[-1].last_keys
    assert len(set(keys)) == 2 and all(k >= HALF_KEY for k in keys)
    assert [pool.release(k) for k in keys] == [2 * 2, 2 * 2]  # 2 sites x 2 workers per half
    assert pool.kv_bytes() == [0, 0]


@pytest.mark.parametrize("batch,dynamic,static", [(3, True, False), (4, False, True)])
def test_odd_batch_splits_unevenly_and_static_batch_runs_whole(batch, dynamic, static):
    ref, out, records = _run(batch, dynamic)
    assert torch.equal(out.sequences, ref)
    status = {r["stats"]["overlap"] for r in records}
    runners = [lookup_handle(r["stats"]["overlap_runner"]) for r in records]
    assert sum(r.calls for r in runners) == NEW
    if static:  # runs whole, attention still per half (the halves' keys)
        assert all(s.startswith("applied unsplit: the batch size is static") for s in status)
        assert sum(r.split_calls for r in runners) == 0
    else:
        assert "applied" in status and sum(r.split_calls for r in runners) >= 1
    assert len(set(runners[-1].last_keys)) == 2
