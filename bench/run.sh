#!/usr/bin/env bash
# Every benchmark of bench/RESULTS.md, one after the other, at the sizes recorded there.
# Needs root (network namespaces). Takes about an hour at SERVICES=10000, most of it loading
# the nftables rulesets; SERVICES=1000 takes a few minutes.
#
#   sudo bench/run.sh                 # everything, 10k Services
#   sudo SERVICES=1000 bench/run.sh   # quicker
#   sudo bench/run.sh read_cost       # one harness (read_cost, detection, footprint,
#                                     # api_write_load, hold_api_load, sim-accuracy,
#                                     # traffic_cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
SERVICES="${SERVICES:-10000}"
only="${1:-all}"
want() { [ "$only" = all ] || [ "$only" = "$1" ]; }

cargo build --release --bin kube-converge -p kube-converge -p kube-converge-sim --examples
ex=target/release/examples
echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) $(git rev-parse --short HEAD) $(uname -r) $(nproc) cores"

if want read_cost; then
  for mode in iptables-nft iptables-legacy nftables; do
    echo "## read_cost $mode $SERVICES 5 5"
    "$ex/read_cost" "$mode" "$SERVICES" 5 5
  done
  # IPVS exists only in the qemu VM (Debian's cloud kernel, TCG): the same harness runs there.
  echo "## read_cost ipvs $SERVICES 5 3 (in the qemu VM)"
  scripts/ipvs-vm.sh --bench "$ex/read_cost" "$SERVICES" 5 3 | tr -d '\r' | sed -n 's/.*@@BENCH //p'
fi
if want detection; then
  for mode in iptables iptables-legacy nftables; do
    echo "## detection $mode 30 100"
    "$ex/detection" "$mode" 30 100
  done
fi
if want footprint; then
  for mode in iptables-nft nftables; do
    echo "## footprint $SERVICES 10 60 30 100 $mode"
    "$ex/footprint" "$SERVICES" 10 60 30 100 "$mode"
  done
fi
if want api_write_load; then
  echo "## api_write_load 50 60 120"
  "$ex/api_write_load" 50 60 120
fi
if want hold_api_load; then
  for slow in 3000 10000; do
    echo "## hold_api_load 3 $slow"
    "$ex/hold_api_load" 3 "$slow"
  done
fi
if want sim-accuracy; then
  echo "## sim-accuracy 5 5"
  bench/sim-accuracy.sh 5 5
fi
if want traffic_cpu; then
  echo "## traffic_cpu 10000 10"
  "$ex/traffic_cpu" 10000 10
fi
