#!/usr/bin/env bash
# Builds the fuzz targets in fuzz/ with libFuzzer's coverage instrumentation on the stable
# toolchain (no cargo-fuzz, no nightly) and runs each for a bounded time on its committed
# corpus. Exits non-zero when any target crashes, hangs or runs out of memory; the input that
# did it is left in fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     SECONDS per target (default 15), all targets
#                                             when none is named
#   FUZZ_MERGE=1 scripts/fuzz.sh 300 ...      also fold what the run found into the committed
#                                             corpus, minimized (-merge=1) and cut to
#                                             FUZZ_MERGE_MAX_LEN bytes (default 1024) so it stays
#                                             small; the seed-* inputs stay whole
#
# The inputs a run finds go to fuzz/target/corpus/<target> (not committed), so a run leaves
# the work tree clean unless FUZZ_MERGE is set.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-15}
shift || true
case "$seconds" in
  '' | *[!0-9]*) echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...]" >&2; exit 2 ;;
esac
if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  targets=()
  for f in fuzz/fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi

# What cargo-fuzz passes, less the sanitizer (nightly only): sancov's 8-bit counters, PC table
# and compare tracing feed libFuzzer; debug assertions and overflow checks turn silent wrong
# arithmetic into findings. An explicit --target keeps these flags off build scripts and
# proc-macros, which are not linked with libFuzzer.
host=$(rustc -vV | awk '/^host:/{print $2}')
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
build_start=$(date +%s)
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
cargo build --manifest-path fuzz/Cargo.toml --release --locked --target "$host" --target-dir fuzz/target "${bins[@]}"
echo "fuzz: built ${#targets[@]} targets in $(($(date +%s) - build_start)) s"

failed=()
for t in "${targets[@]}"; do
  bin="fuzz/target/$host/release/$t"
  corpus="fuzz/corpus/$t"
  found="fuzz/target/corpus/$t"
  artifacts="fuzz/artifacts/$t"
  mkdir -p "$corpus" "$found" "$artifacts"
  # Room for the largest committed input, and at least 4 KiB to grow into.
  max_len=$(find "$corpus" -type f -printf '%s\n' | sort -n | tail -1)
  max_len=$((${max_len:-0} > 4096 ? ${max_len:-0} : 4096))
  log="fuzz/target/$t.log"
  echo "fuzz: $t for ${seconds} s (max_len $max_len)"
  status=0
  "$bin" "$found" "$corpus" -max_total_time="$seconds" -max_len="$max_len" -rss_limit_mb=2048 -timeout=10 \
    -print_final_stats=1 -artifact_prefix="$artifacts/" >"$log" 2>&1 || status=$?
  done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true)
  execs=$(awk '/stat::number_of_executed_units/{print $2}' "$log")
  rate=$(awk '/stat::average_exec_per_sec/{print $2}' "$log")
  echo "fuzz: $t: status $status, ${execs:-?} executions, ${rate:-?} exec/s, ${done_line:-no DONE line}"
  if [ "$status" -ne 0 ]; then
    failed+=("$t")
    # The crash report: libFuzzer's summary and the panic or signal before it.
    grep -E -B2 -A30 'panicked|ERROR: libFuzzer|SUMMARY|deadly signal|out-of-memory|timeout' "$log" | head -80 >&2 || tail -50 "$log" >&2
    continue
  fi
  if [ "${FUZZ_MERGE:-}" = 1 ]; then
    merged="fuzz/target/merged/$t"
    rm -rf "$merged" && mkdir -p "$merged"
    # The seeds stay whatever they cover; the rest is only what adds coverage to them, as
    # inputs cut to the merge length (libFuzzer keeps what the cut input covers).
    find "$corpus" -type f -name 'seed-*' -exec cp {} "$merged"/ \;
    "$bin" -merge=1 -max_len="${FUZZ_MERGE_MAX_LEN:-1024}" "$merged" "$corpus" "$found" >>"$log" 2>&1
    find "$corpus" -type f -delete
    cp "$merged"/* "$corpus"/
    echo "fuzz: $t: corpus now $(find "$corpus" -type f | wc -l) inputs, $(du -sk "$corpus" | cut -f1) KiB"
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]} (inputs in fuzz/artifacts/, logs in fuzz/target/*.log)" >&2
  exit 1
fi
echo "fuzz: every target ran ${seconds} s without a crash"
