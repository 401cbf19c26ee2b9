"""Every ```python block of the README runs as written, in order, in one namespace (in a temp directory)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_the_snippets():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 4 and any("attach_saes" in b for b in blocks)


def test_readme_snippets_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "__readme__"}
    for i, block in enumerate(python_blocks(README.read_text())):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), ns)
        except Exception as err:  # pragma: no cover - the message is the point
            pytest.fail(f"README python block {i + 1} failed: {type(err).__name__}: {err}\n{block}")
    out = capsys.readouterr().out
    assert "CE rec (zero)" in out and "DFA by head:" in out
    assert (tmp_path / "runs" / "readme" / "L1.z" / "cfg.json").exists()
