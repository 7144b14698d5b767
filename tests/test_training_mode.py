"""Training through a compiled model (issue 13, item 9): with a pass on, the compile itself fails
with a clear "inference-only" error (not a generic autograd error in backward()); with every pass
off, backward works and gives eager's gradients."""
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import model_zoo  # noqa: E402


@pytest.fixture(autouse=True)
def reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _loss(model, ids):
    return model(ids, labels=ids).loss


def test_backward_through_swa_is_a_clear_error():
    model = model_zoo.build("llama", layers=1)
    ids = torch.randint(0, model_zoo.VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    model.forward = torch.compile(model.forward, backend="llmaccel", options={"swa": True, "inner": "eager"})
    with pytest.raises(Exception) as e:
        _loss(model, ids).backward()
    msg = str(e.value)
    assert "inference-only" in msg and "torch.no_grad()" in msg and "swa" in msg, msg


@pytest.mark.parametrize("inner", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_backward_with_every_pass_off_matches_eager(inner):
    model = model_zoo.build("llama", layers=1)
    ids = torch.randint(0, model_zoo.VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    _loss(model, ids).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, backend="llmaccel", options={"inner": inner})
    _loss(compiled, ids).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-5, msg=n)


def test_inference_under_no_grad_still_compiles_with_passes():
    model = model_zoo.build("llama", layers=1)
    ids = torch.randint(0, model_zoo.VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    model.forward = torch.compile(model.forward, backend="llmaccel", options={"swa": True, "inner": "eager"})
    with torch.no_grad():
        assert model(ids).logits.shape == (1, 12, model_zoo.VOCAB)
