#!/usr/bin/env bash
# Benchmarks (release builds). Prints one JSON line per measurement.
#   scripts/bench.sh sessions [N] [DURATION]   coordinator holding N agent sessions (default 2000, 60s)
set -euo pipefail
cd "$(dirname "$0")/.."

scenario="${1:-sessions}"
cargo build --release --workspace --locked --quiet
BIN="$PWD/target/release"
WORK="$(mktemp -d /tmp/aitbc-bench-XXXXXX)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

bench_sessions() {
  local sessions="${1:-2000}" duration="${2:-60s}"
  # Each session holds a socket on both ends.
  ulimit -n 65536
  "$BIN/aitbc-backup" certs init --dir "$WORK/certs" --agent bench >/dev/null
  local port; port=$(free_port)
  env AITBC_BACKUP_TLS__CERT="$WORK/certs/coordinator.pem" \
      AITBC_BACKUP_TLS__KEY="$WORK/certs/coordinator.key" \
      AITBC_BACKUP_TLS__CA="$WORK/certs/ca.pem" \
      AITBC_BACKUP_SERVER__GRPC_LISTEN="127.0.0.1:$port" \
      AITBC_BACKUP_SERVER__HTTP_LISTEN="127.0.0.1:$(free_port)" \
      AITBC_BACKUP_LOG__LEVEL=warn \
      "$BIN/aitbc-backup-coordinator" 2>"$WORK/coordinator.log" &
  local pid=$!
  PIDS+=("$pid")
  sleep 0.5
  "$BIN/aitbc-backup-session-load" --coordinator "https://127.0.0.1:$port" --certs "$WORK/certs" \
    --sessions "$sessions" --duration "$duration" --coordinator-pid "$pid"
}

case "$scenario" in
  sessions) shift || true; bench_sessions "$@" ;;
  *) echo "unknown scenario $scenario" >&2; exit 2 ;;
esac
