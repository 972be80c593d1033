#!/usr/bin/env bash
# Long runs of the randomized tests that scripts/test.sh runs small. Counts are arguments:
#   scripts/soak.sh [backups (default 300)] [property cases (default 20000)]
# (the crash loop kills a tenth as many sets as there are backups)
# backups: the GC race's backups, and successive backups of a writing node per rate;
# property cases: generated hostile archives, unpacked and restored.
# Each randomized test prints its seed; a failure names what broke.
set -euo pipefail
cd "$(dirname "$0")/.."
BACKUPS=${1:-300}
CASES=${2:-20000}
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}

bash scripts/setup.sh
cargo build --workspace --locked
AITBC_GC_RACE_BACKUPS=$BACKUPS cargo test --locked -p aitbc-backup-tests --test gc_race -- --nocapture
AITBC_CRASH_LOOPS=$((BACKUPS / 10)) cargo test --locked -p aitbc-backup-tests --test crash_loop -- --nocapture
AITBC_LIVE_SETS=$((BACKUPS / 30)) AITBC_LIVE_BACKUPS=$BACKUPS cargo test --locked -p aitbc-backup-tests --test live_source -- --nocapture
PROPTEST_CASES=$CASES cargo test --locked -p aitbc-backup-agent --test confinement
PROPTEST_CASES=$((CASES / 10)) cargo test --locked -p aitbc-backup-tests --test ledger generated_archive
# The torn-read regressions and the HTTP fault run, repeated with new seeds.
for _ in $(seq 1 20); do
  cargo test --locked -p aitbc-backup-agent ledger::backup::tests -- --quiet
  cargo test --locked -p aitbc-backup-tests --test s3_faults -- --quiet
done
