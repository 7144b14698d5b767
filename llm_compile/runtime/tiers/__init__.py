"""Tiered KV (ALISA's system level, §V): a site's KV rows on the model's device while they fit,
then in host memory (RAM, pinned RAM for CUDA models, or a memory-mapped file), placed by a plan
that a measured cost model makes. ``cost`` (measured, cached on disk), ``plan`` (p1, p2, alpha,
beta, predicted step time, reasons), ``host`` (host-tier storage), ``fetch`` (overlapped host
gathers), ``store`` (:class:`~llm_compile.runtime.tiers.store.TieredKV`, used by
``llmaccel::stored_attention`` when ``kv_tiers`` is on)."""
