"""Run a set of metrics over one or more backend configs on one loaded model.

A *config* is ``(name, options)``: ``options`` is the dict handed to
``torch.compile(model.forward, backend="llmaccel", options=options)``, or ``None`` for the
uncompiled eager model. :func:`run_configs` compiles each config in turn on the same model
(resetting Dynamo in between), runs the selected metrics on identical inputs, and returns one
result dict per config. The agreement reference (greedy continuations of the uncompiled model) is
computed once per run.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
import traceback
from dataclasses import asdict, dataclass

import torch

from . import data, metrics, passkey
from .model import compile_model, compiled_graph_count, eager_forward, uncompile_model

logger = logging.getLogger(__name__)

METRICS = ("ppl", "stream", "passkey", "agree")


@dataclass
class EvalSettings:
    """Sizes and knobs of an evaluation run (the CLI flags map 1:1 onto these)."""

    metrics: tuple[str, ...] = ("ppl", "stream", "passkey", "agree")
    split: str = "evaluation"
    tokens: int = 4096
    """Tokens of the split scored by teacher-forced perplexity."""
    context: int = 2048
    stride: int = 1024
    stream_tokens: int = 1024
    """Tokens fed one by one for streaming perplexity (up to 8192, the model's context)."""
    prefill: int = 0
    """Leading tokens the streaming metric feeds in one call (0: pure token-by-token)."""
    segment: int = 256
    passkey_lengths: tuple[int, ...] = (1024, 2048)
    passkey_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    passkey_trials: int = 1
    passkey_filler: str = "grass"
    passkey_decode_tail: int = 0
    agree_n: int = 4
    agree_tokens: int = 32
    agree_prompt: int = 64
    backend: str = "llmaccel"
    dynamic: bool | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; valid: {list(METRICS)}")


def set_option_path(options: dict, path: str, value) -> dict:
    """Return a copy of ``options`` with the dotted ``path`` (e.g. ``"swa.sparsity"``) set.

    Missing intermediate sections are created; a section given as ``True`` becomes ``{}`` first.
    """
    out = copy.deepcopy(options)
    keys = path.split(".")
    node = out
    for k in keys[:-1]:
        if node.get(k) in (None, True, False):
            node[k] = {}
        if not isinstance(node[k], dict):
            raise ValueError(f"cannot set {path!r}: {k!r} is {node[k]!r}, not a dict")
        node = node[k]
    node[keys[-1]] = value
    return out


def parse_value(text: str):
    """A sweep value: JSON if it parses (``0.5``, ``true``, ``null``, ``{"a": 1}``), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_options(text: str | None) -> dict | None:
    """``--options`` text: a JSON dict, or ``none``/``eager``/empty for the uncompiled model."""
    if text is None or text.strip().lower() in ("", "none", "null", "eager"):
        return None
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"--options must be a JSON object or 'none', got {text!r}")
    return value


def _scalars(name: str, options, res: dict) -> dict:
    """The headline numbers of one config (one table row / plot point)."""
    row = {"config": name}
    if "ppl" in res:
        row["ppl"] = res["ppl"]["ppl"]
    if "stream" in res:
        row["stream_ppl"] = res["stream"]["ppl"]
        row["decode_ms"] = res["stream"]["decode_ms_per_token"]
    if "passkey" in res:
        row["passkey"] = res["passkey"]["accuracy"]
    if "agree" in res:
        row["agree"] = res["agree"]["agreement"]
    return row


class Evaluator:
    """Holds the model, tokenizer, inputs and the agreement reference for one run."""

    def __init__(self, model, tokenizer, settings: EvalSettings):
        self.model, self.tokenizer, self.s = model, tokenizer, settings
        s = settings
        self.ppl_ids = data.load_tokens(tokenizer, s.split, s.tokens) if "ppl" in s.metrics else None
        self.stream_ids = (data.load_tokens(tokenizer, s.split, s.stream_tokens)
                           if "stream" in s.metrics else None)
        self.prompts = (data.prompt_windows(tokenizer, s.split, s.agree_n, s.agree_prompt)
                        if "agree" in s.metrics else None)
        self._reference = None

    def reference(self):
        """Greedy continuations of the uncompiled model for the agreement prompts (cached)."""
        if self._reference is None:
            t0 = time.perf_counter()
            self._reference = metrics.continuations(
                eager_forward(self.model), self.prompts, self.s.agree_tokens,
                progress=self.s.progress, desc="agree(ref)")
            logger.info("agreement reference: %d continuations in %.1f s", len(self.prompts),
                        time.perf_counter() - t0)
        return self._reference

    def run(self, name: str, options: dict | None) -> dict:
        """Compile ``options`` (``None``: eager) and run every selected metric; never raises for a
        failing config: the error is recorded in the result instead."""
        s, model = self.s, self.model
        res: dict = {"name": name, "options": options, "metrics": {}, "error": None}
        t0 = time.perf_counter()
        try:
            compile_model(model, options, backend=s.backend, dynamic=s.dynamic)
            m = res["metrics"]
            for metric in s.metrics:
                logger.info("[%s] %s", name, metric)
                if metric == "ppl":
                    m["ppl"] = metrics.perplexity(model, self.ppl_ids, context=s.context,
                                                  stride=s.stride, progress=s.progress)
                elif metric == "stream":
                    m["stream"] = metrics.streaming_perplexity(
                        model, self.stream_ids, prefill=s.prefill, segment=s.segment,
                        progress=s.progress)
                elif metric == "passkey":
                    m["passkey"] = passkey.passkey_retrieval(
                        model, self.tokenizer, lengths=s.passkey_lengths, depths=s.passkey_depths,
                        trials=s.passkey_trials, seed=s.seed, filler=s.passkey_filler,
                        decode_tail=s.passkey_decode_tail, split=s.split, progress=s.progress)
                elif metric == "agree":
                    ref = self.reference()
                    if options is None:  # the uncompiled model is the reference itself
                        m["agree"] = dict(agreement=1.0, prefix=1.0, exact=1.0, n=len(ref),
                                          tokens=s.agree_tokens, seconds=0.0, reference=True)
                    else:
                        m["agree"] = metrics.agreement(model, self.prompts, reference=ref,
                                                       max_new_tokens=s.agree_tokens,
                                                       progress=s.progress)
            res["graphs"] = compiled_graph_count() if options is not None else 0
        except Exception as e:  # noqa: BLE001 - one failing config must not end a sweep
            logger.error("config %s failed: %s", name, e)
            res["error"] = f"{type(e).__name__}: {e}"
            res["traceback"] = traceback.format_exc()
        finally:
            uncompile_model(model)
        res["seconds"] = round(time.perf_counter() - t0, 2)
        res["row"] = _scalars(name, options, res["metrics"])
        return res


def run_configs(model, tokenizer, configs: list[tuple[str, dict | None]],
                settings: EvalSettings) -> list[dict]:
    """Evaluate each ``(name, options)`` config on ``model``; see :class:`Evaluator.run`."""
    ev = Evaluator(model, tokenizer, settings)
    results = []
    for name, options in configs:
        logger.info("config %s: options=%s", name, json.dumps(options))
        results.append(ev.run(name, options))
    return results


def settings_dict(settings: EvalSettings) -> dict:
    """JSON-friendly view of ``settings``."""
    d = asdict(settings)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def run_metadata() -> dict:
    """Versions and machine facts recorded with every result file."""
    import platform

    import transformers

    return dict(torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version(), machine=platform.machine(),
                threads=torch.get_num_threads(), model="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)",
                time=time.strftime("%Y-%m-%d %H:%M:%S"))


def finite(x) -> bool:
    """Whether ``x`` is a finite number."""
    return isinstance(x, (int, float)) and math.isfinite(x)
