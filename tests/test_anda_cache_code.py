"""The Anda evaluation cache is reused only by the code that wrote it (a stale perplexity from
before a kernel or pass change must not be reported as a measurement of the new code)."""
import json
import logging

from llm_compile.anda_eval import EvalCache, code_fingerprint, source_fingerprint


def test_fingerprint_follows_the_sources(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "sub").mkdir(parents=True)
        (d / "x.py").write_text("x = 1\n")
        (d / "sub" / "k.c").write_text("int f(void) { return 1; }\n")
        (d / "notes.txt").write_text("ignored")
    assert source_fingerprint([a]) == source_fingerprint([b])
    (b / "notes.txt").write_text("other")                      # not code: same fingerprint
    assert source_fingerprint([a]) == source_fingerprint([b])
    (b / "sub" / "k.c").write_text("int f(void) { return 2; }\n")
    assert source_fingerprint([a]) != source_fingerprint([b])
    (b / "sub" / "k.c").write_text("int f(void) { return 1; }\n")
    (b / "sub" / "k.c").rename(b / "k.c")                      # same content, other path
    assert source_fingerprint([a]) != source_fingerprint([b])


def test_the_package_fingerprint_covers_passes_and_codegen(monkeypatch):
    import llm_compile.anda_eval as ae

    assert len(code_fingerprint()) == 16
    seen = []
    monkeypatch.setattr(ae, "source_fingerprint", lambda roots: seen.extend(roots) or "f")
    ae.code_fingerprint.cache_clear()
    try:
        assert ae.code_fingerprint() == "f"
    finally:
        ae.code_fingerprint.cache_clear()
    names = {p.name for p in seen}
    assert {"llm_compile", "passes", "codegen"} <= names and len(seen) == len(set(seen))


def test_records_of_other_code_are_not_reused(tmp_path, caplog):
    path = tmp_path / "cache.json"
    EvalCache(path, code="aaaa").put("s", "w4a16", {"ppl": 18.0})
    assert EvalCache(path, code="aaaa").get("s", "w4a16") == {"ppl": 18.0}
    with caplog.at_level(logging.WARNING):
        other = EvalCache(path, code="bbbb")
    assert other.get("s", "w4a16") is None
    assert "ignoring 1 cached evaluations" in caplog.text and "code aaaa" in caplog.text
    other.put("s", "w4a16", {"ppl": 18.1})
    assert json.loads(path.read_text())["code"] == "bbbb"
    # a file from before the fingerprint (no "code") is not trusted either
    path.write_text(json.dumps({"version": 2, "settings": {"s": {"w4a16": {"ppl": 17.0}}}}))
    assert EvalCache(path).get("s", "w4a16") is None
