"""Run-time parts of the backend, by feature: ``kv/`` (in-place KV buffers, ``stored_attention``,
LLMAccelCache), ``swa/`` (sparse window attention state, policies and ops), ``tiers/`` (KV in device and host
tiers, the cost model and placement plan of ``kv_tiers``), ``offload_*``
(attention workers). Importing ``llm_compile.runtime.kv`` / ``llm_compile.runtime.swa`` registers
the implementations of the ``llmaccel::`` ops declared in :mod:`llm_compile.ops` that need them
(the passes that insert those ops import them)."""
