"""``LLMAccelCache``: a ``transformers`` cache that carries llm_compile's per-sequence state.

Under ``kv_store`` (and ``swa``) the compiled graph hands back, for each layer, tensors that
carry that layer's per-sequence state: the in-place KV buffers (:mod:`llm_compile.runtime.kv.store`,
on zero-memory phantoms) and the SWA scores (:mod:`llm_compile.runtime.swa.op`). Any HF cache
that stores what the graph returns (``DynamicCache``) keeps that state per sequence, so greedy
and sampled generation work with HF's default cache. What a plain ``DynamicCache`` cannot do is
*edit* the state: its ``reorder_cache`` (beam search), ``crop`` (assisted decoding) and batch
operations build new tensors without it, and the next decode step then raises an error naming
this class. ``LLMAccelCache`` (a ``DynamicCache``) applies those edits to the KV buffers and the
SWA state together::

    cache = llm_compile.LLMAccelCache()
    model.generate(ids, past_key_values=cache, num_beams=4)            # reorder_cache
    model.generate(ids, past_key_values=LLMAccelCache(), assistant_model=draft)   # crop

Without ``kv_store``/``swa`` it behaves exactly as a ``DynamicCache``.
"""
from __future__ import annotations

from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from llm_compile.runtime import dense_prefix
from llm_compile.runtime.kv.store import kv_of, phantoms
from llm_compile.runtime.swa.op import attach, state_of


class LLMAccelLayer(DynamicLayer):
    """A ``DynamicLayer`` whose batch edits and crop carry the llm_compile state along."""

    def _map_batch(self, fn) -> bool:
        if not self.is_initialized or self.keys is None or self.get_seq_length() == 0:
            return True
        kv = kv_of(self.keys)
        if kv is not None:
            self.keys, self.values = phantoms(kv.map_batch(fn), self.keys, self.values)
            return True
        st = state_of(self.keys)
        if st is not None:
            new = st.map_batch(fn)
            self.keys, self.values = attach(fn(self.keys), new), attach(fn(self.values), new)
            return True
        if dense_prefix.is_marked(self.keys):  # filled by the dense graph below swa.min_context
            self.keys, self.values = dense_prefix.mark(fn(self.keys)), dense_prefix.mark(fn(self.values))
            return True
        return False

    def reorder_cache(self, beam_idx) -> None:
        idx = beam_idx.to(self.keys.device) if self.is_initialized and self.keys is not None else beam_idx
        if not self._map_batch(lambda t: t.index_select(0, idx)):
            super().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0)):
            super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices) -> None:
        if not self._map_batch(lambda t: t[indices, ...]):
            super().batch_select_indices(indices)

    def crop(self, tokens_to_remove: int) -> None:
        if not self.is_initialized or self.keys is None or tokens_to_remove == 0:
            return
        if tokens_to_remove > 0:
            raise ValueError(f"LLMAccelCache.crop({tokens_to_remove}): pass a negative number of "
                             "tokens to remove (transformers' convention)")
        n = max(0, self.get_seq_length() + tokens_to_remove)
        kv = kv_of(self.keys)
        if kv is not None:
            kv.crop(n)
            self.keys, self.values = phantoms(kv, self.keys, self.values)
            return
        st, marked = state_of(self.keys), dense_prefix.is_marked(self.keys)
        super().crop(tokens_to_remove)
        if marked:
            dense_prefix.mark(self.keys)
            dense_prefix.mark(self.values)
        if st is not None:
            new = st.crop(n)
            attach(self.keys, new)
            attach(self.values, new)


class LLMAccelCache(DynamicCache):
    """A ``DynamicCache`` whose ``reorder_cache``/``crop``/``batch_repeat_interleave``/
    ``batch_select_indices`` keep llm_compile's per-sequence state (in-place KV buffers, SWA
    scores) consistent with the keys and values. See the module docstring."""

    def __init__(self, *args, **kwargs) -> None:
        if args or kwargs:
            raise TypeError("LLMAccelCache() takes no arguments (its layers are created as the model "
                            "fills them)")
        Cache.__init__(self, layer_class_to_replicate=LLMAccelLayer)
