#!/usr/bin/env bash
# Runs everything CI runs: setup (skips what is installed), formatting, lints, every test.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The integration tests start the real binaries, so build them first.
cargo build --workspace --locked
cargo test --workspace --locked
