#!/usr/bin/env bash
# The main job, as far as it exists today: a dev PKI, the coordinator and one agent per
# component on loopback, `aitbc-backup agents list`; then a simulated blockchain node writing
# 50 blocks/s, backed up by the ledger component into the embedded default (a local-directory
# repository) while it writes, backed up again (only new data read), verified, and restored
# into a fresh directory whose chain is checked. Everything is stopped and removed at exit.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --workspace --locked --quiet
BIN="$PWD/target/debug"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh demo
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
      AITBC_BACKUP_LEDGER__DATA_DIR="$WORK/node" \
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

echo "== repository on the embedded default (file://$WORK/repository)"
REPO=("$BIN/aitbc-backup" repo --repository "file://$WORK/repository")
"${REPO[@]}" init

echo "== a blockchain node writing 50 blocks/s into $WORK/node"
"$BIN/aitbc-node-sim" --data-dir "$WORK/node" --rate 50 --receipt-log-bytes 20000 >"$WORK/node.log" &
PIDS+=($!)
sleep 3
export AITBC_BACKUP_COMPONENT=ledger AITBC_BACKUP_LEDGER__DATA_DIR="$WORK/node" \
  AITBC_BACKUP_LEDGER__SCRATCH_DIR="$WORK/scratch" \
  AITBC_BACKUP_REPOSITORY__URL="file://$WORK/repository"
echo "-- ledger backup while the node writes"
"$BIN/aitbc-backup-agent" backup | tee "$WORK/first.json"
sleep 1
echo "-- second backup: unchanged files are not read again (bytes_reused)"
"$BIN/aitbc-backup-agent" backup | tee "$WORK/second.json"
ID=$(sed -n 's/.*"manifest": "\(.*\)".*/\1/p' "$WORK/second.json")
"${REPO[@]}" ls
"${REPO[@]}" verify --read-data
echo "-- restore $ID into a fresh directory"
echo "   (every database passed integrity_check, the blocks chain up to the recorded head)"
"$BIN/aitbc-backup-agent" restore "$ID" --target "$WORK/restored"
echo "-- metadata.json for the old tooling"
cat "$WORK/restored/metadata.json"
