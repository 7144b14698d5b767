"""A requested pass that cannot apply says so once, as a Python warning with the reason (issue 13,
item 3); a pass that raises is rolled back and warns too."""
import warnings

import pytest
import torch
from torch import nn

from llm_compile.passes import manager
from llm_compile.passes.manager import PassNotAppliedWarning
from llm_compile.quantize import quantize_weights


@pytest.fixture(autouse=True)
def fresh_warnings():
    manager._warned.clear()
    torch._dynamo.reset()
    yield
    manager._warned.clear()
    torch._dynamo.reset()


def _compile_and_run(model, x, options):
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        f = torch.compile(model, backend="llmaccel", options={"inner": "eager", **options})
        with torch.no_grad():
            f(x)
    return [w for w in got if issubclass(w.category, PassNotAppliedWarning)]


def _gemma2(layers=1):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=16, attn_implementation="eager", attn_logit_softcapping=50.0)
    torch.manual_seed(0)
    return transformers.Gemma2ForCausalLM(cfg).eval()


def test_swa_on_soft_capped_attention_warns_once_with_the_reason():
    model, ids = _gemma2(layers=2), torch.randint(0, 128, (1, 8))
    got = _compile_and_run(model, ids, {"swa": True, "kv_store": False})
    assert len(got) == 1, [str(w.message) for w in got]
    msg = str(got[0].message)
    assert "sparse_window_attention" in msg and "canonicalised" in msg and "tanh" in msg
    # same reason again (a new compile, another shape): no second warning
    assert _compile_and_run(model, torch.randint(0, 128, (1, 5)), {"swa": True, "kv_store": False}) == []


def test_anda_without_quantized_weights_says_call_quantize_weights():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    got = _compile_and_run(model, torch.randn(2, 64), {"anda": {"kernel": "reference"}})
    assert len(got) == 1 and "quantize_weights" in str(got[0].message), [str(w.message) for w in got]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        return self.down_proj(torch.relu(self.up_proj(x)))


def test_anda_with_quantized_weights_is_silent():
    model = quantize_weights(MLP().eval(), 4, 64)
    assert _compile_and_run(model, torch.randn(2, 64), {"anda": {"kernel": "reference"}}) == []


def test_one_warning_per_kind_of_reason():
    """Two linears of unknown module kind (names differ): one warning, not one per module."""
    model = quantize_weights(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval(), 4, 64)
    got = _compile_and_run(model, torch.randn(2, 64), {"anda": {"kernel": "reference"}})
    assert len(got) == 1 and "unknown module kind" in str(got[0].message), [str(w.message) for w in got]


def test_a_graph_without_attention_does_not_warn_for_swa():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU()).eval()
    assert _compile_and_run(model, torch.randn(2, 64), {"swa": True}) == []


def test_a_pass_that_raises_is_rolled_back_and_warns(monkeypatch):
    from llm_compile.passes import pipeline

    def boom(gm, config, ctx):
        for n in list(gm.graph.nodes):  # half-done rewrite, then a crash
            if n.op == "call_function":
                n.meta["touched"] = True
        raise RuntimeError("induced failure")

    spec = next(p for p in pipeline.PIPELINE if p.name == "anda_lowering")
    monkeypatch.setattr(type(spec), "load", lambda self: boom if self.name == "anda_lowering"
                        else __import__(f"llm_compile.passes.{self.module}", fromlist=["run"]).run)
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    x = torch.randn(2, 8)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        f = torch.compile(model, backend="llmaccel", options={"inner": "eager", "anda": True})
        with torch.no_grad():
            out = f(x)
    msgs = [str(w.message) for w in got if issubclass(w.category, PassNotAppliedWarning)]
    assert len(msgs) == 1 and "rolled back" in msgs[0] and "induced failure" in msgs[0], msgs
    torch.testing.assert_close(out, model(x))


def test_kv_store_without_a_cache_does_not_warn():
    """``use_cache=False`` keeps no cache: nothing to store is not a pass that failed to apply
    (before: a PassNotAppliedWarning "nothing to store" for a legitimate call)."""
    import sys
    import pathlib

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from model_zoo import build

    model = build("llama", "sdpa")
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        f = torch.compile(model.forward, backend="llmaccel", options={"inner": "eager", "kv_store": True})
        with torch.no_grad():
            f(torch.randint(0, 128, (1, 6)), use_cache=False)
    assert not [w for w in got if issubclass(w.category, PassNotAppliedWarning)]
