#!/usr/bin/env bash
# The project's test command: formatting, lints, then every test (unit, real-kernel in
# throw-away network namespaces and a qemu VM, agent end-to-end, simulated cluster).
# Tests that need root (network namespaces, kernel rules) or a tool are #[ignore = "needs …"]:
# a plain `cargo test` reports them ignored. Here they run whenever we are root or under
# CI=true, and a missing prerequisite then fails them.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
mkdir -p target
ignored=()
if [ "$(id -u)" = 0 ] || [ "${CI:-}" = true ]; then
  ignored=(--include-ignored)
else
  echo "not root: the tests that need root are reported ignored (run as root to include them)" >&2
fi
cargo test --workspace --all-targets --locked --no-fail-fast -- "${ignored[@]}" 2>&1 | tee target/test-output.txt
# One closing line for the whole run.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i; if ($(i+1) ~ /^ignored;?$/) g += $i } }
     END { printf "tests: %d passed, %d failed, %d ignored\n", p, f, g }' target/test-output.txt | tee target/test-summary.txt
