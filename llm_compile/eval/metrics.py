"""Metrics on a causal LM whose ``forward`` may be patched by ``torch.compile``.

Every metric takes ``model``: a Hugging Face causal LM (called as ``model(**kwargs)``, so a
``torch.compile``-patched ``model.forward`` is what runs) or any callable with the same keyword
interface (``input_ids``, ``past_key_values``, ``use_cache``, ``logits_to_keep``) returning an object
with ``.logits``.

* :func:`perplexity`: teacher-forced perplexity with a sliding window (Hugging Face's strided
  method: windows of ``context`` tokens, moved by ``stride``; each token is scored once, by the
  first window that sees it as a new token, with up to ``context - stride`` tokens of left context).
* :func:`streaming_perplexity`: StreamingLLM's ``eval_long_ppl``: the text goes through the model
  one token per call with a ``DynamicCache``; the NLL of each next token comes from the decode
  step. This exercises decode-time attention (e.g. sparse window attention).
* :func:`agreement`: share of greedy tokens identical to a reference (by default the uncompiled
  model) over several continuations.
* Passkey retrieval lives in :mod:`llm_compile.eval.passkey`.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True,
                mininterval=0.5)


def model_config(model):
    """The HF config of ``model`` (or of the module a bound forward belongs to), else ``None``."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        cfg = getattr(getattr(model, "__self__", None), "config", None)
    return cfg


def new_cache(model):
    """A fresh ``DynamicCache`` laid out for ``model``."""
    from transformers import DynamicCache

    cfg = model_config(model)
    return DynamicCache(config=cfg) if cfg is not None else DynamicCache()


def check_length(model, n_tokens: int) -> None:
    """Warn when ``n_tokens`` exceeds the model's trained context (positions past it are untrained)."""
    limit = getattr(model_config(model), "max_position_embeddings", None)
    if limit is not None and n_tokens > limit:
        logger.warning("%d tokens exceed the model's context of %d positions", n_tokens, limit)


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position NLL (float32) of ``targets [n]`` under ``logits [n, vocab]``."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def _ppl(mean_nll: float) -> float:
    """``exp(mean NLL)``; ``inf`` past float range (a broken model, e.g. NLL 800), not an error."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return float("inf")


def _summary(nll: torch.Tensor, seconds: float, **extra) -> dict:
    mean = float(nll.mean()) if nll.numel() else float("nan")
    return dict(ppl=_ppl(mean), nll=mean, n_scored=int(nll.numel()),
                seconds=round(seconds, 3), **extra)


def _segments(nll: torch.Tensor, first_position: int, segment: int) -> list[dict]:
    """PPL per block of ``segment`` scored positions (to see quality degrade along the sequence)."""
    out = []
    for i in range(0, nll.numel(), segment):
        part = nll[i:i + segment]
        out.append(dict(start=first_position + i, end=first_position + i + part.numel(),
                        ppl=_ppl(float(part.mean()))))
    return out


def _step_stats(steps: list[float], first_call: float) -> dict:
    """Decode timing: the median step (compile-free steady state) and the time above it, which is
    mostly (re)compilation in the first steps."""
    if not steps:
        return dict(decode_ms_per_token=float("nan"), first_call_s=round(first_call, 3),
                    overhead_s=0.0)
    med = sorted(steps)[len(steps) // 2]
    return dict(decode_ms_per_token=round(1e3 * med, 2), first_call_s=round(first_call, 3),
                overhead_s=round(sum(steps) - med * len(steps), 3))


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, *, context: int = 2048, stride: int = 1024,
               progress: bool = True, return_nll: bool = False) -> dict:
    """Teacher-forced sliding-window perplexity of ``input_ids [1, N]``.

    Windows ``[begin, begin + context)`` for ``begin = 0, stride, 2*stride, ...`` until the end is
    reached; a window scores only the tokens the previous window did not (so every token
    ``1..N-1`` is scored exactly once). ``stride == context`` gives disjoint windows (the first
    token of a window is then scored by the previous window's last logit: before 2026-11-29 it was
    left unwritten in an uninitialised buffer, so multi-window perplexities carried a few garbage
    NLLs, occasionally inf), smaller strides give each scored token more left context. Returns ``ppl``, mean ``nll``, ``n_scored``,
    ``windows``, ``seconds`` (and ``nll_per_token`` for positions ``1..N-1`` if ``return_nll``).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, N], got {tuple(input_ids.shape)}")
    if not 1 <= stride <= context:
        raise ValueError(f"need 1 <= stride <= context, got stride={stride}, context={context}")
    n = input_ids.shape[1]
    starts = []
    for begin in range(0, n, stride):
        starts.append(begin)
        if begin + context >= n:
            break
    nll = torch.full((n - 1,), float("nan"), dtype=torch.float32)
    t0 = time.perf_counter()
    prev_end = 0
    bar = _progress(len(starts), "ppl", progress)
    for begin in starts:
        end = min(begin + context, n)
        ids = input_ids[:, begin:end]
        logits = model(input_ids=ids, use_cache=False).logits[0]
        first = max(prev_end, begin + 1)  # first position scored by this window
        # the last position scored: end - 1, or ``end`` itself (predicted by this window's last
        # logit) when the next window starts at ``end`` (stride == context) and so cannot score it
        last = end if (end < n and begin + stride >= end) else end - 1
        pred = logits[first - 1 - begin:last - begin]  # logits at p-1 predict token p
        nll[first - 1:last] = _token_nll(pred, input_ids[0, first:last + 1])
        prev_end = last + 1
        del logits, pred
        bar.update(1)
    bar.close()
    out = _summary(nll, time.perf_counter() - t0, windows=len(starts), context=context,
                   stride=stride, tokens=n)
    if return_nll:
        out["nll_per_token"] = nll
    return out


@torch.no_grad()
def streaming_perplexity(model, input_ids: torch.Tensor, *, prefill: int = 0, segment: int = 256,
                         progress: bool = True, return_nll: bool = False) -> dict:
    """Perplexity with the text fed one token per call through a KV cache (StreamingLLM).

    The first call carries the first ``max(prefill, 1)`` tokens (``prefill`` 0 or 1: the pure
    token-by-token loop of StreamingLLM's ``eval_long_ppl``); then each call feeds one token with
    ``past_key_values=cache, use_cache=True`` and the NLL of the next token is read from its
    logits. Scored are tokens ``max(prefill, 1) .. N-1`` (the first of them predicted by the last
    position of the first call). Returns ``ppl``, ``nll``, ``n_scored``, ``first_scored``,
    ``by_segment`` (PPL per block of ``segment`` scored tokens), ``decode_ms_per_token`` (median
    step), ``first_call_s``, ``overhead_s`` (decode time above the median: mostly compilation),
    ``seconds`` (and ``nll_per_token`` if ``return_nll``).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, N], got {tuple(input_ids.shape)}")
    n = input_ids.shape[1]
    check_length(model, n)
    q = max(int(prefill), 1)
    if q >= n:
        raise ValueError(f"prefill={prefill} leaves nothing to score in {n} tokens")
    cache = new_cache(model)
    nll = torch.empty(n - q, dtype=torch.float32)
    t0 = time.perf_counter()
    out = model(input_ids=input_ids[:, :q], past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values if out.past_key_values is not None else cache
    nll[0] = _token_nll(out.logits[0, -1:], input_ids[0, q:q + 1])[0]
    t_prefill = time.perf_counter() - t0
    steps = []
    bar = _progress(n - q - 1, "stream", progress)
    for p in range(q, n - 1):
        ts = time.perf_counter()
        out = model(input_ids=input_ids[:, p:p + 1], past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        cache = out.past_key_values if out.past_key_values is not None else cache
        nll[p - q + 1] = _token_nll(out.logits[0, -1:], input_ids[0, p + 1:p + 2])[0]
        steps.append(time.perf_counter() - ts)
        bar.update(1)
    bar.close()
    res = _summary(nll, time.perf_counter() - t0, tokens=n, prefill=q, first_scored=q,
                   by_segment=_segments(nll, q, segment), **_step_stats(steps, t_prefill))
    if return_nll:
        res["nll_per_token"] = nll
    return res


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, *,
                    decode_tail: int = 0, eos_token_id: int | None = None) -> torch.Tensor:
    """Greedy continuation ``[max_new_tokens]`` (or shorter at ``eos_token_id``) of ``input_ids [1, N]``.

    The prompt is prefilled in one call (``logits_to_keep=1``), except its last ``decode_tail``
    tokens, which are fed one per call like generated tokens; then one call per new token.
    """
    n = input_ids.shape[1]
    check_length(model, n + max_new_tokens)
    tail = min(max(int(decode_tail), 0), n - 1)
    cache = new_cache(model)
    out = model(input_ids=input_ids[:, :n - tail], past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    for p in range(n - tail, n):
        out = model(input_ids=input_ids[:, p:p + 1], past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
    new = []
    for i in range(max_new_tokens):
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        new.append(int(tok))
        if (eos_token_id is not None and new[-1] == eos_token_id) or i == max_new_tokens - 1:
            break
        out = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return torch.tensor(new, dtype=torch.long)


def continuations(model, prompts: Sequence[torch.Tensor], max_new_tokens: int, *,
                  progress: bool = True, desc: str = "generate") -> list[torch.Tensor]:
    """Greedy continuations of each prompt (no early stop, so all have ``max_new_tokens``)."""
    outs = []
    bar = _progress(len(prompts), desc, progress)
    for p in prompts:
        outs.append(greedy_generate(model, p, max_new_tokens))
        bar.update(1)
    bar.close()
    return outs


def agreement(model, prompts: Sequence[torch.Tensor], *, max_new_tokens: int = 32,
              reference: Callable | Sequence[torch.Tensor] | None = None,
              progress: bool = True) -> dict:
    """Share of greedy tokens identical to the reference's, position by position.

    ``reference`` is either the reference continuations (as returned by :func:`continuations`,
    e.g. computed once for a sweep) or a model callable; ``None`` means the uncompiled forward of
    ``model`` (:func:`llm_compile.eval.model.eager_forward`). Returns ``agreement`` (identical
    tokens / all tokens), ``prefix`` (mean share of each continuation before its first
    difference), ``exact`` (share of continuations identical throughout), ``n``, ``tokens``,
    ``seconds``.
    """
    from .model import eager_forward

    t0 = time.perf_counter()
    if reference is None:
        reference = eager_forward(model)
    if callable(reference):
        reference = continuations(reference, prompts, max_new_tokens, progress=progress,
                                  desc="agree(ref)")
    if len(reference) != len(prompts):
        raise ValueError(f"{len(reference)} reference continuations for {len(prompts)} prompts")
    got = continuations(model, prompts, max_new_tokens, progress=progress, desc="agree")
    same = total = 0
    prefixes, exact = [], 0
    for a, b in zip(got, reference):
        m = min(len(a), len(b), max_new_tokens)
        eq = (a[:m] == b[:m])
        same += int(eq.sum())
        total += m
        diff = (~eq).nonzero()
        prefixes.append((int(diff[0]) if diff.numel() else m) / max(m, 1))
        exact += int(bool(eq.all()))
    return dict(agreement=same / max(total, 1), prefix=sum(prefixes) / len(prefixes),
                exact=exact / len(prompts), n=len(prompts), tokens=max_new_tokens,
                seconds=round(time.perf_counter() - t0, 3))
