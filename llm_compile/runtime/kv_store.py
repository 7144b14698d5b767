"""The in-process KV store: attention sites keep their KV cache here, appended in place.

With ``options={"kv_store": True}`` the pass ``local_kv_store`` moves every attention site's KV
cache out of the model's cache object into a :class:`LocalKVStore` of this process (the model's
Hugging Face cache keeps zero-memory phantoms of the right shape, as under attention offload). Each
(model instance, site) owns a :class:`~llm_compile.runtime.kv_buffer.SiteKV`: preallocated buffers
with ``reserve`` free slots after the prompt, grown by ``growth`` when full, so a decode step writes
one row per sequence instead of copying the whole cache (``torch.cat``) as ``DynamicCache`` does.

Attention then runs over views of the buffers through the site's mode: dense
(:class:`~llm_compile.runtime.offload.modes.DenseMode`, exactly ``llmaccel::attention``) or sparse
window attention (:class:`~llm_compile.runtime.offload.modes.SWAMode`, whose token scores live
next to the KV, in ``SiteKV.state``, and are registered in
:data:`llm_compile.runtime.swa.STATES` too, so ``swa.get_state(site)`` finds them)::

    store = get_store(KVStoreConfig())
    store.prefill(inst, site, k, v)                          # resets (inst, site); stores the prompt
    out = store.decode(inst, site, q, k_new, v_new, scale, cached_len=n)   # append, then attend
    store.kv_bytes(), store.state(inst, site), store.release(inst)

A decode whose ``cached_len`` (the length the model's cache reports) differs from what the store
holds is an error, never a silently misaligned attention.
"""
from __future__ import annotations

import threading
from typing import Any

from torch import Tensor

from llm_compile.runtime.context import on_instance_gone
from llm_compile.runtime.kv_buffer import SiteKV
from llm_compile.runtime.offload.modes import AttentionMode, DenseMode, SWAMode


class LocalKVStore:
    """``{(instance, site): SiteKV}`` with the pool interface the offload op calls."""

    def __init__(self, reserve: int = 256, growth: float = 1.5) -> None:
        self.reserve, self.growth = reserve, growth
        self._sites: dict[tuple[int, int], SiteKV] = {}
        self._lock = threading.Lock()

    def prefill(self, instance: int, site: int, k: Tensor, v: Tensor, q: Tensor | None = None,
                scale: float | None = None, attn_mask: Tensor | None = None, is_causal: bool = False,
                mode: AttentionMode | None = None) -> Tensor | None:
        """Reset (instance, site) with the prompt K/V ``[B, Hkv, L, D]``; with ``q``, attend
        through ``mode`` (its state is seeded by the prompt) and return ``[B, Hq, L, Dv]``."""
        mode = mode or DenseMode()
        B, hkv, _, D = k.shape
        hq = q.shape[1] if q is not None else hkv
        if hq % hkv:
            raise ValueError(f"llmaccel kv_store: {hq} query heads is not a multiple of {hkv} KV heads")
        state = mode.new_state(batch=B, kv_heads=hkv, q_heads=hq, head_dim=D, device=k.device, head_offset=0)
        kv = SiteKV(B, hkv, D, v.shape[-1], k.dtype, k.device, mode, state,
                    reserve=self.reserve, growth=self.growth)
        kv.append(k, v)
        with self._lock:
            self._sites[(instance, site)] = kv
        if state is not None and isinstance(mode, SWAMode):  # also where swa.get_state() looks
            from llm_compile.runtime import swa

            swa.STATES.reset(site, state, instance=instance)
        if q is None:
            return None
        return mode.attend(q, kv.keys(), kv.values(), attn_mask, scale, is_causal, state)

    def decode(self, instance: int, site: int, q: Tensor, k_new: Tensor, v_new: Tensor, scale: float,
               attn_mask: Tensor | None = None, is_causal: bool = False,
               cached_len: int | None = None) -> Tensor:
        """Append ``k_new``/``v_new`` in place, then attend over the whole stored cache."""
        kv = self._sites.get((instance, site))
        if kv is None:
            raise RuntimeError(
                f"llmaccel kv_store: no KV stored for attention site {site} of this model instance: "
                "a decode step came before any prefill (start each sequence with a call without "
                "past_key_values, e.g. through generate())")
        if cached_len is not None and int(cached_len) != kv.length:
            raise RuntimeError(
                f"llmaccel kv_store: site {site}: the model's cache says {int(cached_len)} cached tokens, "
                f"the KV store holds {kv.length}. The cache was changed outside the compiled model "
                "(cropped, reordered, or reused from another sequence); start the sequence again with "
                "a prefill")
        kv.append(k_new, v_new)
        return kv.mode.attend(q, kv.keys(), kv.values(), attn_mask, scale, is_causal, kv.state)

    # -- inspection / lifetime ------------------------------------------------------------------
    def site(self, instance: int, site: int) -> SiteKV | None:
        return self._sites.get((instance, site))

    def state(self, instance: int, site: int) -> Any:
        """The attention mode's state of (instance, site) (an ``SWAState`` under SWA), or None."""
        kv = self._sites.get((instance, site))
        return None if kv is None else kv.state

    def keys(self) -> list[tuple[int, int]]:
        return list(self._sites)

    def kv_bytes(self, allocated: bool = False) -> int:
        """KV bytes held (in use, or allocated with ``allocated=True``)."""
        return sum(s.nbytes(allocated) for s in list(self._sites.values()))

    def release(self, instance: int | None = None, site: int = -1) -> int:
        """Drop the KV of ``instance`` (one site, or all with -1; every instance with ``None``);
        returns the number of entries freed."""
        with self._lock:
            keys = [k for k in self._sites
                    if (instance is None or k[0] == instance) and site in (-1, k[1])]
            for k in keys:
                del self._sites[k]
        return len(keys)


_STORES: dict[tuple, LocalKVStore] = {}
_STORES_LOCK = threading.Lock()


def _forget(instance: int) -> int:
    """Drop ``instance``'s stored KV and SWA states; returns the KV entries freed."""
    from llm_compile.runtime import swa

    swa.STATES.clear(instance)
    return release_all(instance)


on_instance_gone(_forget)  # a garbage-collected model's KV and SWA states are freed with it


def get_store(cfg) -> LocalKVStore:
    """The shared store of a :class:`~llm_compile.config.KVStoreConfig` (one per distinct config),
    so that the prefill and decode graphs of a model read the same KV."""
    key = (cfg.reserve_tokens, cfg.growth)
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None:
            store = _STORES[key] = LocalKVStore(cfg.reserve_tokens, cfg.growth)
    return store


def stores() -> list[LocalKVStore]:
    """Every store made by :func:`get_store` in this process."""
    return list(_STORES.values())


def release_all(instance: int | None = None) -> int:
    """Drop the stored KV of ``instance`` (or of every instance) in every store."""
    return sum(s.release(instance) for s in stores())


def release_model(model) -> int:
    """Drop the stored KV (and SWA states) of ``model``, an ``nn.Module`` compiled with
    ``kv_store``: its instance key is one of its parameters' ids. Returns the KV entries freed."""
    from llm_compile.runtime import swa

    ids = {id(p) for p in model.parameters()}
    held = {key[0] for store in stores() for key in store.keys()} | swa.STATES.instances()
    return sum(_forget(inst) for inst in held & ids)
