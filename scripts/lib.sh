# Shared by demo.sh and bench.sh: a work directory and background processes that are always
# stopped (SIGTERM, then wait) and removed at exit.
WORK="$(mktemp -d "/tmp/aitbc-${1:-run}-XXXXXX")"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
