"""Layout guards: one namespace, every subpackage shipped, serving without torch."""

from __future__ import annotations

import subprocess
import sys

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_mapped():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = project["tool"]["setuptools"]["package-dir"]
    packages = set(project["tool"]["setuptools"]["packages"])
    for package, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            name = ".".join([package, *rel.parts]) if rel.parts else package
            assert name in packages, f"{name} ({init.parent}) is missing from [tool.setuptools] packages"


def test_runtime_and_server_import_without_torch():
    code = ("import sys, toolkit.runtime, toolkit.server.app, toolkit.cli; "
            "heavy = [m for m in ('torch', 'transformers', 'sentence_transformers', 'onnx') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, f"serving imports pulled in {done.stdout} {done.stderr[-500:]}"


def test_serving_install_pulls_no_bulk_or_export_stack():
    core = " ".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    for heavy in ("ray", "pyarrow", "pandas", "torch", "transformers", "pillow"):
        assert heavy not in core.lower(), f"{heavy} is a core dependency; it belongs in an extra"
    code = ("import sys, toolkit.bulk, toolkit.server.app; "
            "heavy = [m for m in ('ray', 'pyarrow', 'torch') if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, f"importing toolkit.bulk pulled in {done.stdout} {done.stderr[-500:]}"


def test_no_bare_folder_imports():
    for path in ROOT.glob("*/*.py"):
        if path.parts[-2] in (".venv", "tests"):
            continue
        for line in path.read_text().splitlines():
            stripped = line.strip()
            for bare in ("server", "runtime", "export"):
                assert not stripped.startswith((f"import {bare}", f"from {bare} ", f"from {bare}.")), f"{path}: {line}"


def test_quickstart_response_printer_runs():
    """scripts/quickstart.sh pipes the server's answer into an inline Python snippet: it must run on 3.10+."""
    import json
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = (Path(__file__).resolve().parents[1] / "scripts" / "quickstart.sh").read_text()
    (code,) = re.findall(r"python -c '([^']+)'", script)
    answer = {"model": "m", "data": [{"embedding": [0.1, 0.2, 0.3, 0.4, 0.5]}], "usage": {"prompt_tokens": 3}}
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(answer), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "m: 5 dims" in done.stdout
