"""Every ```python example in README.md and docs/ runs as written.

The examples of one page run in order in one fresh interpreter (a later block may use what an earlier one defined),
in a temporary working directory, so they cannot lean on this test's state.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
#: Pages whose examples load the bundled model (slower; marked like the other real-model tests).
MODEL_PAGES = {"README.md", "cachegen.md", "models.md", "reuse.md"}


def examples(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


@pytest.mark.parametrize(
    "page",
    [pytest.param(p, id=p.name, marks=[pytest.mark.model] if p.name in MODEL_PAGES else [])
     for p in PAGES if examples(p)],
)
def test_page_examples_run(page: Path, tmp_path: Path) -> None:
    code = "\n\n".join(examples(page))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{page.name} examples failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"


def test_every_page_with_code_is_collected() -> None:
    assert any(p.name == "README.md" for p in PAGES if examples(p))
