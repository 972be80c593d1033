#!/usr/bin/env bash
# Long runs of the randomized tests that scripts/test.sh runs small. Counts are arguments:
#   scripts/soak.sh [gc-race backups (default 300)] [unpacker property cases (default 20000)]
# Each prints its seed; a failure names what broke.
set -euo pipefail
cd "$(dirname "$0")/.."
BACKUPS=${1:-300}
CASES=${2:-20000}
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}

bash scripts/setup.sh
cargo build --workspace --locked
AITBC_GC_RACE_BACKUPS=$BACKUPS cargo test --locked -p aitbc-backup-tests --test gc_race -- --nocapture
PROPTEST_CASES=$CASES cargo test --locked -p aitbc-backup-agent proptest -- --nocapture
# The torn-read regressions, repeated: each run writes and checkpoints inside the read window.
for _ in $(seq 1 20); do
  cargo test --locked -p aitbc-backup-agent ledger::backup::tests -- --quiet
done
