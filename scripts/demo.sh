#!/usr/bin/env bash
# The main job, as far as it exists today: a dev PKI, the coordinator and one agent per
# component on loopback, and `aitbc-backup agents list`. Everything is stopped at exit.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --workspace --locked --quiet
BIN="$PWD/target/debug"
WORK="$(mktemp -d /tmp/aitbc-demo-XXXXXX)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
GRPC_PORT=$(free_port)
COORDINATOR="https://127.0.0.1:$GRPC_PORT"

echo "== certs init"
"$BIN/aitbc-backup" certs init --dir "$WORK/certs"

echo "== coordinator on $COORDINATOR"
env AITBC_BACKUP_TLS__CERT="$WORK/certs/coordinator.pem" \
    AITBC_BACKUP_TLS__KEY="$WORK/certs/coordinator.key" \
    AITBC_BACKUP_TLS__CA="$WORK/certs/ca.pem" \
    AITBC_BACKUP_SERVER__GRPC_LISTEN="127.0.0.1:$GRPC_PORT" \
    AITBC_BACKUP_SERVER__HTTP_LISTEN="127.0.0.1:$(free_port)" \
    AITBC_BACKUP_REPOSITORY__URL="file://$WORK/repository" \
    "$BIN/aitbc-backup-coordinator" 2>"$WORK/coordinator.log" &
PIDS+=($!)

for component in postgres redis ledger; do
  env AITBC_BACKUP_TLS__CERT="$WORK/certs/agent-$component.pem" \
      AITBC_BACKUP_TLS__KEY="$WORK/certs/agent-$component.key" \
      AITBC_BACKUP_TLS__CA="$WORK/certs/ca.pem" \
      AITBC_BACKUP_COMPONENT="$component" \
      AITBC_BACKUP_COORDINATOR__URL="$COORDINATOR" \
      AITBC_BACKUP_HTTP__LISTEN="127.0.0.1:$(free_port)" \
      "$BIN/aitbc-backup-agent" 2>"$WORK/agent-$component.log" &
  PIDS+=($!)
done

export AITBC_CLI_COORDINATOR="$COORDINATOR" AITBC_CLI_CERT="$WORK/certs/operator.pem" \
  AITBC_CLI_KEY="$WORK/certs/operator.key" AITBC_CLI_CA="$WORK/certs/ca.pem"
for _ in $(seq 1 100); do
  online=$("$BIN/aitbc-backup" agents list --json 2>/dev/null | grep -c '"state": "online"' || true)
  [ "$online" = 3 ] && break
  sleep 0.1
done
echo "== aitbc-backup agents list"
"$BIN/aitbc-backup" agents list
[ "$online" = 3 ] || { echo "demo: not every agent came online" >&2; cat "$WORK"/*.log >&2; exit 1; }
