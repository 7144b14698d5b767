"""Per-graph debug dumps: every stage as readable Python, diffs, ``passes.json``, kernels, repro.

Each process writes into a fresh run folder, ``<debug_dir>/run_<YYYYmmdd-HHMMSS>_<pid>/`` (logged
once when created; ``<debug_dir>/latest`` links to the newest), so a reused ``debug_dir`` never
mixes the stage files of an earlier run, made with other options, with this one's.
Layout of ``<debug_dir>/run_…/<graph_id>/``::

    00_dynamo.py                  the graph Dynamo captured (torch-level)
    01_aten.py                    after AOTAutograd: functionalized ATen, inference only
    02_canonicalize_attention.py  the graph after each enabled pass, in pipeline order
    02_canonicalize_attention.diff  unified diff against the previous ATen stage
    ...
    passes.json                   per pass: time, nodes before/after, op-count delta, sites
    kernels/                      generated kernel sources (Anda, SWA) used by this graph
    repro.py                      runnable: rebuilds the final graph and runs it on random inputs

Every stage is also mirrored to ``torch._logging``: as a structured artifact
(``trace_structured``, seen by tlparse under ``TORCH_TRACE=DIR``) and through the ``graph_code``
artifact logger (``TORCH_LOGS=graph_code``).
"""
from __future__ import annotations

import difflib
import io
import json
import logging
import os
import threading
import time
from pathlib import Path

import torch
import torch.fx
from torch._logging import getArtifactLogger, trace_structured

log = logging.getLogger(__name__)
graph_code_log = getArtifactLogger(__name__, "graph_code")

ALWAYS_DUMPED = ("dynamo", "aten")

_runs: dict[tuple[str, int], Path] = {}
_runs_lock = threading.Lock()


def run_dir(root: str) -> Path:
    """This process's run folder under ``root``: created (and logged) on first use, then reused."""
    key = (os.path.abspath(root), os.getpid())
    with _runs_lock:
        d = _runs.get(key)
        if d is None:
            base = Path(root) / f"run_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}"
            d, n = base, 0
            while d.exists():
                n += 1
                d = base.with_name(f"{base.name}_{n}")
            d.mkdir(parents=True)
            _runs[key] = d
            _link_latest(Path(root), d)
            log.warning("llmaccel: debug dump of this run in %s", d.resolve())
    return d


def _link_latest(root: Path, d: Path) -> None:
    """Point ``root/latest`` at ``d`` (a relative symlink, replaced atomically; skipped if impossible)."""
    tmp = root / f".latest.{os.getpid()}"
    try:
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(d.name, target_is_directory=True)
        os.replace(tmp, root / "latest")
    except OSError as e:
        log.debug("llmaccel: could not link %s/latest: %s", root, e)


def _readable(gm: torch.fx.GraphModule) -> str:
    return gm.print_readable(print_output=False, include_stride=False, include_device=False)


class DebugDump:
    """Collects the stages of one compiled graph; writes files only when ``root`` is set."""

    def __init__(self, root: str | None, graph_id: str, pass_filter: tuple[str, ...] | None = None):
        self.graph_id = graph_id
        self.pass_filter = pass_filter
        self.dir = run_dir(root) / graph_id if root else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self._index = 0
        self._prev_aten: tuple[str, str] | None = None

    @property
    def enabled(self) -> bool:
        return self.dir is not None

    def _wanted(self, name: str) -> bool:
        return self.pass_filter is None or name in ALWAYS_DUMPED or name in self.pass_filter

    def stage(self, name: str, gm: torch.fx.GraphModule) -> None:
        code = _readable(gm)
        label = f"llmaccel_{self.graph_id}_{name}"
        trace_structured("artifact", metadata_fn=lambda: {"name": label, "encoding": "string"},
                         payload_fn=lambda: code)
        graph_code_log.debug("TRACED GRAPH %s\n%s", label, code)
        idx = self._index
        self._index += 1
        prev = self._prev_aten
        if name != "dynamo":
            self._prev_aten = (f"{idx:02d}_{name}.py", code)
        if self.dir is None or not self._wanted(name):
            return
        (self.dir / f"{idx:02d}_{name}.py").write_text(code)
        if prev is not None and name != "dynamo":
            diff = difflib.unified_diff(prev[1].splitlines(True), code.splitlines(True),
                                        fromfile=prev[0], tofile=f"{idx:02d}_{name}.py")
            (self.dir / f"{idx:02d}_{name}.diff").write_text("".join(diff))

    def passes_json(self, records: list[dict]) -> None:
        trace_structured("artifact", metadata_fn=lambda: {"name": f"llmaccel_{self.graph_id}_passes",
                                                          "encoding": "json"},
                         payload_fn=lambda: json.dumps(records, default=str))
        if self.dir is None:
            return
        shown = [r for r in records if self._wanted(r["pass"])]
        (self.dir / "passes.json").write_text(json.dumps(shown, indent=2, default=str))

    def artifact(self, name: str, text: str) -> None:
        if self.dir is None:
            return
        path = self.dir / "kernels" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def repro(self, gm: torch.fx.GraphModule, example_inputs) -> None:
        """Write ``repro.py`` with PyTorch's own after-AOT repro writer (+ our op registrations).
        Graphs whose ops keep per-sequence state (swa, kv_store) run through
        :func:`llm_compile.repro_state.run_repro`, which builds that state in the fresh process."""
        if self.dir is None:
            return
        try:
            from torch._dynamo.repro.after_aot import save_graph_repro

            from llm_compile.repro_state import state_spec

            buf = io.StringIO()
            save_graph_repro(buf, gm, list(example_inputs), "llmaccel", stable_output=True)
            text = ("import llm_compile.ops  # registers the llmaccel:: custom ops\n"
                    "import llm_compile.runtime.kv, llm_compile.runtime.swa  # registers the op implementations\n" + buf.getvalue())
            spec = state_spec(gm)
            if spec:
                head, sep, _ = text.partition("if __name__ == '__main__':")
                text = (head + sep + "\n    from llm_compile.repro_state import run_repro\n"
                        f"    run_repro(mod, load_args, {spec!r})\n")
            (self.dir / "repro.py").write_text(text)
        except Exception as e:  # the dump must never break compilation
            log.warning("llmaccel: could not write repro for %s: %s", self.graph_id, e)
            (self.dir / "repro.py").write_text(f"# repro could not be written: {type(e).__name__}: {e}\n")


def dump_root(debug_dir: str | None) -> str | None:
    return debug_dir or os.environ.get("LLMACCEL_DEBUG") or None
