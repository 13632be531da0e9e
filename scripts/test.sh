#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the whole test suite.
set -euo pipefail
cd -P "$(dirname "$0")/.."  # -P: the real checkout, also when reached through a symlink
bash scripts/setup.sh
exec .venv/bin/python -m pytest tests -p no:cacheprovider --durations=25 "$@"  # the slowest 25 named: the suite has a time budget
