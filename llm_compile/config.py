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
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping


from llm_compile import anda_widths
from llm_compile.anda_widths import ANDA_MODULE_KINDS
from llm_compile.option_rules import OptionsError, Rule

__all__ = ["OptionsError", "LLMAccelConfig", "SWAConfig", "AndaConfig", "OffloadConfig", "KVStoreConfig",
           "KVTiersConfig", "parse_options", "POLICY_DEFAULTS", "RULES", "SECTIONS", "STAGE_NAMES"]


POLICY_DEFAULTS: dict[str, dict[str, Any]] = {
    "alisa": {"sink_tokens": 0},
    "streaming": {"sink_tokens": 4},
    "h2o": {"sink_tokens": 0},
    "quest": {"sink_tokens": 0, "scorer": "pages"},
    "recall": {"sink_tokens": 0, "scorer": "sketch"},
    "oracle": {"sink_tokens": 0},
}
"""Per SWA policy, the values that give its published form where the user leaves them unset
(``None``): StreamingLLM keeps 4 attention sinks; ALISA and H2O keep none; Quest scores pages;
``recall`` scores tokens with the key sketch (+1.3 % over dense at 0.8 on continuation perplexity,
against +9.1 % with page bounds: README, "Query-aware SWA"). A user value wins."""


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
    sink_tokens: int | None = None
    """First tokens always kept (StreamingLLM's attention sinks); taken from the budget. ``None``:
    the policy's published default (``streaming``: 4, StreamingLLM; ``alisa``, ``h2o``: 0)."""
    policy: str = "alisa"
    """``"alisa"`` (recent + top-k by windowed scores), ``"streaming"`` (sinks + recent only),
    ``"h2o"`` (recent + top-k by scores accumulated over the whole history), ``"quest"`` (pages picked
    by the current query from per-page key min/max), ``"recall"`` (ALISA's recent + history tokens plus
    tokens picked by the current query from a 2-bit key sketch, or pages: ``scorer``), ``"oracle"`` (exact top-k of the current query; reads every key: analysis only)."""
    bucket: int = 64
    """Budgets are rounded up to multiples of this (masked) so decode does not recompile."""
    kernel: str = "auto"
    """``"torch"`` (gather + SDPA), ``"triton"`` (fused gather/attend/score kernel), ``"auto"``
    (Triton on GPU, torch on CPU)."""
    # --- issue 15: query-aware recall ---------------------------------------------------------------
    page_size: int = 16
    """Tokens per page of the key summaries (elementwise min/max of keys) that ``quest``/``recall`` score against the query (Quest: 16). The summaries count in the budget."""
    query_fraction: float = 0.5
    """``recall``: share of the attended rows picked by the query (by the scorer); the rest is split recent/history as ``alisa`` (``recent_fraction``)."""
    scorer: str | None = None
    """How ``recall`` scores tokens for the current query: ``"pages"`` (Quest's per-page key min/max bound, whole pages taken) or ``"sketch"`` (a ``sketch_bits``-bit copy of the keys, per channel over ``sketch_block``-token blocks: every token scored). Either counts in the budget. ``None``: the policy's default (``quest``: ``"pages"``, its definition; ``recall``: ``"sketch"``)."""
    sketch_bits: int = 2
    """Bits per key value of the ``"sketch"`` scorer: 1, 2, 4 or 8 (packed ``8 // bits`` per byte)."""
    sketch_block: int = 64
    """Tokens per block of the ``"sketch"`` scorer (one float16 minimum and step per block and channel); a multiple of ``8 // sketch_bits``."""
    seed: str = "window"
    """How prefill seeds the history scores: ``"window"`` (attention of the last prompt rows, as many as the score window) or ``"snapkv"`` (SnapKV: the last 32 prompt rows, each max-pooled over 7 neighbouring tokens)."""
    # --- issue 17 (engineer F): never slower than dense at short context ----------------------
    min_context: int = 0
    """Below this many tokens a sequence runs a dense graph compiled alongside the SWA one (stock Inductor speed; the first call at or past it adopts the cache and starts the scores); 0 = off: sparse whenever the budget is below the context. Short prompts: set it (e.g. 4096; README: Short context)."""
    # --- end issue 17 ------------------------------------------------------------------------------

    def __post_init__(self):
        defaults = POLICY_DEFAULTS.get(self.policy, {})
        if self.sink_tokens is None:  # the policy's published form (POLICY_DEFAULTS)
            object.__setattr__(self, "sink_tokens", defaults.get("sink_tokens", 0))
        if self.scorer is None:
            object.__setattr__(self, "scorer", defaults.get("scorer", "pages"))
        if 8 % self.sketch_bits:
            raise OptionsError(f"llmaccel: swa.sketch_bits={self.sketch_bits}: use 1, 2, 4 or 8 (the sketch "
                               "packs 8 // bits codes per byte)")
        if self.sketch_block % (8 // self.sketch_bits):
            raise OptionsError(f"llmaccel: swa.sketch_block={self.sketch_block} with sketch_bits="
                               f"{self.sketch_bits}: use a multiple of {8 // self.sketch_bits} (the codes of "
                               "a block are packed 8 // bits per byte); the CPU kernel's fast path wants a "
                               f"multiple of {16 * (8 // self.sketch_bits)}")
        if self.policy == "quest" and self.scorer != "pages":
            raise OptionsError(f"llmaccel: swa.policy='quest' with scorer={self.scorer!r}: quest is Quest's "
                               "page method (scorer 'pages'); use policy 'recall' for the key sketch")


@dataclass(frozen=True)
class AndaConfig:
    """Anda activations (group-shared exponent, M-bit mantissa) for FP-INT matmuls."""

    mantissa_bits: Any = 7
    """One int 1..16 for every linear, a dict over ``qkv, o, gate_up, down``, or a list with one int or such dict per decoder layer (layer-band search output; see `llm_compile.anda_widths`)."""
    group_size: int = 64
    """Activation group along K sharing one exponent (Anda: 64)."""
    kernel: str = "triton"
    """``"triton"`` (generated kernels; interpreted on CPU) or ``"reference"`` (torch math)."""

    def bits_for(self, kind: str, layer: int | None = None) -> int:
        """Width of a linear of ``kind`` in decoder ``layer``; ``LookupError`` (with the reason) when
        a per-layer value has no entry for it (:func:`llm_compile.anda_widths.bits_for`)."""
        return anda_widths.bits_for(self.mantissa_bits, kind, layer)


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
class KVTiersConfig:
    """ALISA's system level: each site's KV in tiers (model device -> host memory), placed by a
    plan (p1, p2, alpha, beta) from a cost model measured on the machine (README: KV tiers)."""

    device_budget: int = 512 * 1024 * 1024
    """Bytes of KV (all layers, whole batch) kept on the model's device; past that (p1) rows move to the host tier."""
    host_budget: int | None = None
    """Bytes the host tier may hold (all layers): KV rows and, with phase 3, the kept layer inputs (the plan leaves them room up to max_context); `None` = unlimited. Past the host's KV share (p2) phase 3 (recompute, MHA models) takes the new tokens; what does not fit raises `HostTierFullError`."""
    mmap_dir: str | None = None
    """CPU models only: the host tier is a memory-mapped file in this folder (KV larger than RAM); deleted with the cache. `None`: host RAM (pinned for CUDA models)."""
    recent: int = 64
    """Most recent tokens of each layer that always stay on the device."""
    max_context: int = 8192
    """Context the plan is made for: alpha is the smallest host share that fits the budget there (longer: the oldest device rows spill), and host_budget keeps room for phase 3's kept rows up to it (longer: `HostTierFullError` once they fill it)."""
    recompute: str = "auto"
    """Phase 3: `"auto"` (the plan decides beta and says why: recompute only where it frees memory, i.e. MHA) or `"off"` (beta = 0)."""
    p1: int | None = None
    """Override the plan: tokens kept all on the device before rows move to the host (`None`: from the budget)."""
    p2: int | None = None
    """Override the plan: tokens after which recompute starts (`None`: from `host_budget`)."""
    alpha: float | None = None
    """Override the plan: share of the tokens outside the recent window that move to the host past p1 (`None`: planned)."""
    beta: float | None = None
    """Override the plan: share of the tokens decided past p2 that keep only their layer input and are recomputed when selected (needs `host_budget` or `p2`; refused where recompute frees no memory: GQA) (`None`: planned)."""
    prefetch: bool = True
    """Gather the host rows of a step on a worker thread (CUDA: a side stream) while the device rows are gathered."""
    cost_cache_dir: str | None = None
    """Folder of the measured cost model (JSON per machine and model shape); `None`: `~/.cache/llm_compile/kv_tiers`."""


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
    kv_tiers: KVTiersConfig | None = None
    """Tiered KV (device -> host, ALISA's three phases) inside the KV store; off unless given; turns `kv_store` on."""
    canonicalize: bool | None = None
    """Rewrite attention sites to ``llmaccel::attention``: on when swa, kv_store or offload is on (they need it), else off, so that `{}` is stock Inductor; `True` forces it (e.g. to see the canonical graph in a dump)."""
    decode_matmul: bool = False
    """CPU: rewrite decode matmuls (<= 16 rows, float32) as ``(W @ x^T)^T`` where that form is measured faster on this machine (e.g. SmolLM2's lm_head 2x); outputs differ from eager by float rounding, hence off unless asked for."""
    inner: str = "inductor"
    """What compiles the rewritten graph: ``"inductor"`` (Inductor's ``compile_fx``, our passes in its post-grad hook) or ``"eager"``."""
    # --- issue 17 (engineer F): Inductor mode as an option -------------------------------------
    mode: str | None = None
    """Inductor mode (`"reduce-overhead"`, `"max-autotune"`, ...), as `torch.compile(mode=...)`, which torch.compile does not allow together with `options=`."""
    # --- end issue 17 ------------------------------------------------------------------------------
    debug_dir: str | None = None
    """Write a per-graph debug dump here (also ``LLMACCEL_DEBUG``)."""
    debug_passes: tuple[str, ...] | None = None
    """Only dump the stages of these passes (names as in ``passes.json``); ``None`` = all."""


SECTIONS = {"swa": SWAConfig, "anda": AndaConfig, "offload": OffloadConfig, "kv_store": KVStoreConfig,
             "kv_tiers": KVTiersConfig}

STAGE_NAMES = ("dynamo", "aten", "canonicalize_attention", "sparse_window_attention", "anda_lowering",
               "decode_matmul", "local_kv_store", "attention_offload")
"""Stages a debug dump can hold: the Dynamo and ATen graphs, then every pass of
``llm_compile.passes.pipeline.PIPELINE`` (a test keeps the two lists equal)."""


INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""``mode=`` values handed to Inductor (``torch.compile(mode=...)`` or ``options={"mode": ...}``)."""

RULES: dict[str, Rule] = {
    "swa.sparsity": Rule.float_(0, 1, hi_open=True),
    "swa.recent_fraction": Rule.float_(0, 1),
    "swa.score_window": Rule.int_(lo=1, optional=True),
    "swa.selection": Rule.choice("layer", "kv_head"),
    "swa.sink_tokens": Rule.int_(lo=0, optional=True),
    "swa.policy": Rule.choice(*POLICY_DEFAULTS),
    "swa.bucket": Rule.int_(lo=1),
    "swa.kernel": Rule.choice("auto", "torch", "triton"),
    "swa.min_context": Rule.int_(lo=0),
    "swa.page_size": Rule.int_(lo=1),
    "swa.query_fraction": Rule.float_(0, 1),
    "swa.seed": Rule.choice("window", "snapkv"),
    "swa.scorer": Rule.choice("pages", "sketch", optional=True),
    "swa.sketch_bits": Rule.int_(1, 8),
    "swa.sketch_block": Rule.int_(lo=2),
    "anda.mantissa_bits": Rule(anda_widths.TEXT, anda_widths.type_ok, anda_widths.normalise),
    "anda.group_size": Rule.int_(64, 64),
    "anda.kernel": Rule.choice("triton", "reference"),
    "offload.workers": Rule.int_(lo=1),
    "offload.timeout_s": Rule.float_(lo=0, lo_open=True),
    "offload.overlap": Rule.bool_(),
    "offload.transport": Rule.choice("auto", "gloo", "nccl"),
    "offload.init_method": Rule.url(("tcp", "env", "file")),
    "kv_store.reserve_tokens": Rule.int_(lo=0),
    "kv_store.growth": Rule.float_(lo=1, lo_open=True),
    "kv_tiers.device_budget": Rule.int_(lo=1, note=" (bytes)"),
    "kv_tiers.host_budget": Rule.int_(lo=1, optional=True, note=" (bytes)"),
    "kv_tiers.mmap_dir": Rule.path(),
    "kv_tiers.recent": Rule.int_(lo=1),
    "kv_tiers.max_context": Rule.int_(lo=2),
    "kv_tiers.recompute": Rule.choice("auto", "off"),
    "kv_tiers.p1": Rule.int_(lo=1, optional=True),
    "kv_tiers.p2": Rule.int_(lo=1, optional=True),
    "kv_tiers.alpha": replace(Rule.float_(0, 1), optional=True, text=Rule.float_(0, 1).text + " or None"),
    "kv_tiers.beta": replace(Rule.float_(0, 1), optional=True, text=Rule.float_(0, 1).text + " or None"),
    "kv_tiers.prefetch": Rule.bool_(),
    "kv_tiers.cost_cache_dir": Rule.path(),
    "canonicalize": Rule.bool_(optional=True),
    "decode_matmul": Rule.bool_(),
    "inner": Rule.choice("inductor", "eager"),
    "mode": replace(Rule.choice(*INDUCTOR_MODES), optional=True,
                    text=Rule.choice(*INDUCTOR_MODES).text + " or None"),
    "debug_dir": Rule.path(),
    "debug_passes": Rule.names(STAGE_NAMES),
}
"""One rule per option key (``section.key`` or top-level key); every dataclass field has one."""


def _names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def _check_keys(where: str, given: Mapping, cls) -> None:
    bad = [k for k in given if not isinstance(k, str)]
    unknown = sorted(set(given) - set(_names(cls)) - set(bad)) + [repr(k) for k in bad]
    if unknown:
        raise OptionsError(
            f"llmaccel: unknown option{'s' if len(unknown) > 1 else ''} {unknown} in {where}; "
            f"valid keys: {_names(cls)}"
        )


def _checked(cls, prefix: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """Every field of ``cls``: the given value (or the default), checked and normalised."""
    out = {}
    for f in fields(cls):
        if f.name in SECTIONS:
            continue
        value = given[f.name] if f.name in given else f.default
        out[f.name] = RULES[prefix + f.name].check(prefix + f.name, value)
    return out


def _section(name: str, value: Any):
    cls = SECTIONS[name]
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if isinstance(value, cls):
        value = {f.name: getattr(value, f.name) for f in fields(cls)}
    elif isinstance(value, Mapping):
        _check_keys(f"options[{name!r}]", value, cls)
    else:
        raise OptionsError(
            f"llmaccel: option {name}={value!r} ({type(value).__name__}) has the wrong type; expected "
            f"a dict of {name} options, True (defaults), False or None (off)")
    return cls(**_checked(cls, f"{name}.", value))


def parse_options(options: Mapping[str, Any] | LLMAccelConfig | None) -> LLMAccelConfig:
    """Check ``options`` (keys, types, ranges) and return the frozen config (``LLMACCEL_DEBUG`` fills
    ``debug_dir``). Any problem raises one :class:`OptionsError` naming the key, value and expected type."""
    if isinstance(options, LLMAccelConfig):
        options = {f.name: getattr(options, f.name) for f in fields(LLMAccelConfig)}
        explicit_kv = True
    elif options is None or isinstance(options, Mapping):
        options = dict(options or {})
        explicit_kv = "kv_store" in options
    else:
        raise OptionsError(f"llmaccel: options={options!r} ({type(options).__name__}) has the wrong type; "
                           "expected a dict such as {\"swa\": {\"sparsity\": 0.8}} (or an LLMAccelConfig)")
    _check_keys("options", options, LLMAccelConfig)
    kw: dict[str, Any] = {k: _section(k, options.get(k)) for k in SECTIONS}
    if not explicit_kv and kw["kv_tiers"] is not None and kw["offload"] is None:
        kw["kv_store"] = KVStoreConfig()  # the tiers live inside the in-place store
    if not explicit_kv and kw["swa"] is not None and kw["offload"] is None:
        kw["kv_store"] = KVStoreConfig()  # SWA's speed needs the in-place cache (README: kv_store)
    if options.get("debug_dir") is None and os.environ.get("LLMACCEL_DEBUG"):
        options["debug_dir"] = os.environ["LLMACCEL_DEBUG"]
    kw.update(_checked(LLMAccelConfig, "", options))
    needs_canonical = bool(kw["swa"] or kw["offload"] or kw["kv_store"])
    if kw.get("canonicalize") is None:  # auto: only when a pass needs the canonical op (issue 17)
        kw["canonicalize"] = needs_canonical
    cfg = LLMAccelConfig(**kw)
    if needs_canonical and not cfg.canonicalize:
        raise OptionsError("llmaccel: swa, offload and kv_store need canonicalize=True (they rewrite "
                           "llmaccel::attention)")
    if cfg.kv_store and cfg.offload:
        raise OptionsError("llmaccel: kv_store and offload both take the KV cache out of the model; "
                           "under offload it already lives in the attention workers (appended in place "
                           "there): drop kv_store")
    _validate_swa_offload(cfg)
    _validate_tiers(cfg)
    return cfg


def _validate_tiers(cfg: LLMAccelConfig) -> None:
    """kv_tiers: needs the in-place store, and its plan overrides must agree with each other."""
    t = cfg.kv_tiers
    if t is None:
        return
    if cfg.offload is not None:
        raise OptionsError("llmaccel: kv_tiers and offload both place the KV cache; under offload it lives "
                           "in the attention workers: drop kv_tiers (or offload)")
    if cfg.kv_store is None:
        raise OptionsError("llmaccel: kv_tiers keeps the KV in tiers inside the in-place store: it needs "
                           "kv_store; drop \"kv_store\": False")
    if t.p1 is not None and t.p2 is not None and t.p2 < t.p1:
        raise OptionsError(f"llmaccel: kv_tiers.p2={t.p2} < kv_tiers.p1={t.p1}: phase 3 (recompute) starts "
                           "after phase 2 (host); give p2 >= p1")
    if t.p1 is not None and t.p1 <= t.recent:
        raise OptionsError(f"llmaccel: kv_tiers.p1={t.p1} <= kv_tiers.recent={t.recent}: the recent window "
                           "always stays on the device, so p1 must be larger; lower recent or raise p1")
    if t.beta and t.host_budget is None and t.p2 is None:
        raise OptionsError(f"llmaccel: kv_tiers.beta={t.beta}: phase 3 (recompute) starts at p2, which comes from "
                           "host_budget: give kv_tiers.host_budget (or p2), or drop beta")
    if t.beta and t.recompute == "off":
        raise OptionsError(f"llmaccel: kv_tiers.beta={t.beta} with recompute='off': drop one of them")
    s = cfg.swa
    if s is not None and s.policy in ("quest", "recall", "oracle") and not (
            s.policy == "recall" and s.scorer == "sketch"):
        what = "reads every key" if s.policy == "oracle" else "reads page summaries built from every key"
        raise OptionsError(f"llmaccel: kv_tiers with swa.policy={s.policy!r} (scorer {s.scorer!r}): it {what}, "
                           "which the tiers do not keep; use policy 'recall' with scorer 'sketch' (the "
                           "sketch lives on the device, the KV in the tiers), or 'alisa', 'h2o', "
                           "'streaming', or drop kv_tiers")
    if t.mmap_dir is not None and not os.path.isdir(t.mmap_dir):
        raise OptionsError(f"llmaccel: kv_tiers.mmap_dir={t.mmap_dir!r} is not an existing folder; create it "
                           "(on a local disk) or drop mmap_dir to keep the host tier in RAM")


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
