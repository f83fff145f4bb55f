#!/usr/bin/env bash
# The project's test command: formatting, lints, then every test (unit, real-kernel in
# throw-away network namespaces and a qemu VM, agent end-to-end, simulated cluster).
# Real-kernel tests need root; without it they report SKIPPED, and under CI=true they fail.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
mkdir -p target
cargo test --workspace --all-targets --locked 2>&1 | tee target/test-output.txt
# One closing line for the whole run.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' target/test-output.txt | tee target/test-summary.txt
