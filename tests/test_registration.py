import subprocess
import sys
import textwrap


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_backend_found_without_import_in_fresh_interpreter():
    r = _run("""
        import sys, torch
        f = torch.compile(lambda x: torch.sin(x) * 2, backend="llmaccel", options={"inner": "eager"})
        x = torch.randn(8)
        assert torch.allclose(f(x), torch.sin(x) * 2)
        assert "llm_compile.backend" in sys.modules
        print("OK")
    """)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_importing_package_too_does_not_duplicate_registration():
    r = _run("""
        import torch
        f = torch.compile(lambda x: x * 3, backend="llmaccel", options={"inner": "eager"})
        f(torch.ones(2))
        import llm_compile, llm_compile.backend
        from torch._dynamo import list_backends
        assert "llmaccel" in list_backends(exclude_tags=())
        g = torch.compile(lambda x: x - 1, backend="llmaccel", options={"inner": "eager"})
        assert g(torch.ones(2)).sum() == 0
        assert llm_compile.llmaccel is llm_compile.backend.llmaccel
        print("OK")
    """)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_modules_import_alone_in_a_fresh_interpreter():
    """Each entry module imports first in a fresh process (catches import cycles)."""
    mods = ["llm_compile.runtime.swa", "llm_compile.runtime.kv", "llm_compile.runtime.kv.cache",
            "llm_compile.passes.kv_relocation", "llm_compile.repro_state",
            "llm_compile.runtime.offload.pool", "llm_compile.passes.manager",
            "llm_compile.codegen.anda_kernels", "llm_compile.quantize",
            "llm_compile.runtime.tiers.plan", "llm_compile.runtime.tiers.store", "llm_compile.runtime.tiers.edit",
            "llm_compile.runtime.kv.store", "llm_compile.passes.local_kv_store"]
    code = "import importlib, subprocess, sys\n" \
           f"for m in {mods!r}:\n" \
           "    r = subprocess.run([sys.executable, '-c', 'import ' + m], capture_output=True, text=True)\n" \
           "    assert r.returncode == 0, (m, r.stderr[-1500:])\n" \
           "print('OK')\n"
    r = _run(code)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
