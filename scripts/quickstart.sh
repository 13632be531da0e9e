#!/usr/bin/env bash
# Install, export the bundled all-MiniLM-L6-v2, serve it, send one real request, stop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ARTIFACT=.cache/quickstart/all-MiniLM-L6-v2.onnx
PORT=${PORT:-8000}
if ! .venv/bin/python -c "import socket,sys; s=socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1])))" "$PORT" 2>/dev/null; then
  echo "port $PORT is taken on 127.0.0.1 (another server?): rerun with PORT=<free port> bash scripts/quickstart.sh" >&2
  exit 1
fi
[ -f "$ARTIFACT" ] || .venv/bin/toolkit export -o "$ARTIFACT"
.venv/bin/toolkit inspect "$ARTIFACT"
.venv/bin/toolkit serve "$ARTIFACT" --port "$PORT" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null && break; sleep 0.2; done
curl -sS "http://127.0.0.1:$PORT/v1/embeddings" -H 'Content-Type: application/json' \
  -d '{"input": ["The quick brown fox jumps over the lazy dog."], "model": "all-MiniLM-L6-v2"}' \
  | .venv/bin/python -c 'import json,sys; r=json.load(sys.stdin); e=r["data"][0]["embedding"]; print(r["model"] + ":", len(e), "dims, first", e[:4], "usage", r["usage"])'
