"""The integration docs are tests: every ```python and ```bash block of docs/integrations.md and of the
"## Integrations" section of README.md runs, in document order, in one fresh folder (so a block may use a
file an earlier one wrote). Python blocks run in this process; bash blocks (the CLI) in a subprocess with this
interpreter's scripts first on PATH. A failure names the document and the block's first line number."""
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest
import torch

from tests.conftest import ROOT

FENCE = re.compile(r"^```(python|bash)[^\n]*\n(.*?)^```", re.S | re.M)


def section(text: str, heading: str) -> Tuple[str, int]:
    """The text under ``heading`` (a ``## `` line) up to the next ``## `` heading, and its first line number."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.strip() == heading), None)
    if start is None:
        return "", 0
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "".join(lines[start:end]), start


def blocks(doc: str) -> List[Tuple[str, int, str]]:
    """(language, line number, code) of every python/bash block of the document (or README's section)."""
    text = (ROOT / doc.split("#")[0]).read_text()
    offset = 0
    if "#" in doc:
        text, offset = section(text, "## " + doc.split("#")[1])
    return [(m.group(1), offset + text.count("\n", 0, m.start()) + 1, m.group(2)) for m in FENCE.finditer(text)]


@pytest.fixture(autouse=True)
def fast_inductor():
    """Scalar C++ kernels (no SIMD): Inductor's cold CPU compile is about 3x faster; nothing checked changes."""
    torch._dynamo.reset()
    with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):
        yield
    torch._dynamo.reset()


def test_readme_has_an_integrations_section_per_integration():
    text, _ = section((ROOT / "README.md").read_text(), "## Integrations")
    assert "docs/integrations.md" in text
    for what in ("SeparableRewritePass", 'backend="dsrewrite"', "SeparableConvPass", "dsrewrite rewrite"):
        assert what in text, what


@pytest.mark.parametrize("doc", ["docs/integrations.md", "README.md#Integrations"])
def test_doc_examples_run(doc, tmp_path, monkeypatch):
    found = blocks(doc)
    assert {lang for lang, _, _ in found} == {"python", "bash"}, f"{doc}: expected python and bash examples"
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    for lang, line, code in found:
        where = f"{doc} line {line}"
        if lang == "python":
            try:
                exec(compile(code, where, "exec"), {"__name__": "__doc_example__"})  # noqa: S102
            except Exception as e:  # noqa: BLE001 - name the block
                raise AssertionError(f"{where}: {type(e).__name__}: {e}") from e
        else:
            p = subprocess.run(["bash", "-e", "-c", code], capture_output=True, text=True, timeout=300, env=env)
            assert p.returncode == 0, f"{where}: exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
