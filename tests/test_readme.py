"""Every code block of README.md and of the documentation (docs/, in mkdocs.yml's nav order) runs as written.

Blocks run in that order (README first) in one workspace: a temporary folder that mirrors the repository root
(a symlink per top-level entry, so ``.cache/models/...`` and ``toolkit/data/corpus.jsonl`` resolve as
in a checkout) where the blocks' own outputs land, with ``.venv/bin`` first on PATH (as after
``source .venv/bin/activate``) and ``TOOLKIT_CACHE`` at the repository's ``.cache/toolkit``, where the
quickstart exports. Two things are changed, and only these: port 8000 becomes a free port (so a
server a user left running cannot fail the suite), and ``curl`` fails on HTTP errors
(``--fail-with-body``), so a block that gets a 4xx fails here instead of printing it.

A line ``<!-- readme-test: ... -->`` right before a block says what it needs:
``quickstart`` (the first block: ``bash scripts/quickstart.sh`` runs; ``bash scripts/test.sh`` is this
very run), ``server ARTIFACT [OPTIONS]`` (a ``toolkit serve`` the block talks to), or ``same-as-readme`` (a docs
block that repeats a README block to the letter, e.g. the two commands: checked equal, not run twice).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def doc_pages() -> list[Path]:
    """README.md, then the documentation's pages in mkdocs.yml's nav order."""
    import yaml

    def walk(entry) -> list[str]:
        if isinstance(entry, str):
            return [entry]
        if isinstance(entry, dict):
            return [page for value in entry.values() for page in walk(value)]
        return [page for item in entry for page in walk(item)]

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    return [README] + [ROOT / "docs" / page for page in walk(nav)]
VENV_BIN = Path(sys.executable).parent
_FENCE = re.compile(r"^```(\w*)\s*$")
_DIRECTIVE = re.compile(r"^<!-- readme-test: (.+?) -->$")
_PORT = re.compile(r"\b8000\b")
_BASH_PRELUDE = """set -euo pipefail
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
curl() {  # fail on HTTP errors, unless the block already says how (-f)
  for arg in "$@"; do [[ $arg =~ ^-[a-zA-Z]*f[a-zA-Z]*$ ]] && { command curl "$@"; return; }; done
  command curl --fail-with-body "$@"
}
"""


@dataclass(frozen=True)
class Block:
    file: str  # relative to the repository
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    directive: str | None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.lang}"


def readme_blocks() -> list[Block]:
    return [block for page in doc_pages() for block in page_blocks(page)]


def page_blocks(page: Path) -> list[Block]:
    blocks, lines = [], page.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, body = i, []
        i += 1
        while not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        directive = _DIRECTIVE.match(before.strip())
        blocks.append(Block(str(page.relative_to(ROOT)), start + 1, match.group(1), "\n".join(body) + "\n",
                            directive.group(1) if directive else None))
        i += 1
    return blocks


BLOCKS = readme_blocks()


def test_every_block_is_runnable_here():
    """Only bash and python blocks (which run below), each directive one the runner knows."""
    for block in BLOCKS:
        assert block.lang in ("bash", "python"), f"{block}: a block must be bash or python to be run"
        if block.directive:
            assert block.directive.split()[0] in ("quickstart", "server", "same-as-readme"), \
                f"{block}: unknown {block.directive!r}"
        if block.directive == "same-as-readme":
            assert any(b.code == block.code for b in BLOCKS if b.file == "README.md"), f"{block}: no README block says this"
    assert BLOCKS[0].directive == "quickstart" and BLOCKS[0].file == "README.md"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci and "bash scripts/test.sh" in BLOCKS[0].code  # CI runs the README's command


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("readme")
    for entry in ROOT.iterdir():
        if entry.name not in (".git",):
            (folder / entry.name).symlink_to(entry)
    return folder


def _env(port: int) -> dict:
    return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "TOOLKIT_CACHE": str(ROOT / ".cache" / "toolkit"), "PORT": str(port), "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1"}


def _serve(workspace: Path, directive: str, port: int) -> subprocess.Popen:
    artifact, *options = shlex.split(directive)[1:]
    proc = subprocess.Popen([str(VENV_BIN / "toolkit"), "serve", artifact, "--port", str(port),
                             "--log-level", "warning", *options], cwd=workspace, env=_env(port),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`toolkit serve {directive}` exited: {proc.stdout.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail(f"`toolkit serve {directive}` did not become ready")


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_readme_block_runs_as_written(block: Block, workspace: Path):
    port = free_port()
    code = _PORT.sub(str(port), block.code)
    server = None
    if block.directive == "same-as-readme":
        pytest.skip("the same code runs as a README block (checked equal in test_every_block_is_runnable_here)")
    if block.directive == "quickstart":
        code = "\n".join(line for line in code.splitlines() if "scripts/test.sh" not in line)  # this run itself
    elif block.directive:
        server = _serve(workspace, block.directive, port)
    try:
        command = ["bash", "-c", _BASH_PRELUDE + code] if block.lang == "bash" else [sys.executable, "-c", code]
        done = subprocess.run(command, cwd=workspace, env=_env(port), capture_output=True, text=True, timeout=600)
    finally:
        if server is not None:
            server.terminate()
            server.communicate(timeout=30)
    assert done.returncode == 0, f"{block} failed ({done.returncode}):\n{code}\n--- stdout\n{done.stdout[-3000:]}" \
                                 f"\n--- stderr\n{done.stderr[-3000:]}"
    if block.directive == "quickstart":  # it ran setup.sh from the workspace: the install must still be the checkout's
        shebang = (VENV_BIN / "toolkit").read_text().splitlines()[0]
        assert shebang == f"#!{VENV_BIN / 'python'}", shebang
        where = subprocess.run([sys.executable, "-c", "import toolkit; print(toolkit.__file__)"], capture_output=True,
                               text=True, cwd="/").stdout.strip()
        assert where == str(ROOT / "toolkit" / "__init__.py"), where
