"""The backend on the real SmolLM2-135M-Instruct (30 layers, 9 heads, 3 KV heads), offline."""
import pytest
import torch

from helpers import pass_record, record_compiles, sites

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    from llm_compile.eval.model import load_smollm2

    return load_smollm2()


def test_smollm2_logits_and_greedy_tokens_through_llmaccel(smollm2):
    model, tok = smollm2
    ids = tok("For God so loved the world, that he gave his one and only Son,", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref_logits = model(ids).logits
        ref = model.generate(ids, max_new_tokens=8, do_sample=False)
        model.forward = torch.compile(model.forward, backend="llmaccel", options={"inner": "eager"})
        try:
            with record_compiles() as rec:
                logits = model(ids).logits
                out = model.generate(ids, max_new_tokens=8, do_sample=False)
        finally:
            del model.forward
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert out.tolist() == ref.tolist()
    assert all(sites(r) == 30 for r in rec)
    ids_used = sorted(s["site"] for s in pass_record(rec[0], "canonicalize_attention")["matched"])
    assert ids_used == list(range(30))
    assert len(tok.decode(out[0, ids.shape[1]:]).strip()) > 0
