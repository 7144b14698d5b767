"""Tiered KV (ALISA's system level, §V): a site's KV rows on the model's device while they fit,
then in host memory (RAM, pinned RAM for CUDA models, or a memory-mapped file), and past p2, for
part beta of the tokens, only the layer input, recomputed when selected; placed by a plan that a
measured cost model makes. ``cost`` (measured, cached on disk), ``plan`` (p1, p2, alpha, beta,
predicted step time, reasons), ``host`` (tier storage), ``fetch`` (overlapped host gathers),
``recompute`` (K/V from the kept layer input and the weights the graph passes), ``store``
(:class:`~llm_compile.runtime.tiers.store.TieredKV`, used by ``llmaccel::stored_attention`` when
``kv_tiers`` is on)."""
