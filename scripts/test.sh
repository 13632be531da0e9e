#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the whole test suite.
set -euo pipefail
cd -P "$(dirname "$0")/.."  # -P: the real checkout, also when reached through a symlink
bash scripts/setup.sh
PYTEST=(.venv/bin/python -m pytest -p no:cacheprovider --durations=25)  # the slowest 25 named: the suite has a time budget
# With arguments (a file, -k ...): one pytest run with them. Without: the suite as two pytest processes side by side
# where there are two cores or more (most of its time is single-threaded export work). The docs' blocks and every
# test that starts a local Ray share one of them, so no two Rays ever run at once.
if [ $# -gt 0 ] || [ "$(nproc)" -lt 2 ]; then
  exec "${PYTEST[@]}" tests "$@"
fi
SIDE=(tests/test_readme.py tests/test_bulk.py tests/test_ray_serve.py tests/test_ray_cluster.py
      tests/test_vision_language.py)  # about half the suite's time (2026-12-07: 990 s of 1900)
log=$(mktemp)
"${PYTEST[@]}" "${SIDE[@]}" >"$log" 2>&1 &
side=$!
trap 'kill "$side" 2>/dev/null || true; rm -f "$log"' EXIT
main=0
"${PYTEST[@]}" tests "${SIDE[@]/#/--ignore=}" || main=$?
other=0
wait "$side" || other=$?
echo "---- the other half: ${SIDE[*]}"
cat "$log"
[ "$main" -ne 0 ] && exit "$main"
exit "$other"
