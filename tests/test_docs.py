"""The documentation site builds strictly (every page in the nav, no broken link or anchor, the API reference
collected from the docstrings), and the README stays a short front door that links to it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    mkdocs = Path(sys.executable).parent / "mkdocs"
    if not mkdocs.exists():
        pytest.skip("mkdocs is not installed (the [docs] extra)")
    run = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={"NO_MKDOCS_2_WARNING": "1", "PATH": ""})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    reference = (tmp_path / "site" / "reference" / "index.html").read_text()
    assert "Documents best first" in reference and "ensure_artifact" in reference  # the docstrings were collected


def test_every_page_is_in_the_nav_and_the_readme_is_a_front_door():
    from test_readme import doc_pages

    pages = {p.relative_to(ROOT / "docs") for p in doc_pages()[1:]}
    assert pages == {p.relative_to(ROOT / "docs") for p in (ROOT / "docs").rglob("*.md")}
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 250
    linked = set(re.findall(r"\]\((docs/[^)#]+)", readme))
    assert linked and all((ROOT / link).is_file() for link in linked)
    assert {f"docs/{p}" for p in pages} <= linked  # every page one click away
