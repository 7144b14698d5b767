"""``{"swa": {"policy": "streaming"}}`` with defaults is StreamingLLM: 4 attention sinks + recent
tokens (issue 13, item 5). Checked in the parsed config and in the runtime's token selection."""
import sys
import pathlib

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import model_zoo  # noqa: E402

from llm_compile.config import parse_options  # noqa: E402
from llm_compile.runtime.kv.store import kv_of  # noqa: E402


def test_streaming_defaults_keep_four_sinks_in_the_selection():
    opts = {"swa": {"policy": "streaming", "sparsity": 0.8, "bucket": 8}, "inner": "eager"}
    assert parse_options(opts).swa.sink_tokens == 4
    model = model_zoo.build("llama")
    ids = torch.randint(0, model_zoo.VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="llmaccel", options=opts)
    with torch.no_grad():
        res = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                             return_dict_in_generate=True)
    torch._dynamo.reset()
    for layer in res.past_key_values.layers:  # the state is owned by the sequence's cache
        st = kv_of(layer.keys).state
        b = st.last_budget
        assert not b.dense and b.sinks == 4 and b.n == 47   # k = round(47 * 0.1) = 5: 4 sinks + 6 recent
        idx = st.last_indices[0, 0].tolist()
        assert idx[:4] == [0, 1, 2, 3], idx
        assert idx[4:] == list(range(b.n - b.recent, b.n)), idx
