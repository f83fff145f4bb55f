#!/usr/bin/env bash
# The project's test command: formatting, lints, then every test (unit, real-kernel in
# throw-away network namespaces, and agent end-to-end). Real-kernel tests need root; without
# it they report SKIPPED, and under CI=true they fail.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked
