"""The README's options table, generated from the config dataclasses (:mod:`llm_compile.config`):
each option's key, the type/range its rule checks, its default and the docstring under its field.

    python -m llm_compile.options_table      # prints the table (tests/test_readme.py checks the README's copy)
"""
from __future__ import annotations

import inspect
from dataclasses import fields

from llm_compile.config import SECTIONS, POLICY_DEFAULTS, RULES, LLMAccelConfig


def _default_text(section: str, name: str, default) -> str:
    text = f"`{default!r}`"
    if section == "swa" and all(name in d for d in POLICY_DEFAULTS.values()):
        text += " (" + ", ".join(f"{p}: {d[name]!r}" for p, d in POLICY_DEFAULTS.items()) + ")"
    return text


def describe_options() -> list[tuple[str, str, str, str]]:
    """(key, expected type/range, default, doc) rows for every option; the README table."""
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
        if f.name in SECTIONS:
            for g in fields(SECTIONS[f.name]):
                key = f"{f.name}.{g.name}"
                rows.append((key, RULES[key].text, _default_text(f.name, g.name, g.default),
                             doc_of(SECTIONS[f.name], g.name)))
        else:
            rows.append((f.name, RULES[f.name].text, _default_text("", f.name, f.default),
                         doc_of(LLMAccelConfig, f.name)))
    return rows


def options_table() -> str:
    """The README's options table (markdown)."""
    lines = ["| option | type / range | default | meaning |", "|---|---|---|---|"]
    for key, kind, default, doc in describe_options():
        lines.append(f"| `{key}` | {kind} | {default} | {doc.replace('``', '`')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(options_table())
