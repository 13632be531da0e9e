#!/usr/bin/env bash
# Install (scripts/setup.sh), serve the bundled all-MiniLM-L6-v2 (exported once into the toolkit's one cache,
# reused after by every command and by Embedder("all-MiniLM-L6-v2")), send one real request, print the artifact's
# manifest and the cache, stop the server. The cache is TOOLKIT_CACHE, else ~/.cache/onnx-embed-toolkit: this
# script does not set it: a TOOLKIT_CACHE you exported is used, and a new shell finds the same export.
set -euo pipefail
cd -P "$(dirname "$0")/.."  # -P: the real checkout, also when reached through a symlink
bash scripts/setup.sh
PORT=${PORT:-8000}
echo "[quickstart] toolkit serve all-MiniLM-L6-v2 on port $PORT (the first run exports it into the cache: ~30 s)" >&2
.venv/bin/toolkit serve all-MiniLM-L6-v2 --port "$PORT" --log-level warning &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null; do
  if ! kill -0 "$SERVER" 2>/dev/null; then wait "$SERVER" || exit $?; exit 1; fi  # it said why (e.g. a taken port)
  sleep 0.5
done
ARTIFACT=$(.venv/bin/python -c "from toolkit.model_source import find_cached_artifact; print(find_cached_artifact('all-MiniLM-L6-v2'))")
.venv/bin/toolkit inspect "$ARTIFACT"
curl -sS "http://127.0.0.1:$PORT/v1/embeddings" -H 'Content-Type: application/json' \
  -d '{"input": ["The quick brown fox jumps over the lazy dog."], "model": "all-MiniLM-L6-v2"}' \
  | .venv/bin/python -c 'import json,sys; r=json.load(sys.stdin); e=r["data"][0]["embedding"]; print(r["model"] + ":", len(e), "dims, first", e[:4], "usage", r["usage"])'
.venv/bin/toolkit inspect --cache
echo "[quickstart] the artifact: $ARTIFACT, in the cache above (TOOLKIT_CACHE, else ~/.cache/onnx-embed-toolkit);" \
  "toolkit serve / embed / bench all-MiniLM-L6-v2 and Embedder(\"all-MiniLM-L6-v2\") reuse it from any shell" >&2
