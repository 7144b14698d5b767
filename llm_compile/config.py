"""Backend options as frozen dataclasses.

``torch.compile(fn, backend="llmaccel", options={...})`` hands a plain dict to the backend;
:func:`parse_options` turns it into an :class:`LLMAccelConfig` or raises :class:`OptionsError`
naming the valid keys. A pass section is on when its key is present (a dict, or ``True`` for the
defaults) and off when absent, ``None`` or ``False``.

Example::

    {"swa": {"sparsity": 0.8}, "anda": {"mantissa_bits": 7}, "inner": "eager",
     "debug_dir": "/tmp/dump"}
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping


class OptionsError(ValueError):
    """An unknown option key or a bad option value."""


ANDA_MODULE_KINDS = ("qkv", "o", "gate_up", "down")


@dataclass(frozen=True)
class SWAConfig:
    """Sparse window attention (ALISA). Budget per decode step: ``k = round(n*(1-sparsity)/2)``."""

    sparsity: float = 0.8
    """Fraction of the KV cache *not* attended at a decode step (0 = dense, exact)."""
    recent_fraction: float = 0.5
    """Share of the total budget ``2k`` kept as the most recent tokens (ALISA: half)."""
    score_window: int | None = None
    """Decode steps whose attention weights are summed into the scores; ``None`` = ``k`` (ALISA)."""
    selection: str = "layer"
    """``"layer"``: one token set per layer, scores summed over heads (ALISA); ``"kv_head"``: per KV head."""
    sink_tokens: int = 0
    """First tokens always kept (StreamingLLM's attention sinks); taken from the budget."""
    policy: str = "alisa"
    """``"alisa"`` (recent + top-k by windowed scores), ``"streaming"`` (sinks + recent only),
    ``"h2o"`` (recent + top-k by scores accumulated over the whole history)."""
    bucket: int = 64
    """Budgets are rounded up to multiples of this (masked) so decode does not recompile."""
    kernel: str = "auto"
    """``"torch"`` (gather + SDPA), ``"triton"`` (fused gather/attend/score kernel), ``"auto"``
    (Triton on GPU, torch on CPU)."""


@dataclass(frozen=True)
class AndaConfig:
    """Anda activations (group-shared exponent, M-bit mantissa) for FP-INT matmuls."""

    mantissa_bits: Any = 7
    """One int 1..16 for every module kind, or a dict over ``qkv, o, gate_up, down``."""
    group_size: int = 64
    """Activation group along K sharing one exponent (Anda: 64)."""
    kernel: str = "triton"
    """``"triton"`` (generated kernels; interpreted on CPU) or ``"reference"`` (torch math)."""

    def bits_for(self, kind: str) -> int:
        if isinstance(self.mantissa_bits, Mapping):
            return int(self.mantissa_bits[kind])
        return int(self.mantissa_bits)


@dataclass(frozen=True)
class OffloadConfig:
    """Attention offload (Lamina) to attention workers holding the KV cache."""

    workers: int = 2
    """Number of local attention worker processes to spawn (KV split by KV head)."""
    timeout_s: float = 60.0
    """A worker that does not answer within this many seconds raises an error (no hang)."""
    overlap: bool = False
    """Two micro-batches in ping-pong so attention overlaps the rest of the model."""
    transport: str = "auto"
    """``"gloo"``, ``"nccl"`` or ``"auto"`` (NCCL for CUDA tensors, gloo otherwise)."""
    init_method: str | None = None
    """Join an existing ``torch.distributed`` group (workers started with ``torchrun``) instead of
    spawning a local pool, e.g. ``"tcp://10.0.0.1:29500"``."""


@dataclass(frozen=True)
class KVStoreConfig:
    """In-process KV store: attention sites keep their KV cache in preallocated buffers appended in
    place (the model's cache holds zero-memory phantoms), instead of HF's per-step ``torch.cat``."""

    reserve_tokens: int = 256
    """Free token slots allocated after the prompt at prefill (decode appends need no copy until full)."""
    growth: float = 1.5
    """When full, the buffers grow to this factor times their capacity (one copy per growth)."""


@dataclass(frozen=True)
class LLMAccelConfig:
    swa: SWAConfig | None = None
    """Sparse window attention; off unless given."""
    anda: AndaConfig | None = None
    """Anda lowering of FP-INT matmuls; off unless given."""
    offload: OffloadConfig | None = None
    """Attention offload; off unless given."""
    kv_store: KVStoreConfig | None = None
    """In-process in-place KV store: on by default with `swa` (not with `offload`), else off unless given; `False` turns it off."""
    canonicalize: bool = True
    """Rewrite attention sites to ``llmaccel::attention`` (needed by swa/offload)."""
    inner: str = "inductor"
    """What compiles the rewritten graph: ``"inductor"`` (``compile_fx_inner``) or ``"eager"``."""
    debug_dir: str | None = None
    """Write a per-graph debug dump here (also ``LLMACCEL_DEBUG``)."""
    debug_passes: tuple[str, ...] | None = None
    """Only dump the stages of these passes (names as in ``passes.json``); ``None`` = all."""


_SECTIONS = {"swa": SWAConfig, "anda": AndaConfig, "offload": OffloadConfig, "kv_store": KVStoreConfig}
_CHOICES = {
    ("swa", "selection"): ("layer", "kv_head"),
    ("swa", "policy"): ("alisa", "streaming", "h2o"),
    ("swa", "kernel"): ("auto", "torch", "triton"),
    ("anda", "kernel"): ("triton", "reference"),
    ("offload", "transport"): ("auto", "gloo", "nccl"),
    ("", "inner"): ("inductor", "eager"),
}


def _names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def _check_keys(where: str, given: Mapping, cls) -> None:
    unknown = sorted(set(given) - set(_names(cls)))
    if unknown:
        raise OptionsError(
            f"llmaccel: unknown option{'s' if len(unknown) > 1 else ''} {unknown} in {where}; "
            f"valid keys: {_names(cls)}"
        )


def _check_value(section: str, key: str, value: Any) -> None:
    choices = _CHOICES.get((section, key))
    if choices is not None and value not in choices:
        where = f"{section}.{key}" if section else key
        raise OptionsError(f"llmaccel: option {where}={value!r} is not one of {list(choices)}")


def _validate_swa(c: SWAConfig) -> None:
    if not 0.0 <= c.sparsity < 1.0:
        raise OptionsError(f"llmaccel: swa.sparsity={c.sparsity} must be in [0, 1)")
    if not 0.0 <= c.recent_fraction <= 1.0:
        raise OptionsError(f"llmaccel: swa.recent_fraction={c.recent_fraction} must be in [0, 1]")
    if c.score_window is not None and c.score_window < 1:
        raise OptionsError("llmaccel: swa.score_window must be a positive int or None")
    if c.sink_tokens < 0 or c.bucket < 1:
        raise OptionsError("llmaccel: swa.sink_tokens must be >= 0 and swa.bucket >= 1")


def _validate_anda(c: AndaConfig) -> None:
    bits = c.mantissa_bits
    if isinstance(bits, Mapping):
        missing = sorted(set(ANDA_MODULE_KINDS) - set(bits))
        extra = sorted(set(bits) - set(ANDA_MODULE_KINDS))
        if missing or extra:
            raise OptionsError(
                f"llmaccel: anda.mantissa_bits dict needs exactly the keys {list(ANDA_MODULE_KINDS)}"
                f" (missing {missing}, unknown {extra})"
            )
        values = list(bits.values())
    else:
        values = [bits]
    for b in values:
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 16:
            raise OptionsError(f"llmaccel: anda.mantissa_bits values must be ints in 1..16, got {b!r}")
    if c.group_size != 64:
        raise OptionsError("llmaccel: anda.group_size must be 64 (the Anda format's group)")


def _validate_offload(c: OffloadConfig) -> None:
    # -- offload option types (engineer C; kept in one block) --
    if isinstance(c.workers, bool) or not isinstance(c.workers, int) or c.workers < 1:
        raise OptionsError(f"llmaccel: offload.workers={c.workers!r} must be an int >= 1")
    if isinstance(c.timeout_s, bool) or not isinstance(c.timeout_s, (int, float)) or not c.timeout_s > 0:
        raise OptionsError(f"llmaccel: offload.timeout_s={c.timeout_s!r} must be a number > 0 (seconds)")
    if not isinstance(c.overlap, bool):
        raise OptionsError(f"llmaccel: offload.overlap={c.overlap!r} must be True or False")
    if c.init_method is not None and (not isinstance(c.init_method, str) or "://" not in c.init_method):
        raise OptionsError(f"llmaccel: offload.init_method={c.init_method!r} must be None (local workers) or "
                           "a torch.distributed init method such as 'tcp://HOST:PORT'")


def _validate_kv_store(c: KVStoreConfig) -> None:
    if isinstance(c.reserve_tokens, bool) or not isinstance(c.reserve_tokens, int) or c.reserve_tokens < 0:
        raise OptionsError(f"llmaccel: kv_store.reserve_tokens={c.reserve_tokens!r} must be an int >= 0")
    if not isinstance(c.growth, (int, float)) or isinstance(c.growth, bool) or not c.growth > 1.0:
        raise OptionsError(f"llmaccel: kv_store.growth={c.growth!r} must be a number > 1")


_VALIDATORS = {"swa": _validate_swa, "anda": _validate_anda, "offload": _validate_offload,
               "kv_store": _validate_kv_store}


def _section(name: str, value: Any):
    cls = _SECTIONS[name]
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if isinstance(value, cls):
        cfg = value
    elif isinstance(value, Mapping):
        _check_keys(f"options[{name!r}]", value, cls)
        for k, v in value.items():
            _check_value(name, k, v)
        try:
            cfg = cls(**value)
        except TypeError as e:  # pragma: no cover - keys already checked
            raise OptionsError(f"llmaccel: bad options[{name!r}]: {e}") from None
    else:
        raise OptionsError(
            f"llmaccel: options[{name!r}] must be a dict, True/False or None, got {type(value).__name__}"
        )
    _VALIDATORS[name](cfg)
    return cfg


def parse_options(options: Mapping[str, Any] | LLMAccelConfig | None) -> LLMAccelConfig:
    """Validate ``options`` and return the frozen config (``LLMACCEL_DEBUG`` fills ``debug_dir``)."""
    if isinstance(options, LLMAccelConfig):
        cfg = options
    else:
        options = dict(options or {})
        _check_keys("options", options, LLMAccelConfig)
        kw: dict[str, Any] = {}
        for k, v in options.items():
            if k in _SECTIONS:
                kw[k] = _section(k, v)
            else:
                _check_value("", k, v)
                kw[k] = v
        if "debug_passes" in kw and kw["debug_passes"] is not None:
            if isinstance(kw["debug_passes"], str):
                kw["debug_passes"] = (kw["debug_passes"],)
            kw["debug_passes"] = tuple(kw["debug_passes"])
        if "canonicalize" in kw and not isinstance(kw["canonicalize"], bool):
            raise OptionsError("llmaccel: option canonicalize must be True or False")
        if "kv_store" not in options and kw.get("swa") is not None and kw.get("offload") is None:
            kw["kv_store"] = KVStoreConfig()  # SWA's speed needs the in-place cache (README: kv_store)
        cfg = LLMAccelConfig(**kw)
    if cfg.debug_dir is None and os.environ.get("LLMACCEL_DEBUG"):
        cfg = dataclasses.replace(cfg, debug_dir=os.environ["LLMACCEL_DEBUG"])
    if (cfg.swa or cfg.offload or cfg.kv_store) and not cfg.canonicalize:
        raise OptionsError("llmaccel: swa, offload and kv_store need canonicalize=True (they rewrite "
                           "llmaccel::attention)")
    if cfg.kv_store and cfg.offload:
        raise OptionsError("llmaccel: kv_store and offload both take the KV cache out of the model; "
                           "under offload it already lives in the attention workers (appended in place "
                           "there): drop kv_store")
    _validate_swa_offload(cfg)
    return cfg


def _validate_swa_offload(cfg: LLMAccelConfig) -> None:
    """swa + offload: the workers run SWA on their KV heads only. ``selection="layer"`` ranks tokens
    by scores summed over *all* heads of a layer, which no single worker sees when the heads are
    split over several workers: refuse rather than silently select different tokens."""
    s, o = cfg.swa, cfg.offload
    if s is None or o is None or o.workers == 1:
        return
    if s.selection == "layer" and s.sparsity > 0 and s.policy != "streaming":
        raise OptionsError(
            f"llmaccel: swa.selection='layer' with offload.workers={o.workers}: each attention worker "
            "holds only its KV heads, so it cannot sum token scores over all heads of a layer (ALISA's "
            "per-layer selection); use swa.selection='kv_head' (per-KV-head token sets) or "
            "offload.workers=1")


def describe_options() -> list[tuple[str, str, str]]:
    """(key, default, doc) rows for every option; used to keep the README table honest."""
    import inspect

    rows = []

    def doc_of(cls, name):
        src = inspect.getsource(cls).splitlines()
        for i, line in enumerate(src):
            if line.strip().startswith(f"{name}:"):
                out = []
                for nxt in src[i + 1:]:
                    s = nxt.strip()
                    if s.startswith('"""'):
                        out.append(s.strip('"'))
                        if s.endswith('"""') and len(s) > 3:
                            break
                    elif out:
                        out.append(s.strip('"'))
                        if s.endswith('"""'):
                            break
                    else:
                        break
                return " ".join(x for x in out if x)
        return ""

    for f in fields(LLMAccelConfig):
        if f.name in _SECTIONS:
            for g in fields(_SECTIONS[f.name]):
                rows.append((f"{f.name}.{g.name}", repr(g.default), doc_of(_SECTIONS[f.name], g.name)))
        else:
            rows.append((f.name, repr(f.default), doc_of(LLMAccelConfig, f.name)))
    return rows


def options_table() -> str:
    """The README's options table (markdown)."""
    lines = ["| option | default | meaning |", "|---|---|---|"]
    for key, default, doc in describe_options():
        lines.append(f"| `{key}` | `{default}` | {doc.replace('``', '`')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(options_table())
