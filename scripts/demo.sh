#!/usr/bin/env bash
# The main job, as far as it exists today: a dev PKI, the coordinator and one agent per
# component on loopback, `aitbc-backup agents list`; then PostgreSQL 15, Redis 7 and a simulated
# blockchain node writing 50 blocks/s that mirrors every block into both. Each component is
# backed up by its agent component into the embedded default (a local-directory repository)
# while the node writes: the ledger twice (the second reads only new data), PostgreSQL and
# Redis once; the repository is verified; then the ledger is restored into a fresh directory
# (chain checked), PostgreSQL into a new database and Redis into a second running server, each
# checked against its manifest. (Cutting all three at one instant is the coordinator's snapshot
# set, still to come.) Everything is stopped and removed at exit.
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

echo "== PostgreSQL 15 and Redis 7 on loopback"
bash scripts/setup.sh >/dev/null
PGBIN=/usr/lib/postgresql/15/bin PG_PORT=$(free_port) REDIS_PORT=$(free_port) REDIS2_PORT=$(free_port)
chmod 755 "$WORK" && mkdir -p "$WORK/pg"
as_postgres() {  # initdb and postgres refuse to run as root
  if [ "$(id -u)" = 0 ]; then chown -R postgres:postgres "$WORK/pg"; setpriv --reuid postgres --regid postgres --init-groups -- "$@"
  else "$@"; fi
}
as_postgres "$PGBIN/initdb" -D "$WORK/pg/data" --auth=trust --username=postgres --no-sync >/dev/null
as_postgres "$PGBIN/postgres" -D "$WORK/pg/data" -p "$PG_PORT" -k "$WORK/pg" -c listen_addresses=127.0.0.1 \
  >"$WORK/postgres.log" 2>&1 &
PIDS+=($!)
for port in "$REDIS_PORT" "$REDIS2_PORT"; do
  redis-server --port "$port" --bind 127.0.0.1 --dir "$WORK" --dbfilename "dump-$port.rdb" --save "" \
    --appendonly no --repl-diskless-sync-delay 0 >"$WORK/redis-$port.log" &
  PIDS+=($!)
done
PG="postgres://postgres@127.0.0.1:$PG_PORT"
until "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" && redis-cli -p "$REDIS_PORT" PING >/dev/null 2>&1 \
  && redis-cli -p "$REDIS2_PORT" PING >/dev/null 2>&1; do sleep 0.1; done
"$PGBIN/psql" -X -q -d "$PG/postgres" -c "CREATE DATABASE aitbc"

echo "== a blockchain node writing 50 blocks/s into $WORK/node, mirrored into PostgreSQL and Redis"
"$BIN/aitbc-node-sim" --data-dir "$WORK/node" --rate 50 --receipt-log-bytes 20000 \
  --mirror-postgres "$PG/aitbc" --mirror-redis "127.0.0.1:$REDIS_PORT" >"$WORK/node.log" &
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

echo "== PostgreSQL: backup at an exported snapshot while the node writes"
PG_AGENT=(env AITBC_BACKUP_COMPONENT=postgres AITBC_BACKUP_POSTGRES__URL="$PG/postgres"
  AITBC_BACKUP_POSTGRES__DATABASES='["aitbc"]' AITBC_BACKUP_POSTGRES__SCRATCH_DIR="$WORK/scratch"
  "$BIN/aitbc-backup-agent")
"${PG_AGENT[@]}" backup | tee "$WORK/pg.json"
PG_ID=$(sed -n 's/.*"manifest": "\(.*\)".*/\1/p' "$WORK/pg.json")
echo "-- restore $PG_ID as database aitbc_restored (row counts checked against the manifest)"
"${PG_AGENT[@]}" restore "$PG_ID" --database aitbc --as aitbc_restored
echo "   chain_blocks rows: live $("$PGBIN/psql" -X -At -d "$PG/aitbc" -c 'SELECT count(*) FROM chain_blocks'), restored $("$PGBIN/psql" -X -At -d "$PG/aitbc_restored" -c 'SELECT count(*) FROM chain_blocks')"

echo "== Redis: backup as a replica (the fork is the cut) while the node writes"
REDIS_AGENT=(env AITBC_BACKUP_COMPONENT=redis AITBC_BACKUP_REDIS__ADDRESS="127.0.0.1:$REDIS_PORT"
  "$BIN/aitbc-backup-agent")
"${REDIS_AGENT[@]}" backup | tee "$WORK/redis.json"
REDIS_ID=$(sed -n 's/.*"manifest": "\(.*\)".*/\1/p' "$WORK/redis.json")
echo "-- restore $REDIS_ID into the running server on port $REDIS2_PORT (no restart; keys and samples checked)"
"${REDIS_AGENT[@]}" restore "$REDIS_ID" --target-url "127.0.0.1:$REDIS2_PORT"
echo "   chain:head live $(redis-cli -p "$REDIS_PORT" GET chain:head), restored $(redis-cli -p "$REDIS2_PORT" GET chain:head)"
"${REPO[@]}" ls
"${REPO[@]}" verify
