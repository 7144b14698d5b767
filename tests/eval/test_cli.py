"""The command line: config building, sweeps, a tiny end-to-end run, tables and plots."""
import json

import pytest

from llm_compile.eval import cli, report
from llm_compile.eval.runner import parse_options, set_option_path


def _configs(*argv):
    return cli.build_configs(cli.build_parser().parse_args(list(argv)))


def test_option_paths():
    assert set_option_path({}, "swa.sparsity", 0.5) == {"swa": {"sparsity": 0.5}}
    base = {"swa": True, "inner": "eager"}
    assert set_option_path(base, "swa.policy", "h2o") == {"swa": {"policy": "h2o"}, "inner": "eager"}
    assert base == {"swa": True, "inner": "eager"}  # not modified
    assert parse_options("none") is None and parse_options("{}") == {}
    with pytest.raises(ValueError):
        parse_options("[1]")


def test_build_configs():
    configs, sweeps = _configs()
    assert configs == [("llmaccel", {})] and sweeps == []
    assert _configs("--eager")[0] == [("eager", None)]
    assert _configs("--options", "none", "--with-eager")[0] == [("eager", None)]
    configs, sweeps = _configs("--options", '{"inner": "eager"}', "--with-eager",
                               "--sweep", "swa.sparsity=0,0.5", "--sweep", "swa.policy=alisa,h2o")
    assert [c[0] for c in configs] == ["eager", "swa.sparsity=0", "swa.sparsity=0.5",
                                       'swa.policy="alisa"', 'swa.policy="h2o"']
    assert configs[2][1] == {"inner": "eager", "swa": {"sparsity": 0.5}}
    assert sweeps[0] == ("swa.sparsity", [0, 0.5], [1, 2])
    configs, _ = _configs("--configs", "off={}", 'a={"swa": true}', "--configs", "e=none")
    assert configs == [("off", {}), ("a", {"swa": True}), ("e", None)]
    with pytest.raises(SystemExit):
        _configs("--eager", "--sweep", "swa.sparsity=0.5")
    with pytest.raises(SystemExit):
        _configs("--configs", "a={}", "a={}")
    assert cli._ints("1024,2k,8k") == (1024, 2048, 8192)


def test_cli_end_to_end(tmp_path, capsys, smollm2):
    out = tmp_path / "r.json"
    rc = cli.main(["--eager", "--tokens", "96", "--context", "64", "--stride", "32",
                   "--stream-tokens", "12", "--passkey-lengths", "128", "--passkey-depths", "0.5",
                   "--agree-n", "1", "--agree-tokens", "3", "--agree-prompt", "8",
                   "--no-progress", "--threads", "0", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| config | ppl | stream ppl |" in text and "| eager |" in text
    doc = json.loads(out.read_text())
    (res,) = doc["results"]
    assert res["error"] is None and res["options"] is None
    assert set(res["metrics"]) == {"ppl", "stream", "passkey", "agree"}
    assert res["metrics"]["ppl"]["n_scored"] == 95 and res["metrics"]["stream"]["n_scored"] == 11
    assert doc["settings"]["passkey_lengths"] == [128] and doc["meta"]["torch"]


def test_table_and_plots(tmp_path):
    # result dicts as run_configs makes them (numbers arbitrary: this checks layout only)
    def res(name, opts, ppl, err=None):
        return dict(name=name, options=opts, seconds=1.0, error=err,
                    row=dict(config=name, ppl=ppl, stream_ppl=ppl + 1, decode_ms=10.0,
                             passkey=1.0, agree=0.9))

    rs = [res("eager", None, 10.0), res("swa.sparsity=0.5", {"swa": {"sparsity": 0.5}}, 11.0),
          res("swa.sparsity=0.9", {"swa": {"sparsity": 0.9}}, float("nan"), "RuntimeError: x")]
    table = report.markdown_table(rs)
    assert table.splitlines()[0].startswith("| config | ppl | stream ppl | decode ms/tok |")
    assert "| graphs | time s | status |" in table.splitlines()[0]
    assert "FAILED: RuntimeError: x" in table and "| 11.000 |" in table
    png = report.plot_sweep(rs[1:], "swa.sparsity", [0.5, 0.9], str(tmp_path / "s.png"),
                            reference=rs[0])
    png2 = report.plot_configs(rs, str(tmp_path / "c.png"))
    for p in (png, png2):
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
