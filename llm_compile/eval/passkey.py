"""Passkey retrieval (Landmark Attention / LongLoRA style) on a model that may be compiled.

A random 5-digit key is hidden at a relative ``depth`` (0 = right after the instruction, 1 = just
before the question) inside filler text, so that the prompt is ``length`` tokens long::

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you about the important information there.
    <filler ...>
    The pass key is 71432. Remember it. 71432 is the pass key.
    <filler ...>
    What is the pass key? The pass key is

(the five parts joined by newlines, as in Landmark Attention's ``generate_prompt``).

Filler ``"grass"`` repeats "The grass is green. The sky is blue. The sun is yellow. Here we go.
There and back again."; filler ``"bible"`` takes consecutive text of the evaluation split. The
prompt is built from token ids (pieces tokenised separately) and is ``length`` tokens long within a
few tokens (``"bible"``; the needle goes at the nearest sentence end) or within one sentence group
(``"grass"``, whole groups only).
The model answers greedily; a trial counts as retrieved when the first number in the answer equals
the key. Prefill is one call, so with ``decode_tail=0`` only the answer tokens use decode-time
attention; ``decode_tail=T`` feeds the last ``T`` prompt tokens (question and, for small depths,
the needle) one per call, through decode-time attention.
"""
from __future__ import annotations

import logging
import random
import re
import time
from typing import Sequence

import torch

from .data import filler_tokens
from .metrics import _progress, greedy_generate

logger = logging.getLogger(__name__)

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
        "them. I will quiz you about the important information there.")
GRASS = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def passkey_prompt(tokenizer, length: int, depth: float, key: int, *, filler: str = "grass",
                   split: str = "evaluation", filler_offset: int = 0) -> tuple[torch.Tensor, int]:
    """Prompt ids ``[1, ~length]`` with ``key`` at relative ``depth``; returns ``(ids, needle_pos)``.

    ``needle_pos`` is the token index where the needle sentence starts.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    nl = _ids(tokenizer, "\n")
    task, needle = _ids(tokenizer, TASK), _ids(tokenizer, NEEDLE.format(key=key))
    question = _ids(tokenizer, QUESTION)
    budget = length - len(task) - len(needle) - len(question) - 4 * len(nl)
    if budget < 0:
        raise ValueError(f"length={length} is shorter than the passkey prompt without filler")
    if filler == "grass":
        first, unit = _ids(tokenizer, GRASS), _ids(tokenizer, " " + GRASS)
        units = max((budget - len(first)) // len(unit) + 1, 2) if budget >= len(first) else 0
        before_units = round(depth * units)

        def block(k: int) -> list[int]:  # k sentence groups joined by spaces, as in the paper
            return first + unit * (k - 1) if k else []

        before, after = block(before_units), block(units - before_units)
    elif filler == "bible":
        text = filler_tokens(tokenizer, budget, split=split, offset=filler_offset)
        cut = _sentence_cut(tokenizer, text, round(depth * len(text)))
        before, after = text[:cut], text[cut:]
    else:
        raise ValueError(f"unknown filler {filler!r}; valid: 'grass', 'bible'")
    # parts joined by newlines; an empty filler part (depth 0 or 1) adds no blank line
    ids = task
    for part in (before, needle, after, question):
        if part:
            ids = ids + nl + part
        if part is needle:
            pos = len(ids) - len(part)
    return torch.tensor(ids, dtype=torch.long).unsqueeze(0), pos


def _sentence_cut(tokenizer, ids: list[int], cut: int, reach: int = 64) -> int:
    """The token boundary nearest ``cut`` (within ``reach``) that follows a sentence end."""
    for delta in range(reach + 1):
        for c in (cut - delta, cut + delta):
            if 0 < c < len(ids) and tokenizer.decode(ids[c - 1:c]).rstrip().endswith((".", "!", "?")):
                return c
    return min(max(cut, 0), len(ids))


def parse_answer(text: str) -> str | None:
    """The first run of digits in ``text`` (the model's answer), or ``None``."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


@torch.no_grad()
def passkey_retrieval(model, tokenizer, *, lengths: Sequence[int] = (1024, 2048),
                      depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), trials: int = 1,
                      seed: int = 0, filler: str = "grass", max_new_tokens: int = 8,
                      decode_tail: int = 0, split: str = "evaluation",
                      progress: bool = True) -> dict:
    """Passkey accuracy over ``lengths x depths`` (``trials`` random keys each, seeded).

    Keys and (for ``filler="bible"``) filler offsets depend only on ``seed``, the length, the depth
    and the trial, so every config of a sweep sees the same prompts. Returns ``accuracy`` (all
    trials), ``by_length`` and ``by_depth`` accuracies, ``grid`` (one row per length x depth with
    accuracy, prompt tokens and the answers), ``seconds``.
    """
    t0 = time.perf_counter()
    rows, hits_all, n_all = [], 0, 0
    bar = _progress(len(lengths) * len(depths) * trials, "passkey", progress)
    for length in lengths:
        for depth in depths:
            hits, answers, n_tokens = 0, [], 0
            for trial in range(trials):
                rng = random.Random(f"{seed}/{length}/{depth}/{trial}")
                key = rng.randint(10000, 99999)
                ids, _ = passkey_prompt(tokenizer, int(length), float(depth), key, filler=filler,
                                        split=split, filler_offset=rng.randint(0, 10**6))
                n_tokens = ids.shape[1]
                new = greedy_generate(model, ids, max_new_tokens, decode_tail=decode_tail,
                                      eos_token_id=tokenizer.eos_token_id)
                answer = tokenizer.decode(new, skip_special_tokens=True)
                ok = parse_answer(answer) == str(key)
                hits += int(ok)
                answers.append(dict(key=key, answer=answer.strip(), ok=ok))
                logger.debug("passkey len=%d depth=%.2f key=%d answer=%r", length, depth, key, answer)
                bar.update(1)
            rows.append(dict(length=int(length), depth=float(depth), prompt_tokens=n_tokens,
                             accuracy=hits / trials, answers=answers))
            hits_all += hits
            n_all += trials
    bar.close()

    def mean_by(field, value):
        sel = [r["accuracy"] for r in rows if r[field] == value]
        return sum(sel) / len(sel)

    return dict(accuracy=hits_all / max(n_all, 1),
                by_length={str(l): mean_by("length", int(l)) for l in lengths},
                by_depth={str(d): mean_by("depth", float(d)) for d in depths},
                grid=rows, trials=trials, filler=filler, decode_tail=decode_tail,
                seconds=round(time.perf_counter() - t0, 3))
