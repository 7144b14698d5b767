"""How the query-aware policies ("quest", "recall") score tokens for the current query, as small
objects chosen by ``swa.scorer``:

* :class:`PageScorer` (``"pages"``, Quest): per page of ``page_size`` tokens, an upper bound of
  ``q . k`` from the elementwise key min/max (:mod:`~llm_compile.runtime.swa.pages`); a token
  inherits its page's weight, so whole pages are taken.
* :class:`SketchScorer` (``"sketch"``): per token, ``q . k~`` from a ``sketch_bits``-bit copy of
  the keys (:mod:`~llm_compile.runtime.swa.sketch`); tokens are taken one by one.

Both give per-head weights over their scored units (a softmax over pages, or over the sketched
tokens), spread over the ``n`` tokens by ``to_tokens`` *after* the heads are summed (so the
expansion runs on ``G`` rows, not ``Hq``; a token without a summary yet gets 0), and say how many
token rows (K+V of one token, all KV heads) their summaries cost a step, so the budget counts them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from llm_compile.runtime.swa.pages import PageSummary
from llm_compile.runtime.swa.sketch import KeySketch


class _Scorer:
    def weights(self, summary, q, kc, kn, scale, n, use_triton, source=None) -> Tensor:
        """Per-head weights [B, Hq, units]: a softmax of the subclass's ``logits``."""
        return torch.softmax(self.logits(summary, q, kc, kn, scale, n, use_triton, source), dim=-1)


class PageScorer(_Scorer):
    name = "pages"

    def new(self, cfg) -> PageSummary:
        return PageSummary(cfg.page_size)

    def summary_rows(self, n: int, cfg, d: int, dv: int, itemsize: int) -> tuple[float, int]:
        """(token rows the summaries cost, pages read) at a step over ``n`` tokens: min and max
        (``2 * d`` values in the keys' dtype) per page and KV head."""
        pages = -(-n // cfg.page_size)
        return pages * 2 * d / (d + dv), pages

    def min_total(self, cfg) -> int:
        return cfg.page_size + 1

    def unit(self, summary: PageSummary) -> int:
        """Tokens per scored unit (a page)."""
        return summary.page

    def logits(self, summary: PageSummary, q: Tensor, kc: Tensor, kn: Tensor | None, scale: float,
               n: int, use_triton: bool, source=None) -> Tensor:
        """Upper bounds of ``scale * q . k`` per page [B, Hq, pages] float32."""
        if kc is None:  # parse_options refuses quest/recall-with-pages over kv_tiers
            raise RuntimeError("llmaccel swa: the page scorer needs the key cache (not over kv_tiers)")
        summary.update(kc, kn)
        if use_triton:
            from llm_compile.codegen.swa_page_kernels import swa_page_bounds  # triton imported on use only

            ub = swa_page_bounds(q, summary.kmin, summary.kmax, scale)
        else:
            ub = summary.bounds(q, scale)
        return ub                                                   # [B, Hq, pages]

    def to_tokens(self, w: Tensor, summary: PageSummary, n: int) -> Tensor:
        """A token inherits its page's weight: [B, G, pages] -> [B, G, n]."""
        return w.repeat_interleave(summary.page, dim=-1)[..., :n]

    def describe(self, cfg) -> str:
        return f"page bound (key min/max per {cfg.page_size} tokens; summaries counted)"


class SketchScorer(_Scorer):
    name = "sketch"

    def new(self, cfg) -> KeySketch:
        return KeySketch(cfg.sketch_bits, cfg.sketch_block)

    def summary_rows(self, n, cfg, d, dv, itemsize):
        """The sketch of the complete blocks, plus one token row amortised (each block is
        quantized once, from its ``block`` rows, when it completes; over tiered KV a row is read
        as K+V)."""
        sketched = (n // cfg.sketch_block) * cfg.sketch_block
        per_token = KeySketch.bytes_per_token(cfg.sketch_bits, cfg.sketch_block, d)
        return (sketched * per_token) / ((d + dv) * itemsize) + 1.0, 0

    def min_total(self, cfg) -> int:
        return 17

    def unit(self, summary: KeySketch) -> int:
        """Tokens per scored unit (one)."""
        return 1

    def logits(self, summary: KeySketch, q, kc, kn, scale, n, use_triton, source=None) -> Tensor:
        """``scale * q . k~`` per sketched token [B, Hq, sketched] float32."""
        if kc is None:  # tiered KV: the blocks completed since the last step, read by position
            summary.update_from(lambda lo, hi: source.rows(
                torch.arange(lo, hi, device=q.device).view(1, 1, -1))[0], n)
        else:
            summary.update(kc, kn)
        if not summary.n:
            return q.new_zeros(q.shape[0], q.shape[1], 0, dtype=torch.float32)
        if use_triton:
            from llm_compile.codegen.swa_sketch_kernels import swa_sketch_logits  # triton imported on use only

            packed, step, mn, nb = summary.parts()
            logits = swa_sketch_logits(packed, step, mn, q, nb, summary.bits, scale)
        else:   # the C kernel on CPU (runtime/swa/native.py), else torch
            logits = summary.logits(q, scale)
        return logits

    def to_tokens(self, w: Tensor, summary: KeySketch, n: int) -> Tensor:
        """The newest ``n - summary.n`` tokens have no sketch yet: weight 0."""
        return torch.nn.functional.pad(w, (0, n - w.shape[-1]))

    def describe(self, cfg) -> str:
        return (f"{cfg.sketch_bits}-bit key sketch per token (per channel over {cfg.sketch_block}-token "
                "blocks; counted)")


SCORERS = {s.name: s for s in (PageScorer(), SketchScorer())}


def scorer_of(cfg):
    return SCORERS[cfg.scorer]
