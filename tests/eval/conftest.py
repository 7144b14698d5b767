"""Fixtures of the evaluation-harness tests: one real SmolLM2-135M for the whole session.

The first run converts the GGUF model into the user cache (about 40 s, once); later sessions load
the cache in about a second. Torch runs single-threaded while these tests run: on a small shared
machine one thread decodes 10x faster than two oversubscribed ones.
"""
import pytest
import torch


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)``, eager, float32, SDPA attention."""
    from llm_compile.eval.model import load_smollm2

    model, tokenizer = load_smollm2()
    yield model, tokenizer


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
