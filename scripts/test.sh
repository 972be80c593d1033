#!/usr/bin/env bash
# Runs everything CI runs: setup (skips what is installed), formatting, lints, every test.
set -euo pipefail
# No incremental cache: a CI build runs once and the cache would double the target directory.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The integration tests start the real binaries, so build them first.
cargo build --workspace --locked
cargo test --workspace --locked
