"""Anda evaluation pieces shared by the search CLI (:mod:`llm_compile.anda_cli`), the accuracy
benchmark and the tests: the backend options and an eager stand-in for a width setting, the
perplexity :class:`Evaluator` (compile once, retarget the backend per candidate) and its JSON
:class:`EvalCache`.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import Mapping

import torch

import llm_compile
from llm_compile import anda_widths
from llm_compile.anda_widths import ANDA_MODULE_KINDS

log = logging.getLogger(__name__)

CACHE_VERSION = 2
"""2: multi-window perplexities score every token (version 1 left the first token of each disjoint
window unwritten in an uninitialised buffer: a few garbage NLLs per value, occasionally inf);
a cache file of another version is ignored and rewritten."""
MODES = ("compile", "recompile", "eager")

MIN_PART_TOKENS = 64
"""Fewest tokens a calibration part may hold (``Evaluator(parts=K)``, ``--calib-parts``)."""

__all__ = ["kind_widths", "linear_kinds", "anda_options", "anda_eager", "lowered_count", "EvalCache", "RetargetBackend",
           "Evaluator", "MODES", "MIN_PART_TOKENS", "part_bounds", "part_perplexities"]


def part_bounds(n_tokens: int, parts: int) -> list[tuple[int, int]]:
    """``[(begin, end), ...]``: ``n_tokens`` tokens cut into ``parts`` contiguous parts of
    ``n_tokens // parts`` tokens, the first ``n_tokens % parts`` one more (the rule of
    :func:`llm_compile.eval.data.part_lengths`, so K = the number of books of a balanced split gives
    one part per book). Raises ``ValueError`` for ``parts < 1`` or parts under
    :data:`MIN_PART_TOKENS` tokens."""
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"calibration parts must be an int >= 1, got {parts!r}")
    q, r = divmod(n_tokens, parts)
    if parts > 1 and q < MIN_PART_TOKENS:
        raise ValueError(f"{parts} calibration parts of {n_tokens} tokens hold {q} tokens each; at most "
                         f"{n_tokens // MIN_PART_TOKENS} parts ({MIN_PART_TOKENS}+ tokens each) fit")
    out, b = [], 0
    for i in range(parts):
        e = b + q + (i < r)
        out.append((b, e))
        b = e
    return out


def part_perplexities(nll_per_token: torch.Tensor, bounds) -> list[float]:
    """Perplexity of each part from the NLLs of positions ``1..N-1`` (``perplexity(...,
    return_nll=True)``): part ``[b, e)`` averages the NLLs of the tokens it holds (position 0 is never
    scored)."""
    import math

    out = []
    for b, e in bounds:
        v = nll_per_token[max(b, 1) - 1:e - 1]
        m = float(v.mean())
        out.append(math.exp(m) if m < 700 else float("inf"))
    return out


def linear_kinds(model) -> dict[str, str]:
    """``{qualified name: Anda kind}`` of every ``QuantLinear`` (the pass's own classification)."""
    from llm_compile.passes.anda_lowering import module_kind
    from llm_compile.quantize import QuantLinear

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            source = "L_self_modules_" + "_modules_".join(name.split(".")) + "_buffers_qweight_"
            out[name] = module_kind(source)
    return out


def kind_widths(widths) -> dict[str, int] | list[dict[str, int]]:
    """An int, kind dict or per-layer list -> a kind dict, or a list of kind dicts (one per layer)."""
    if anda_widths.is_per_layer(widths):
        return [{k: anda_widths.bits_for(e, k) for k in ANDA_MODULE_KINDS} for e in widths]
    if isinstance(widths, Mapping):
        return {k: int(widths[k]) for k in ANDA_MODULE_KINDS}
    return dict.fromkeys(ANDA_MODULE_KINDS, int(widths))


def anda_options(widths, kernel: str = "reference", inner: str = "eager") -> dict:
    """The backend options that lower every FP-INT linear with ``widths`` (an int, a kind dict or a
    per-layer list, :mod:`llm_compile.anda_widths`)."""
    return {"anda": {"mantissa_bits": kind_widths(widths), "kernel": kernel}, "inner": inner}


@contextlib.contextmanager
def anda_eager(model, widths, kernel: str = "reference"):
    """Inside the block every ``QuantLinear`` of ``model`` runs ``llmaccel::anda_linear`` with the
    width of its kind and layer (what the lowering pass puts in the graph), without compiling. Yields
    the count."""
    w = kind_widths(widths)
    kinds = linear_kinds(model)
    if None in kinds.values():
        raise ValueError(f"unknown Anda kind for {[n for n, k in kinds.items() if k is None]}")
    mods, widths_of = [], {}
    for name, kind in kinds.items():
        try:
            widths_of[name] = anda_widths.bits_for(w, kind, anda_widths.layer_index(name))
        except LookupError as e:
            raise ValueError(f"{name}: {e}") from None
    for name, kind in kinds.items():
        mod = model.get_submodule(name)

        def fwd(x, mod=mod, m=widths_of[name]):
            return torch.ops.llmaccel.anda_linear(x, mod.qweight, mod.scales, mod.mins, mod.bias, m,
                                                  mod.bits, mod.group_size, kernel)
        mod.forward = fwd
        mods.append(mod)
    try:
        yield len(mods)
    finally:
        for mod in mods:
            del mod.forward


def lowered_count(records) -> int:
    """FP-INT matmuls lowered to ``anda_linear`` in ``COMPILED`` records (summed over graphs)."""
    return sum(len(p.get("matched", [])) for r in records for p in r["passes"]
               if p["pass"] == "anda_lowering")


def source_fingerprint(roots) -> str:
    """sha256 (16 hex digits) of every ``*.py`` / ``*.c`` file under ``roots``: relative paths and
    contents, in path order."""
    h = hashlib.sha256()
    for root in map(Path, roots):
        for f in sorted(p for ext in ("*.py", "*.c") for p in root.rglob(ext) if "__pycache__" not in p.parts):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@functools.cache
def code_fingerprint() -> str:
    """:func:`source_fingerprint` of this installation's ``llm_compile`` package, with its
    ``passes`` and ``codegen`` folders (installed from other folders: ``package-dir``)."""
    roots = [Path(llm_compile.__file__).parent]
    for sub in ("llm_compile.passes", "llm_compile.codegen"):
        spec = importlib.util.find_spec(sub)
        roots += [Path(d) for d in (spec.submodule_search_locations or []) if not Path(d).is_relative_to(roots[0])]
    return source_fingerprint(roots)


class EvalCache:
    """``{setting key: {tuple key: record}}`` in a JSON file, rewritten atomically after each put.

    Records are only reused by the code that made them: the file holds :func:`code_fingerprint`,
    and a file written by other code (or another :data:`CACHE_VERSION`) is ignored, with a warning,
    and rewritten. A perplexity cached before a kernel or pass change is not a measurement of the
    new code (an unexplained 0.12 % drift between a cached and a fresh evaluation-split ppl of the
    same widths, benchmarks/RESULTS.md, is the kind of error this rules out)."""

    def __init__(self, path: str | os.PathLike | None, code: str | None = None):
        self.path = Path(path) if path else None
        self.code = code or (code_fingerprint() if self.path else None)   # in memory: this process's code
        self.data = {"version": CACHE_VERSION, "code": self.code, "settings": {}}
        if self.path and self.path.is_file():
            with open(self.path) as f:
                data = json.load(f)
            if data.get("version") == CACHE_VERSION and data.get("code") == self.code:
                self.data = data
            else:
                n = sum(len(v) for v in data.get("settings", {}).values())
                log.warning("llmaccel anda: ignoring %d cached evaluations in %s: made by other code "
                            "(version %s, code %s; this is version %s, code %s); the file will be rewritten",
                            n, self.path, data.get("version"), data.get("code"), CACHE_VERSION, self.code)

    def get(self, setting: str, key: str) -> dict | None:
        return self.data["settings"].get(setting, {}).get(key)

    def put(self, setting: str, key: str, record: dict) -> None:
        self.data["settings"].setdefault(setting, {})[key] = record
        if self.path:
            tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
            with open(tmp, "w") as f:
                json.dump(self.data, f, indent=1)
            os.replace(tmp, self.path)


class RetargetBackend:
    """Dynamo backend: every captured graph goes to :func:`llm_compile.backend.llmaccel` with the
    current options; :meth:`set` re-runs the backend (AOTAutograd + the pass pipeline) on the captured
    Dynamo graphs with new options, without tracing the model again. Dynamo's graph does not depend
    on the backend options, so this gives the graphs a fresh ``torch.compile`` would."""

    def __init__(self, options: dict):
        self.options, self.graphs = options, []

    def __call__(self, gm, example_inputs):
        from llm_compile.backend import llmaccel

        entry = [gm, list(example_inputs), llmaccel(gm, example_inputs, options=self.options)]
        self.graphs.append(entry)
        return lambda *args: entry[2](*args)

    def set(self, options: dict) -> None:
        from llm_compile.backend import llmaccel

        if options != self.options:
            self.options = options
            with torch.no_grad():
                for entry in self.graphs:
                    entry[2] = llmaccel(entry[0], entry[1], options=options)


class Evaluator:
    """Perplexity of the quantized model on fixed tokens, with Anda widths, memoised in ``cache``."""

    def __init__(self, model, input_ids: torch.Tensor, *, context: int, stride: int | None = None,
                 mode: str = "compile", kernel: str = "reference", cache: EvalCache | None = None,
                 setting: dict | None = None, progress: bool = False, parts: int = 1):
        """``mode``: ``compile`` (backend per candidate on one Dynamo trace), ``recompile`` (a fresh
        ``torch.compile`` per candidate), ``eager`` (``QuantLinear`` calls the op; no compile).
        ``parts`` > 1: every record also holds ``"parts"``, the perplexity of each of ``parts``
        contiguous parts of the tokens (:func:`part_bounds`), and the cache setting names ``parts``
        (with 1, records and keys are as before)."""
        if mode not in MODES:
            raise ValueError(f"evaluator mode {mode!r} not in {MODES}")
        self.model, self.ids, self.context = model, input_ids, context
        self.stride = stride or context
        self.mode, self.kernel, self.progress = mode, kernel, progress
        self.cache = cache or EvalCache(None)
        self.parts = parts
        self.bounds = part_bounds(int(input_ids.shape[1]), parts)
        extra = {"parts": parts} if parts > 1 else {}
        self.setting = json.dumps(dict(setting or {}, tokens=int(input_ids.shape[1]), context=context,
                                       stride=self.stride, kernel=kernel, **extra), sort_keys=True)
        self.hits = self.misses = 0
        self.last: dict = {}
        self._backend: RetargetBackend | None = None

    def _ppl(self) -> tuple[float, dict]:
        """``(ppl, {"parts": [...]})`` with parts, ``(ppl, {})`` without."""
        from llm_compile.eval.metrics import perplexity

        r = perplexity(self.model, self.ids, context=self.context, stride=self.stride,
                       progress=self.progress, return_nll=self.parts > 1)
        if self.parts == 1:
            return r["ppl"], {}
        return r["ppl"], {"parts": part_perplexities(r["nll_per_token"], self.bounds)}

    def _cached(self, key: str, fn) -> float:
        rec = self.cache.get(self.setting, key)
        if rec is not None:
            self.hits += 1
            self.last = dict(rec, cached=True)
            return rec["ppl"]
        self.misses += 1
        t0 = time.perf_counter()
        ppl, extra = fn()
        rec = {"ppl": ppl, "seconds": round(time.perf_counter() - t0, 2), **extra}
        self.cache.put(self.setting, key, rec)
        self.last = dict(rec, cached=False)
        return ppl

    def reference(self) -> float:
        """W4A16 reference: the quantized model, eager (``QuantLinear``: float activations)."""
        def run():
            self.close()
            return self._ppl()
        return self._cached("w4a16", run)

    def __call__(self, widths) -> float:
        w = kind_widths(widths)
        uni = anda_widths.uniform_kind_dict(w)
        if uni is not None:          # same key as a per-kind tuple: layer-band runs reuse its evaluations
            w = uni
            key = json.dumps({"mode": self.mode, "widths": [w[k] for k in ANDA_MODULE_KINDS]})
        else:
            key = json.dumps({"mode": self.mode, "layers": [[e[k] for k in ANDA_MODULE_KINDS] for e in w]})
        return self._cached(key, lambda: self._run(w))

    def _run(self, w) -> tuple[float, dict]:
        from llm_compile.backend import COMPILED
        from llm_compile.eval.model import compile_model, uncompile_model

        if self.mode == "eager":
            with anda_eager(self.model, w, self.kernel) as n:
                ppl, extra = self._ppl()
                return ppl, {"lowered": n, **extra}
        before = {r["graph_id"] for r in COMPILED}
        if self.mode == "recompile":
            compile_model(self.model, anda_options(w, self.kernel))
            try:
                ppl, extra = self._ppl()
            finally:
                uncompile_model(self.model)
        else:
            if self._backend is None:
                uncompile_model(self.model)
                self._backend = RetargetBackend(anda_options(w, self.kernel))
                self.model.forward = torch.compile(self.model.forward, backend=self._backend)
            self._backend.set(anda_options(w, self.kernel))
            ppl, extra = self._ppl()
        new = [r for r in COMPILED if r["graph_id"] not in before]
        return ppl, {"lowered": lowered_count(new), "graphs": len(new), **extra}

    def close(self) -> None:
        """Restore the model's eager forward."""
        from llm_compile.eval.model import uncompile_model

        uncompile_model(self.model)
        self._backend = None
