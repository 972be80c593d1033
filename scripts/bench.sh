#!/usr/bin/env bash
# Benchmarks (release builds). Prints one JSON line per measurement.
#   scripts/bench.sh sessions [N] [DURATION]   coordinator holding N agent sessions (default 2000, 60s)
#   scripts/bench.sh repository [BIG_GIB]      1 GiB ledger-like data vs tar czf, tar+zstd, restic;
#                                              peak RSS on a BIG_GIB stream (default 10)
#   scripts/bench.sh encryption                the same 1 GiB: sealed (least-knowledge) encryption
#                                              against version 1's, backup, restore, peak RSS
#   scripts/bench.sh ledger                    a 1 GiB node data directory: the ledger component
#                                              vs tar czf and restic, full, +1 % blocks, restore
#   scripts/bench.sh postgres [--scale N]      pgbench scale 50: the postgres component vs pg_dump -Fc
#                                              (-Z0, default, | gzip) and pg_restore -j2 from a file
#   scripts/bench.sh redis [--keys N]          ~1 GB in Redis: the redis component vs redis-cli --rdb
#                                              (and | gzip); restore live vs restart with dump.rdb
#   scripts/bench.sh pitr [--scale N]          pgbench scale 50 with WAL archiving: base backup and
#                                              point-in-time restore vs pgBackRest 2.45 (zst, 2 procs)
#   scripts/bench.sh locks [CHUNKS]            Object Lock upkeep: requests and time to extend the
#                                              locks of CHUNKS kept chunks (default 100000) on radosgw
#   scripts/bench.sh sets [--sets N]           snapshot sets: cut skew of N coordinated sets, fenced
#                                              write pause with ~1 GB in Redis, a full set (~1 GB per
#                                              component) and its ordered restore vs the old scripts
set -euo pipefail
cd "$(dirname "$0")/.."

scenario="${1:-sessions}"
cargo build --release --workspace --locked --quiet
BIN="$PWD/target/release"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh bench

bench_sessions() {
  local sessions="${1:-2000}" duration="${2:-60s}"
  # Each session holds a socket on both ends.
  ulimit -n "$(ulimit -Hn)"
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

bench_repository() {
  local big="${1:-10}"
  command -v restic >/dev/null && command -v zstd >/dev/null || {
    echo "[bench] installing restic and zstd (baselines)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq restic zstd >/dev/null
  }
  bash scripts/setup.sh
  local tools="${AITBC_TOOLS_DIR:-$HOME/.local/share/aitbc-backup/tools}"
  # The generated data is kept between runs (it takes a while and is deterministic).
  local data_dir="${AITBC_BENCH_DIR:-/tmp/aitbc-bench-repository}"
  mkdir -p "$data_dir"
  python3 bench/repository.py --bin "$BIN" --work "$data_dir" --s3s-fs "$tools/bin/s3s-fs" \
    --big-stream-gib "$big"
}

bench_encryption() {
  local data_dir="${AITBC_BENCH_DIR:-/tmp/aitbc-bench-repository}"
  mkdir -p "$data_dir"
  python3 bench/repository.py --bin "$BIN" --work "$data_dir" --s3s-fs none --encryption-only
}

bench_ledger() {
  command -v restic >/dev/null || {
    echo "[bench] installing restic (baseline)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq restic >/dev/null
  }
  # The generated node data is kept between runs (it takes a while and is deterministic).
  local data_dir="${AITBC_BENCH_DIR:-/tmp/aitbc-bench-ledger}"
  mkdir -p "$data_dir"
  python3 bench/ledger.py --bin "$BIN" --work "$data_dir" "$@"
}

bench_postgres() {
  bash scripts/setup.sh
  # The pgbench cluster is kept between runs (initializing scale 50 takes a while).
  local data_dir="${AITBC_BENCH_DIR:-/tmp/aitbc-bench-postgres}"
  mkdir -p "$data_dir"
  python3 bench/postgres.py --bin "$BIN" --work "$data_dir" "$@"
}

bench_redis() {
  bash scripts/setup.sh
  python3 bench/redis.py --bin "$BIN" --work "${AITBC_BENCH_DIR:-/tmp/aitbc-bench-redis}" "$@"
}

bench_pitr() {
  bash scripts/setup.sh
  command -v pgbackrest >/dev/null || {
    echo "[bench] installing pgbackrest (baseline)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbackrest >/dev/null
  }
  # The pgbench cluster is kept between runs (initializing scale 50 takes a while).
  python3 bench/pitr.py --bin "$BIN" --work "${AITBC_BENCH_DIR:-/tmp/aitbc-bench-pitr}" "$@"
}

bench_sets() {
  bash scripts/setup.sh
  # The pgbench data and the 1 GiB node directory are kept between runs.
  python3 bench/sets.py --bin "$BIN" --work "${AITBC_BENCH_DIR:-/tmp/aitbc-bench-sets}" "$@"
}

bench_locks() {
  local chunks="${1:-100000}"
  bash scripts/setup.sh
  # radosgw, not moto: it enforces Object Lock like AWS, and moto held 24 GB for 78,000 chunks.
  local port; port=$(free_port)
  RGW_ACCESS_KEY=bench RGW_SECRET_KEY=bench-secret-key RGW_MEMSTORE_BYTES=$((8 << 30)) \
    bash scripts/rgw.sh "$WORK/rgw" "$port" \
    >"$WORK/rgw.log" 2>&1 &
  PIDS+=("$!")
  for _ in $(seq 120); do [ -e "$WORK/rgw/ready" ] && break; sleep 0.5; done
  [ -e "$WORK/rgw/ready" ] || { cat "$WORK/rgw.log" >&2; exit 1; }
  export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret-key AWS_REGION=us-east-1 \
    AWS_EC2_METADATA_DISABLED=true
  local tools="${AITBC_TOOLS_DIR:-$HOME/.local/share/aitbc-backup/tools}"
  "$tools/venv/bin/aws" --endpoint-url "http://127.0.0.1:$port" s3api create-bucket \
    --bucket locks --object-lock-enabled-for-bucket >/dev/null
  "$BIN/aitbc-backup-lock-bench" "http://127.0.0.1:$port" locks "$chunks"
}

case "$scenario" in
  sessions) shift || true; bench_sessions "$@" ;;
  repository) shift || true; bench_repository "$@" ;;
  encryption) bench_encryption ;;
  ledger) shift || true; bench_ledger "$@" ;;
  postgres) shift || true; bench_postgres "$@" ;;
  redis) shift || true; bench_redis "$@" ;;
  sets) shift || true; bench_sets "$@" ;;
  pitr) shift || true; bench_pitr "$@" ;;
  locks) shift || true; bench_locks "$@" ;;
  *) echo "unknown scenario $scenario" >&2; exit 2 ;;
esac
