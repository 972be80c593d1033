#!/usr/bin/env bash
# The main job on the embedded default (a local-directory repository): PostgreSQL 15, Redis 7
# and a simulated blockchain node writing 50 blocks/s that mirrors every block into both; a
# coordinator and one agent per component on loopback (mTLS, a dev PKI). One fenced snapshot
# set captures all three at one cut while the node writes; `snapshot list` shows it; the set is
# restored, in order and each component verified, into a fresh PostgreSQL, a fresh Redis and a
# fresh directory; the restored heights are compared; the set's data is re-read and re-hashed.
# The PostgreSQL agent also archives WAL: the set's restore point is recovered from a base backup
# plus WAL into a new data directory (point-in-time recovery) and must hold the same height.
# Everything is stopped and removed at exit (scripts/lib.sh: PostgreSQL with its fast shutdown,
# a deadline, then escalation); a process still running after that fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh >/dev/null
cargo build --workspace --locked --quiet
BIN="$PWD/target/debug"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh demo
GRPC_PORT=$(free_port)
COORDINATOR="https://127.0.0.1:$GRPC_PORT"
REPOSITORY="file://$WORK/repository"
PGBIN=/usr/lib/postgresql/15/bin

echo "== PostgreSQL 15 (source and a fresh one to restore into) and Redis 7 (likewise)"
chmod 755 "$WORK"
as_postgres() {  # initdb and postgres refuse to run as root
  if [ "$(id -u)" = 0 ]; then chown -R postgres:postgres "$WORK/pg"; setpriv --reuid postgres --regid postgres --init-groups -- "$@"
  else "$@"; fi
}
start_postgres() {  # NAME PORT
  mkdir -p "$WORK/pg/$1"
  as_postgres "$PGBIN/initdb" -D "$WORK/pg/$1/data" --auth=trust --username=postgres --no-sync >/dev/null
  start_pg_server "$WORK/pg/$1/data" "$2" "$WORK/pg/$1" "$WORK/postgres-$1.log" -c listen_addresses=127.0.0.1
}
PG_PORT=$(free_port) PG2_PORT=$(free_port) REDIS_PORT=$(free_port) REDIS2_PORT=$(free_port)
start_postgres source "$PG_PORT"
start_postgres fresh "$PG2_PORT"
for port in "$REDIS_PORT" "$REDIS2_PORT"; do
  redis-server --port "$port" --bind 127.0.0.1 --dir "$WORK" --dbfilename "dump-$port.rdb" --save "" \
    --appendonly no --repl-diskless-sync-delay 0 >"$WORK/redis-$port.log" &
  PIDS+=($!)
done
PG="postgres://postgres@127.0.0.1:$PG_PORT" PG2="postgres://postgres@127.0.0.1:$PG2_PORT"
until "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" && "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PG2_PORT" \
  && redis-cli -p "$REDIS_PORT" PING >/dev/null 2>&1 && redis-cli -p "$REDIS2_PORT" PING >/dev/null 2>&1; do
  sleep 0.1
done
"$PGBIN/psql" -X -q -d "$PG/postgres" -c "CREATE DATABASE aitbc"

echo "== a blockchain node writing 50 blocks/s into $WORK/node, mirrored into PostgreSQL and Redis"
"$BIN/aitbc-node-sim" --data-dir "$WORK/node" --rate 50 --receipt-log-bytes 20000 \
  --mirror-postgres "$PG/aitbc" --mirror-redis "127.0.0.1:$REDIS_PORT" >"$WORK/node.log" &
PIDS+=($!)

echo "== repository on the embedded default ($REPOSITORY)"
"$BIN/aitbc-backup" repo --repository "$REPOSITORY" init

echo "== certs init, coordinator on $COORDINATOR, one agent per component"
"$BIN/aitbc-backup" certs init --dir "$WORK/certs" >/dev/null
env AITBC_BACKUP_TLS__CERT="$WORK/certs/coordinator.pem" \
    AITBC_BACKUP_TLS__KEY="$WORK/certs/coordinator.key" \
    AITBC_BACKUP_TLS__CA="$WORK/certs/ca.pem" \
    AITBC_BACKUP_SERVER__GRPC_LISTEN="127.0.0.1:$GRPC_PORT" \
    AITBC_BACKUP_SERVER__HTTP_LISTEN="127.0.0.1:$(free_port)" \
    AITBC_BACKUP_REPOSITORY__URL="$REPOSITORY" \
    "$BIN/aitbc-backup-coordinator" 2>"$WORK/coordinator.log" &
PIDS+=($!)
for component in postgres redis ledger; do
  env AITBC_BACKUP_TLS__CERT="$WORK/certs/agent-$component.pem" \
      AITBC_BACKUP_TLS__KEY="$WORK/certs/agent-$component.key" \
      AITBC_BACKUP_TLS__CA="$WORK/certs/ca.pem" \
      AITBC_BACKUP_COMPONENT="$component" \
      AITBC_BACKUP_COORDINATOR__URL="$COORDINATOR" \
      AITBC_BACKUP_HTTP__LISTEN="127.0.0.1:$(free_port)" \
      AITBC_BACKUP_REPOSITORY__URL="$REPOSITORY" \
      AITBC_BACKUP_POSTGRES__URL="$PG/postgres" \
      AITBC_BACKUP_POSTGRES__DATABASES='["aitbc"]' \
      AITBC_BACKUP_POSTGRES__FENCE_TABLES='["aitbc.public.chain_blocks"]' \
      AITBC_BACKUP_POSTGRES__SCRATCH_DIR="$WORK/scratch-$component" \
      AITBC_BACKUP_POSTGRES__WAL__ARCHIVE=true \
      AITBC_BACKUP_REDIS__ADDRESS="127.0.0.1:$REDIS_PORT" \
      AITBC_BACKUP_LEDGER__DATA_DIR="$WORK/node" \
      AITBC_BACKUP_LEDGER__SCRATCH_DIR="$WORK/scratch-$component" \
      "$BIN/aitbc-backup-agent" 2>"$WORK/agent-$component.log" &
  PIDS+=($!)
done

export AITBC_CLI_COORDINATOR="$COORDINATOR" AITBC_CLI_CERT="$WORK/certs/operator.pem" \
  AITBC_CLI_KEY="$WORK/certs/operator.key" AITBC_CLI_CA="$WORK/certs/ca.pem"
CLI="$BIN/aitbc-backup"
for _ in $(seq 1 100); do
  online=$("$CLI" agents list --json 2>/dev/null | grep -c '"state": "online"' || true)
  [ "$online" = 3 ] && break
  sleep 0.1
done
"$CLI" agents list
[ "$online" = 3 ] || { echo "demo: not every agent came online" >&2; cat "$WORK"/*.log >&2; exit 1; }
sleep 2  # let the node write some blocks
has_base_backup() {
  "$BIN/aitbc-backup" --json repo --repository "$REPOSITORY" wal ls \
    | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["base_backups"] else 1)'
}
for _ in $(seq 1 300); do has_base_backup && break; sleep 0.2; done
has_base_backup || { echo "demo: the PostgreSQL agent took no base backup" >&2; cat "$WORK/agent-postgres.log" >&2; exit 1; }
echo "== WAL archiving on: the PostgreSQL agent took a base backup and streams WAL into the repository"
"$BIN/aitbc-backup" repo --repository "$REPOSITORY" wal ls

echo "== snapshot create --mode fenced --wait (all three components at one cut, node still writing)"
"$CLI" snapshot create --mode fenced --wait --json >"$WORK/events.json"
SET=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["set"])' "$WORK/events.json")
"$CLI" snapshot show "$SET"
echo "== snapshot list"
"$CLI" snapshot list

echo "== restore $SET into a fresh PostgreSQL, a fresh Redis and a fresh directory (in order, each verified)"
"$CLI" restore "$SET" --target "postgres=$PG2/postgres" --target "redis=127.0.0.1:$REDIS2_PORT" \
  --target "ledger=$WORK/restored-node"
echo "== verify $SET --read-data (every chunk downloaded and re-hashed)"
"$CLI" verify "$SET" --read-data

echo "== point-in-time restore of PostgreSQL to $SET's restore point (base backup + archived WAL)"
sleep 2  # the WAL past the restore point reaches the repository within a second
PG3_PORT=$(free_port)
mkdir -p "$WORK/pg/pitr"
[ "$(id -u)" = 0 ] && chown postgres:postgres "$WORK/pg/pitr"
env AITBC_BACKUP_COMPONENT=postgres AITBC_BACKUP_REPOSITORY__URL="$REPOSITORY" \
    AITBC_BACKUP_POSTGRES__SCRATCH_DIR="$WORK/scratch-pitr" AITBC_BACKUP_LOG__LEVEL=warn \
    "$BIN/aitbc-backup-agent" pitr-restore --to-set "$SET" --data-dir "$WORK/pg/pitr/data" >"$WORK/pitr.json"
python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("   base backup %s + %d WAL files, %s; %.1f s" % (r["base_backup"], r["wal_files"], r["stopped"], r["seconds"]))' "$WORK/pitr.json"
[ "$(id -u)" = 0 ] && chown -R postgres:postgres "$WORK/pg"
start_pg_server "$WORK/pg/pitr/data" "$PG3_PORT" "$WORK/pg/pitr" "$WORK/postgres-pitr.log" -c listen_addresses=127.0.0.1
until "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PG3_PORT"; do sleep 0.1; done
PITR_H=$("$PGBIN/psql" -X -At -d "postgres://postgres@127.0.0.1:$PG3_PORT/aitbc" -c 'SELECT max(height) FROM chain_blocks')

LEDGER_H=$(python3 -c 'import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("SELECT max(height) FROM block").fetchone()[0])' "$WORK/restored-node/chain/chain.db")
PG_H=$("$PGBIN/psql" -X -At -d "$PG2/aitbc" -c 'SELECT max(height) FROM chain_blocks')
REDIS_H=$(redis-cli -p "$REDIS2_PORT" GET chain:head | python3 -c 'import json,sys; print(json.load(sys.stdin)["height"])')
LIVE_H=$(python3 -c 'import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("SELECT max(height) FROM block").fetchone()[0])' "$WORK/node/chain/chain.db")
echo "== summary"
SUMMARY='import json,sys; s=[json.loads(l) for l in open(sys.argv[1])][-1]["snapshot"]
print("mode %s, cut skew %.1f ms, writers paused %.1f ms" % (s["mode"], s["cut_skew_ms"], s["write_pause_ms"]))'
echo "   set $SET: $(python3 -c "$SUMMARY" "$WORK/events.json")"
echo "   restored heights: ledger $LEDGER_H, PostgreSQL $PG_H, Redis $REDIS_H (the live node is at $LIVE_H now)"
echo "   point-in-time restore to the set's restore point: PostgreSQL height $PITR_H"
[ "$PITR_H" = "$PG_H" ] || { echo "demo: the restore point does not hold the set's PostgreSQL state" >&2; exit 1; }
if [ "$LEDGER_H" -ge "$PG_H" ] && [ "$PG_H" -ge "$REDIS_H" ] && [ $((REDIS_H + 1)) -ge "$LEDGER_H" ]; then
  echo "   one consistent cut: ledger >= PostgreSQL >= Redis >= ledger - 1"
else
  echo "demo: restored heights are not one cut" >&2; exit 1
fi
