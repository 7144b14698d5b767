"""swa + offload: the attention workers run sparse window attention (ALISA), with the same tokens
as local SWA; ``selection="layer"`` over several workers is refused at compile time."""
from __future__ import annotations

import pytest
import torch

from llm_compile.config import OptionsError, parse_options
from llm_compile.ops.offload import is_phantom
from llm_compile.runtime.offload import get_pool

from model_zoo import build
from helpers import pass_record, record_compiles


pytestmark = pytest.mark.usefixtures("offload_pools_shut_down")


def _llama():
    return build("llama")


IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
NEW = 8


def _generate(model, options):
    if options is not None:
        model.forward = torch.compile(model.forward, backend="llmaccel", options=options)
    try:
        with torch.no_grad(), record_compiles() as rec:
            out = model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=NEW,
                                 do_sample=False, return_dict_in_generate=True)
    finally:
        if options is not None:
            del model.forward
        torch._dynamo.reset()
    return out, rec


@pytest.mark.parametrize("selection,workers", [("layer", 1), ("kv_head", 2)])
def test_swa_offload_generates_the_tokens_of_local_swa(selection, workers):
    swa = {"sparsity": 0.6, "bucket": 1, "selection": selection}
    model = _llama()
    dense, _ = _generate(model, None)
    local, _ = _generate(model, {"swa": swa, "inner": "eager"})
    # the setup must be able to tell SWA from dense attention, else the test proves nothing
    assert not torch.equal(local.sequences, dense.sequences)
    opts = {"swa": swa, "offload": {"workers": workers, "timeout_s": 30}, "inner": "eager"}
    out, rec = _generate(model, opts)
    assert torch.equal(out.sequences, local.sequences)
    records = [pass_record(r, "attention_offload") for r in rec]
    assert records and all(r["changed"] and "error" not in r for r in records)
    assert all(m["form"] == "swa" for r in records for m in r["matched"])
    assert any(m["decode"] for r in records for m in r["matched"])
    # the KV lives in the workers (the whole cache: SWA attends a subset, it keeps everything)
    n = IDS.shape[1] + NEW - 1
    assert all(is_phantom(layer.keys) for layer in out.past_key_values.layers)
    pool = get_pool(parse_options(opts).offload)
    total = 2 * 2 * 2 * n * 16 * 2 * 4  # layers * batch * KV heads * tokens * D * (k, v) * fp32
    assert sum(pool.kv_bytes()) == total and len(pool.kv_bytes()) == workers


def test_layer_selection_over_several_workers_is_refused_at_compile_time():
    with pytest.raises(OptionsError, match="swa.selection='kv_head'.*offload.workers=1"):
        parse_options({"swa": {"selection": "layer"}, "offload": {"workers": 2}})
    # streaming keeps no scores, kv_head and one worker are exact: accepted
    parse_options({"swa": {"policy": "streaming"}, "offload": {"workers": 2}})
    parse_options({"swa": {"selection": "kv_head"}, "offload": {"workers": 3}})
    parse_options({"swa": {}, "offload": {"workers": 1}})
    model = _llama()
    model.forward = torch.compile(model.forward, backend="llmaccel",
                                  options={"swa": {}, "offload": {"workers": 2}, "inner": "eager"})
    with torch.no_grad(), pytest.raises(Exception, match="swa.selection='kv_head'"):
        model(IDS[:, :4])
