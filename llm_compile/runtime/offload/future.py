"""An attention request in flight (:class:`OffloadFuture`), as the pool's ``decode_async`` and
store-only ``prefill`` return it; replies are collected strictly in issue order by the pool."""
from __future__ import annotations

import time

import torch
from torch import Tensor

from llm_compile.runtime.offload import protocol as P


class OffloadFuture:
    """An attention request in flight; :meth:`wait` returns the output (``None`` for a store-only
    prefill). Holds the send buffers until completion. Replies are consumed strictly in issue
    order: waiting on a future first collects every earlier one (keeping their results)."""

    def __init__(self, pool, parts: list, out_shape, dtype, device, what: str) -> None:
        self._pool, self._parts, self._what = pool, parts, what
        self._out_shape, self._dtype, self._device = out_shape, dtype, device
        self._result: Tensor | None = None
        self._error: str | None = None
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def nbytes_held(self) -> int:
        return 0 if self._done else sum(b.numel() for part in self._parts for b in part["keep"])

    def wait(self) -> Tensor | None:
        self._pool._collect_until(self)
        if self._error is not None:
            raise RuntimeError(f"llmaccel offload: {self._what} failed on {self._error}")
        return self._result

    def _collect(self) -> None:
        """Receive every worker's reply (transport failures raise and break the pool)."""
        pool = self._pool
        deadline = time.monotonic() + pool.timeout_s
        out = None
        if self._out_shape is not None:
            out = torch.empty(self._out_shape, dtype=self._dtype, device=self._device)
        errors = []
        for part in self._parts:  # every reply is consumed, even after an error, to stay in sync
            pool._wait(part["recv"], part["rank"], deadline, self._what)
            for w in part["sends"]:
                pool._wait(w, part["rank"], deadline, self._what)
            status, _, _, _, msg = P.read_status(part["reply"])
            if status != P.STATUS_OK:
                errors.append(msg)
            elif out is not None:
                qs, qe = part["q_heads"]
                shape = (self._out_shape[0], qe - qs, *self._out_shape[2:])
                chunk = part["reply"][P.STATUS_BYTES:].view(self._dtype).reshape(shape)
                out[:, qs:qe].copy_(chunk)
        self._parts, self._done = [], True
        if errors:
            self._error = "; ".join(errors)
        else:
            self._result = out
