"""Model loading: offline, converted once into the cache, reused afterwards."""
import json
import os
from pathlib import Path

import pytest
import torch

from llm_compile.eval import model as M


def test_model_architecture(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.max_position_embeddings) == ("llama", 30, 9, 3, 8192)
    assert model.dtype == torch.float32 and not model.training
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert tok("In the beginning", add_special_tokens=False)["input_ids"] == [788, 260, 3616]


def test_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMACCEL_CACHE", str(tmp_path / "c"))
    assert M.cache_dir() == tmp_path / "c" / "smollm2-135m-instruct"
    monkeypatch.delenv("LLMACCEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert M.cache_dir() == tmp_path / "x" / "llm_compile" / "smollm2-135m-instruct"


def test_cache_is_reused(smollm2, monkeypatch):
    # the session fixture created (or found) the cache; a second load must not convert again
    assert M.cache_is_valid(M.cache_dir())

    def no_convert(*a, **k):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(M, "build_cache", no_convert)
    model, _ = M.load_smollm2()
    ref, _ = smollm2
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[w], ref.state_dict()[w])
    leftovers = [p.name for p in M.cache_dir().parent.iterdir() if "-tmp-" in p.name]
    assert not leftovers


def test_stale_cache_is_detected(tmp_path):
    real = M.cache_dir()
    assert M.cache_is_valid(real)
    fake = tmp_path / "stale"
    fake.mkdir()
    for f in real.iterdir():
        if f.name != M.STAMP_FILE:
            (fake / f.name).symlink_to(f)
    assert not M.cache_is_valid(fake)  # no stamp
    stamp = json.loads((real / M.STAMP_FILE).read_text())
    (fake / M.STAMP_FILE).write_text(json.dumps(dict(stamp, gguf_bytes=1)))
    assert not M.cache_is_valid(fake)  # stamp of another GGUF file
    (fake / M.STAMP_FILE).write_text(json.dumps(stamp))
    assert M.cache_is_valid(fake)


@pytest.mark.slow
def test_cache_is_created_atomically(monkeypatch, tmp_path, smollm2):
    monkeypatch.setenv("LLMACCEL_CACHE", str(tmp_path))
    assert not M.cache_is_valid()
    model, _ = M.load_smollm2()  # converts the GGUF (about 40 s)
    folder = M.cache_dir()
    assert M.cache_is_valid(folder)
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == [folder.name]  # no temp dirs left
    ref, _ = smollm2
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 ref.state_dict().values()))
    monkeypatch.setattr(M, "build_cache", lambda *a, **k: pytest.fail("cache not reused"))
    M.load_smollm2()
