"""Sliding-window layers under ``swa`` (issue 13, item 10): Hugging Face keeps a rolling cache of
the last ``w - 1`` tokens for them, which per-token SWA scores cannot follow. Such sites are left
dense (the layer attends its own window) with one warning naming the reason; no per-step
warnings, no wrong kv_store reason, and the model's output equals eager."""
import logging
import pathlib
import sys
import warnings

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import model_zoo  # noqa: E402
from helpers import pass_record, record_compiles  # noqa: E402

from llm_compile.passes import manager  # noqa: E402
from llm_compile.passes.manager import PassNotAppliedWarning  # noqa: E402

WINDOW = 8


def _model(family):
    model = model_zoo.build(family)
    cfg = model.config
    cfg.sliding_window = WINDOW
    if family == "qwen2":  # layer 0 full attention, layer 1 sliding
        cfg.use_sliding_window, cfg.max_window_layers = True, 1
        cfg.layer_types = ["full_attention", "sliding_attention"]
    torch.manual_seed(0)
    return type(model)(cfg).eval()


@pytest.mark.parametrize("family, sliding_sites", [("mistral", [0, 1]), ("qwen2", [1])])
def test_sliding_window_sites_skipped_once_with_the_reason(family, sliding_sites, caplog):
    manager._warned.clear()
    torch._dynamo.reset()
    model = _model(family)
    ids = torch.randint(0, model_zoo.VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    gen = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    with torch.no_grad():
        ref = model.generate(ids, **gen)
    model.forward = torch.compile(model.forward, backend="llmaccel",
                                  options={"swa": {"sparsity": 0.5, "bucket": 4}, "inner": "eager"})
    with warnings.catch_warnings(record=True) as got, caplog.at_level(logging.WARNING), \
            record_compiles() as compiled, torch.no_grad():
        warnings.simplefilter("always")
        out = model.generate(ids, **gen)
    torch._dynamo.reset()
    runtime_warnings = [r.getMessage() for r in caplog.records if r.name.startswith("llm_compile.runtime")]
    assert runtime_warnings == []  # no "no prefill state ..." per step
    ours = [str(w.message) for w in got if issubclass(w.category, PassNotAppliedWarning)]
    assert len(ours) == 1 and "sliding-window layer" in ours[0] and f"window {WINDOW}" in ours[0], ours
    for c in compiled:
        swa_rec = pass_record(c, "sparse_window_attention")
        assert sorted(s["site"] for s in swa_rec["skipped"]) == sliding_sites
        assert sorted(m["site"] for m in swa_rec["matched"]) == sorted({0, 1} - set(sliding_sites))
        kv = pass_record(c, "local_kv_store")
        assert kv["skipped"] and all("sliding-window layer" in s["reason"] for s in kv["skipped"])
    if family == "mistral":  # every layer sliding: every site dense, exactly the model
        assert torch.equal(out, ref)
