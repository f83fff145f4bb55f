#!/usr/bin/env bash
# How far the agents' t_programmed lies after the kernel truth, in the simulated cluster:
# runs `kube-converge-sim` RUNS times per kube-proxy mode and summarises AGENT - TRUTH
# (the agent's programmed time minus the moment the emulator started writing the change).
# usage: sudo bench/sim-accuracy.sh [RUNS] [NODES]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
nodes=${2:-5}
cargo build --release --locked -q -p kube-converge-sim
bin=target/release/kube-converge-sim
echo "# sim accuracy: $runs runs x $nodes nodes x 2 removals per mode, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores"
printf '%-16s %6s %9s %9s %9s %9s\n' mode samples min p50 p99 max
for mode in iptables nftables iptables-legacy; do
  vals=$(for _ in $(seq "$runs"); do
    "$bin" --nodes "$nodes" --proxy-mode "$mode" --slow none --metrics-port 0 2>/dev/null \
      | awk '$NF ~ /^[+-][0-9.]+s$/ { v = $NF; sub(/s$/, "", v); print v * 1000 }'
  done | sort -n)
  n=$(echo "$vals" | grep -c . || true)
  pick() { echo "$vals" | awk -v q="$1" -v n="$n" 'NR == (int(q * (n - 1)) + 1) { printf "%.1fms", $1 }'; }
  printf '%-16s %6s %9s %9s %9s %9s\n' "$mode" "$n" "$(pick 0)" "$(pick 0.5)" "$(pick 0.99)" "$(pick 1)"
done
