"""canonicalize_attention on real model code (transformers, small configs) and hand-written graphs."""
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import op_delta, pass_record, record_compiles, sites
from model_zoo import FAMILIES, build

EAGER = {"inner": "eager", "canonicalize": True}
OP = "llmaccel.attention.default"


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_models_prefill_logits_generate_and_site_count(family, impl):
    m = build(family, impl, layers=2)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        ref_logits = m(ids).logits
        ref_tokens = m.generate(ids[:1], max_new_tokens=6, do_sample=False)
        compiled = torch.compile(m.forward, backend="llmaccel", options=EAGER)
        with record_compiles() as rec:
            logits = compiled(ids).logits
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        assert sites(rec[0]) == 2 and op_delta(rec[0], "canonicalize_attention", OP) == 2
        assert pass_record(rec[0], "canonicalize_attention")["skipped"] == []
        m.forward = compiled
        with record_compiles() as rec:
            tokens = m.generate(ids[:1], max_new_tokens=6, do_sample=False)
    assert tokens.tolist() == ref_tokens.tolist()
    assert rec and all(sites(r) == 2 for r in rec)  # decode graphs: every layer canonicalised
    decode = [r for r in rec if any(s["kv_cache_append"] for s in pass_record(r, "canonicalize_attention")["matched"])]
    assert decode, "decode graphs must see the KV-cache append"


def test_gqa_and_layer_site_ids():
    m = build("llama", "eager", layers=3)
    with torch.no_grad(), record_compiles() as rec:
        torch.compile(m.forward, backend="llmaccel", options=EAGER)(torch.randint(0, 128, (1, 5)))
    rec = pass_record(rec[0], "canonicalize_attention")
    assert [s["site"] for s in rec["matched"]] == [0, 1, 2]
    assert rec["stats"]["site_ids"] == "layer index from parameter names"
    assert {s["gqa_groups"] for s in rec["matched"]} == {"2"}  # repeat_kv expansion peeled


def test_decode_twenty_tokens_bounded_graph_count():
    m = build("llama", "sdpa")
    with torch.no_grad():
        m.forward = torch.compile(m.forward, backend="llmaccel", options=EAGER)
        with record_compiles() as rec:
            m.generate(torch.randint(0, 128, (1, 5)), max_new_tokens=20, do_sample=False)
    assert len(rec) <= 3, [r["graph_id"] for r in rec]  # prefill, first decode, dynamic decode


def _sdpa(q, k, v, **kw):
    return F.scaled_dot_product_attention(q, k, v, **kw)


def _compile_run(fn, *args, **opts):
    with record_compiles() as rec:
        out = torch.compile(fn, backend="llmaccel", options={**EAGER, **opts})(*args)
    return out, rec


def test_no_attention_graph_untouched():
    f = lambda x, w: torch.softmax(x @ w, -1).sum(0)  # noqa: E731  a softmax that is not attention
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    out, rec = _compile_run(f, x, w)
    torch.testing.assert_close(out, f(x, w))
    r = pass_record(rec[0], "canonicalize_attention")
    assert r["stats"]["sites"] == 0 and r["changed"] is False and r["skipped"] == []


def test_two_attention_blocks():
    def f(q, k, v):
        h = _sdpa(q, k, v, is_causal=True)
        return _sdpa(h, k, v)
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    out, rec = _compile_run(f, q, k, v)
    torch.testing.assert_close(out, f(q, k, v))
    r = pass_record(rec[0], "canonicalize_attention")
    assert r["stats"]["sites"] == 2 and [s["is_causal"] for s in r["matched"]] == [True, False]
    assert r["stats"]["site_ids"] == "graph order"


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masked_sdpa(kind):
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    mask = torch.rand(2, 1, 6, 6) > 0.3
    mask[..., 0] = True
    if kind == "float":
        mask = torch.zeros(2, 1, 6, 6).masked_fill(~mask, float("-inf"))
    f = lambda q, k, v, m: _sdpa(q, k, v, attn_mask=m)  # noqa: E731
    out, rec = _compile_run(f, q, k, v, mask)
    torch.testing.assert_close(out, f(q, k, v, mask))
    assert pass_record(rec[0], "canonicalize_attention")["matched"][0]["mask"] is True


def test_custom_scale_and_gqa_sdpa():
    q, k, v = torch.randn(1, 6, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    f = lambda q, k, v: _sdpa(q, k, v, scale=0.3, enable_gqa=True)  # noqa: E731
    out, rec = _compile_run(f, q, k, v)
    torch.testing.assert_close(out, f(q, k, v))
    assert pass_record(rec[0], "canonicalize_attention")["matched"][0]["scale"] == pytest.approx(0.3)


@pytest.mark.parametrize("style", ["mul", "div", "div_tensor"])
def test_eager_form_scaled_and_masked(style):
    def f(q, k, v, mask):
        s = q @ k.transpose(-1, -2)
        if style == "mul":
            s = s * 0.25
        elif style == "div":
            s = s / math.sqrt(q.shape[-1])
        else:
            s = s / torch.full([], q.shape[-1] ** 0.5)
        p = torch.softmax(s + mask, dim=-1, dtype=torch.float32).to(q.dtype)
        return p @ v
    q, k, v = (torch.randn(2, 4, 6, 16) for _ in range(3))
    mask = torch.triu(torch.full((6, 6), float("-inf")), 1)[None, None]
    out, rec = _compile_run(f, q, k, v, mask)
    torch.testing.assert_close(out, f(q, k, v, mask), rtol=1e-5, atol=1e-5)
    m = pass_record(rec[0], "canonicalize_attention")["matched"][0]
    assert m["form"] == "eager" and m["mask"] and m["scale"] == pytest.approx(0.25)


def test_cache_append_split_into_cached_and_new():
    def f(q, pk, pv, k, v):
        kk, vv = torch.cat([pk, k], -2), torch.cat([pv, v], -2)
        return _sdpa(q, kk, vv), kk, vv
    q = torch.randn(1, 4, 1, 8)
    pk, pv, k, v = torch.randn(1, 4, 7, 8), torch.randn(1, 4, 7, 8), torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8)
    out, rec = _compile_run(f, q, pk, pv, k, v)
    for a, b in zip(out, f(q, pk, pv, k, v)):
        torch.testing.assert_close(a, b)
    r = pass_record(rec[0], "canonicalize_attention")
    assert r["matched"][0]["kv_cache_append"] is True
    assert r["op_count_delta"].get("aten.cat.default", 0) == 0  # the cache update itself stays


def test_dropout_site_is_skipped_with_reason():
    q = torch.randn(1, 2, 4, 8)
    out, rec = _compile_run(lambda q: _sdpa(q, q, q, dropout_p=0.5), q)
    r = pass_record(rec[0], "canonicalize_attention")
    # training-mode dropout decomposes into a random mask between softmax and bmm: left alone, reported
    assert r["stats"]["sites"] == 0 and "not a bmm" in r["skipped"][0]["reason"]
    assert out.shape == q.shape


def test_inductor_compiles_canonical_op():
    m = build("qwen2", "sdpa")
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        ref = m.generate(ids, max_new_tokens=4, do_sample=False)
        m.forward = torch.compile(m.forward, backend="llmaccel", options={"canonicalize": True})
        out = m.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.tolist() == ref.tolist()


def test_padded_batch_decode_splits_the_cache_append_in_dynamic_graphs():
    """A left-padded batch makes HF expand GQA with ``repeat_kv``; once the cache length is
    symbolic that expansion keeps a no-op ``slice(x, 3, 0, INT_MAX)``, which must be peeled so the
    site still gets its KV-cache append split (SWA, kv_store and offload depend on it)."""
    m = build("llama", "sdpa", layers=2)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    gen = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        ref = m.generate(ids, **gen)
        m.forward = torch.compile(m.forward, backend="llmaccel", options=EAGER)
        with record_compiles() as rec:
            out = m.generate(ids, **gen)
    assert torch.equal(out, ref)
    decode = [pass_record(r, "canonicalize_attention")["matched"] for r in rec[1:]]
    assert len(decode) >= 2  # the static first decode step, then the symbolic one
    assert all(s["kv_cache_append"] and str(s["gqa_groups"]) == "2" for d in decode for s in d)
    assert all(len(d) == 2 for d in decode)
