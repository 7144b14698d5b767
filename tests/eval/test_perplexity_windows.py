"""Windowed perplexity scores every token 1..N-1 exactly once, with disjoint windows too (a stub
model: no weights needed)."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from llm_compile.eval import metrics


class _Bigram(torch.nn.Module):
    """Logits at position p depend on token p only, so a window's logits equal the full sequence's."""

    def __init__(self, vocab=32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(vocab, vocab, generator=g) * 3

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


@pytest.mark.parametrize("n,context,stride", [(64, 16, 16), (64, 16, 8), (70, 16, 16), (65, 16, 16),
                                              (16, 16, 16)])
def test_every_token_scored_once(n, context, stride):
    model = _Bigram()
    ids = torch.randint(0, 32, (1, n), generator=torch.Generator().manual_seed(1))
    # garbage in the allocator (what an uninitialised NLL buffer used to pick up)
    junk = torch.full((4 * n,), float("inf"))
    del junk
    r = metrics.perplexity(model, ids, context=context, stride=stride, progress=False, return_nll=True)
    full = F.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="none")
    assert r["n_scored"] == n - 1
    assert torch.isfinite(r["nll_per_token"]).all()
    torch.testing.assert_close(r["nll_per_token"], full)
    assert math.isclose(r["ppl"], math.exp(full.mean().item()), rel_tol=1e-6)
