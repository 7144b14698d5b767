"""Tiered KV (kv_tiers, ALISA's system level), model level: exactness against the KV all on the
device (SWA and dense, Llama GQA and GPT-2 MHA), the mmap host tier, errors. The store's placement, the plan,
the cost model and the options: ``test_kv_tiers_units.py``."""
from __future__ import annotations

import json
import os

import pytest
import torch

from kv_tiers_helpers import decode_logits as _run, kv_budget as _budget, site_kvs as _kvs
from model_zoo import build
from llm_compile.runtime.tiers.store import TieredKV


pytestmark = pytest.mark.filterwarnings("error::llm_compile.passes.manager.PassNotAppliedWarning")


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _tiers(tmp_path, **kw):
    """Options that force phase 2 early: p1 = 24 tokens, recent 8, half the older rows on the host,
    and a device budget of 30 tokens per layer (so the oldest device rows spill as well)."""
    return {"p1": 24, "recent": 8, "alpha": 0.5, "cost_cache_dir": str(tmp_path), **kw}


# ---- exactness on real model code --------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_swa_over_tiers_equals_swa_on_the_device(family, tmp_path):
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    ref, ref_cache = _run(build(family), {"swa": {"sparsity": 0.6}}, ids, 16)
    torch._dynamo.reset()
    model = build(family)
    tiers = _tiers(tmp_path, device_budget=_budget(model, 2, 30))
    got, cache = _run(model, {"swa": {"sparsity": 0.6}, "kv_tiers": tiers}, ids, 16)
    # same selections at every site; the numbers agree to rounding (the device path reads the
    # recent window in place, the tiers attend over gathered rows: another summation order)
    for a, b in zip(_kvs(ref_cache), _kvs(cache), strict=True):
        assert torch.equal(a.state.last_indices, b.state.last_indices)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    for kv in _kvs(cache):
        assert isinstance(kv, TieredKV) and kv.length == 56
        assert kv.device_tokens() <= 30 and kv.host_tokens() >= 26   # most KV off the device
        assert kv.host_fetched > 0 and kv.spilled > 0 and kv.state.last_budget is not None


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dense_over_tiers_equals_dense(family, tmp_path):
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(2))
    ref, _ = _run(build(family), {"kv_store": True}, ids, 12)
    torch._dynamo.reset()
    model = build(family)
    got, cache = _run(model, {"kv_tiers": _tiers(tmp_path, device_budget=_budget(model, 2, 30))}, ids, 12)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert all(kv.host_tokens() > 0 for kv in _kvs(cache))


def test_generate_with_swa_and_tiers_on_mmap_equals_swa(tmp_path):
    d = tmp_path / "kv"
    d.mkdir()
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(3))
    ref_model, model = build("llama"), build("llama")
    ref_model.forward = torch.compile(ref_model.forward, backend="llmaccel",
                                      options={"swa": {"sparsity": 0.8}, "inner": "eager"})
    tiers = _tiers(tmp_path, mmap_dir=str(d), device_budget=_budget(model, 2, 32))
    model.forward = torch.compile(model.forward, backend="llmaccel",
                                  options={"swa": {"sparsity": 0.8}, "kv_tiers": tiers, "inner": "eager"})
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        a = ref_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        torch._dynamo.reset()
        b = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                           past_key_values=cache)
    assert torch.equal(a, b)
    kvs = _kvs(cache)
    assert all(isinstance(kv, TieredKV) and kv.host.kind == "mmap" and kv.host_fetched > 0 for kv in kvs)
    assert len(list(d.iterdir())) == len(kvs)                     # one host file per layer


def test_budget_too_small_for_the_batch_is_a_clear_error(tmp_path):
    model = build("llama")
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(4))
    with pytest.raises(Exception, match="raise device_budget"):
        _run(model, {"kv_tiers": _tiers(tmp_path, device_budget=_budget(model, 2, 8))}, ids, 1)


def test_full_host_tier_raises(tmp_path):
    model = build("llama")
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(5))
    tiers = _tiers(tmp_path, device_budget=_budget(model, 1, 30), host_budget=_budget(model, 1, 4))
    with pytest.raises(Exception, match="host tier is full"):
        _run(model, {"swa": {"sparsity": 0.5}, "kv_tiers": tiers}, ids, 8)


def test_passes_json_shows_the_plan(tmp_path):
    model = build("llama")
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(6))
    _run(model, {"swa": {"sparsity": 0.8}, "debug_dir": str(tmp_path / "dump"),
                 "kv_tiers": _tiers(tmp_path, device_budget=_budget(model, 2, 64))}, ids, 2)
    recs = [r for p in (tmp_path / "dump").glob("run_*/graph_*/passes.json")
            for r in json.loads(p.read_text()) if r.get("pass") == "local_kv_store" or r.get("name") == "local_kv_store"]
    plans = [r["stats"]["kv_tiers_plan"] for r in recs if "kv_tiers_plan" in r.get("stats", {})]
    assert plans, recs
    p = plans[0]
    assert p["p1"] == 24 and p["alpha"] == 0.5 and p["beta"] == 0 and p["predicted_step_s"] > 0
    assert "frees no memory" in p["reasons"]["beta"] and p["batch"] == 2


def test_beam_search_over_tiers_equals_beam_search_on_the_device(tmp_path):
    """LLMAccelCache reorders the tiered KV with the SWA state (map_batch rebuilds the tiers)."""
    from llm_compile import LLMAccelCache

    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(7))
    outs, caches = [], []
    for tiers in (None, _tiers(tmp_path, device_budget=_budget(build("llama"), 2, 30))):
        torch._dynamo.reset()
        model = build("llama")
        opts = {"swa": {"sparsity": 0.6}, "inner": "eager", **({"kv_tiers": tiers} if tiers else {})}
        model.forward = torch.compile(model.forward, backend="llmaccel", options=opts)
        cache = LLMAccelCache()
        with torch.no_grad():
            outs.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                       num_beams=2, do_sample=False, past_key_values=cache))
        caches.append(cache)
    assert torch.equal(outs[0], outs[1])
    assert all(isinstance(kv, TieredKV) and kv.host_tokens() > 0 for kv in _kvs(caches[1]))


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_llama_recompute_path_equals_the_models_kv(kv_heads):
    """Phase 3's recompute (Llama, from the inputs the graph passes): K/V from the kept layer input
    and RoPE rows equal the K/V the model cached."""
    import transformers as tf
    from transformers import DynamicCache

    from llm_compile.runtime.tiers.recompute import KVRecompute, RecomputeError

    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=kv_heads, vocab_size=128, max_position_embeddings=512)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    inputs = {}

    def grab(mod, args, kw):
        inputs["x"] = kw.get("hidden_states", args[0] if args else None)

    attn = model.model.layers[1].self_attn
    hook = attn.register_forward_pre_hook(grab, with_kwargs=True)
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(8))
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        cos, sin = model.model.rotary_emb(inputs["x"], torch.arange(30)[None])
    hook.remove()
    spec = {"hidden": 64, "k": [1, -1, 0, kv_heads * 16], "v": [2, -1, 0, kv_heads * 16], "rope": [3, 4]}
    rec = [inputs["x"].reshape(60, 64), attn.k_proj.weight.t(), attn.v_proj.weight.t(), cos[:, None], sin[:, None]]
    rc = KVRecompute(spec, rec, kv_heads, 16, 16)
    kept = rc.kept(2)                                           # [30, 2, 64 + 2 x 16]
    slots = torch.tensor([0, 5, 17, 29])
    kv = rc.kv(kept[slots].reshape(8, -1)).view(4, 2, kv_heads, 32).permute(1, 2, 0, 3)
    torch.testing.assert_close(kv[..., :16], cache.layers[1].keys[:, :, slots], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kv[..., 16:], cache.layers[1].values[:, :, slots], rtol=1e-5, atol=1e-6)
    rc.check(kept, cache.layers[1].keys, cache.layers[1].values, 1)   # the prefill check passes
    with pytest.raises(RecomputeError, match="not of a supported form"):  # another layer's KV: refused
        rc.check(kept, cache.layers[0].keys, cache.layers[0].values, 1)
    # memory: 96 values kept per token; GQA (2 KV heads: 64 values of K+V) frees none, MHA (128) frees 32
    assert rc.width == 96


@pytest.mark.slow  # two Inductor compiles: 62-106 s on a shared core (CI budget ~30 s)
def test_swa_over_tiers_under_inductor_equals_swa_on_the_device(tmp_path):
    """The default ``inner="inductor"``: the op with its ``tiers`` argument goes through Inductor."""
    from transformers import DynamicCache

    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    outs, cache = [], DynamicCache()
    for extra in ({}, {"kv_tiers": _tiers(tmp_path, device_budget=_budget(build("llama"), 2, 30))}):
        torch._dynamo.reset()
        model = build("llama")
        model.forward = torch.compile(model.forward, backend="llmaccel", options={"swa": {"sparsity": 0.6}, **extra})
        with torch.no_grad():
            outs.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                       do_sample=False, past_key_values=cache if extra else None))
    assert torch.equal(outs[0], outs[1])
    assert all(isinstance(kv, TieredKV) and kv.host_tokens() > 0 and kv.host_fetched > 0 for kv in _kvs(cache))


def test_query_aware_policy_with_tiers_is_refused():
    """quest, oracle and recall with page summaries need every key (summaries of the cache, or the
    full q.K); the tiers do not keep them: a clear error at parse time, not a crash (or a wrong
    selection) at the first decode step. recall with the key sketch (its default) is accepted."""
    from llm_compile.config import OptionsError, parse_options

    for swa in ({"policy": "quest"}, {"policy": "oracle"}, {"policy": "recall", "scorer": "pages"}):
        with pytest.raises(OptionsError, match="tiers do not keep"):
            parse_options({"swa": {"sparsity": 0.8, **swa}, "kv_tiers": {}})
    assert parse_options({"swa": {"sparsity": 0.8, "policy": "recall"}, "kv_tiers": {}}).swa.scorer == "sketch"


def test_recall_with_the_key_sketch_over_tiers_equals_recall_on_the_device(tmp_path):
    """The sketch lives in the sequence's SWA state on the device, the KV in the tiers: blocks are
    sketched from rows read by position as they complete, the query picks and the history picks
    are the same as with everything on the device, and the tokens too."""
    swa = {"sparsity": 0.5, "policy": "recall", "sketch_block": 16}
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(4))
    ref, ref_cache = _run(build("llama"), {"swa": swa}, ids, 16)
    torch._dynamo.reset()
    model = build("llama")
    tiers = _tiers(tmp_path, device_budget=_budget(model, 2, 30))
    got, cache = _run(model, {"swa": swa, "kv_tiers": tiers}, ids, 16)
    for a, b in zip(_kvs(ref_cache), _kvs(cache), strict=True):
        assert torch.equal(a.state.last_indices, b.state.last_indices)
        assert b.state.last_budget.query > 0 and b.state.summary.n == 48   # 3 blocks of 16 sketched
        assert torch.equal(a.state.summary.dequantized(), b.state.summary.dequantized())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert all(kv.host_tokens() >= 26 and kv.host_fetched > 0 for kv in _kvs(cache))


# ---- a runtime module first imported while a pass runs under fake tensors (issue 14) -----------

_FRESH_PROCESS = r"""
import sys, torch
from kv_tiers_helpers import decode_logits, site_kvs   # torch only: imports no llm_compile module
from model_zoo import build
assert not [m for m in sys.modules if m.startswith("llm_compile.runtime.tiers")]   # nothing imported yet

def run(options, ids, steps):
    torch._dynamo.reset()
    model = build("llama", layers=1)   # one layer: the test pays two compiles in a fresh interpreter
    logits, cache = decode_logits(model, options, ids, steps)
    return logits, site_kvs(cache)

ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(4))
# the plan the tiny benchmark got: the prefill (20 tokens) fits phase 1 (p1 = 24), so the prefill's
# append decides no host rows; decode then crosses p1 into phase 2 (half the older rows to the host)
tiers = {"p1": 24, "recent": 8, "alpha": 0.5, "device_budget": 1 * 2 * 2 * 16 * 2 * 4 * 30,  # 30 tokens
         "cost_cache_dir": sys.argv[1]}
got, kvs = run({"swa": {"sparsity": 0.6}, "kv_tiers": tiers}, ids, 16)
ref, ref_kvs = run({"swa": {"sparsity": 0.6}}, ids, 16)
for a, b in zip(ref_kvs, kvs, strict=True):
    assert torch.equal(a.state.last_indices, b.state.last_indices)
    assert b.length == 36 and b.device_tokens() <= 30 and b.host_tokens() > 0 and b.host_fetched > 0, vars(b)
torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
assert torch.equal(got.argmax(-1), ref.argmax(-1))
print("OK")
"""


def test_prefill_in_phase_one_in_a_fresh_process_equals_swa_on_the_device(tmp_path):
    """Regression (issue 14, the tiny benchmark's swa_tiers failure): in a process where the
    compiler's pass is the first to import the tiers runtime, a prefill shorter than p1 used a
    module-level empty tensor made at import under fake-tensor mode, and raised
    DynamicOutputShapeException (aten.nonzero) at run time. A fresh interpreter, so that the import
    really happens inside the compile; the prefill stays in phase 1, decode crosses p1, and the
    logits and selections equal SWA with the KV all on the device."""
    import subprocess
    import sys

    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(tmp_path)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-3000:]


def test_no_runtime_module_holds_a_tensor_made_at_import():
    """Modules under llm_compile.runtime (and the passes, which import them while the compiler runs
    under fake tensors) keep no module-level tensors: one made at import can be a fake tensor."""
    import importlib
    import pkgutil

    import llm_compile.passes
    import llm_compile.runtime

    found = []
    for pkg in (llm_compile.runtime, llm_compile.passes):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if info.name.endswith(".__main__"):  # an entry point (it parses sys.argv)
                continue
            mod = importlib.import_module(info.name)
            found += [f"{info.name}.{k}" for k, v in vars(mod).items() if isinstance(v, torch.Tensor)]
    assert not found, f"module-level tensors (make them per call or per object): {found}"
