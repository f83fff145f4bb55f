#!/usr/bin/env bash
# Real-kernel IPVS check. This machine's kernel may have no IPVS, so this boots Debian's cloud
# kernel under qemu (TCG; no KVM needed) with ip_vs loaded from an initramfs, and runs inside it:
# ipvsadm creates a virtual server with two real servers, then sets one's weight to 0, then
# deletes it. At each step it prints `ipvsadm -Ln` and `kube-converge inspect --mode ipvs -o json`
# between @@ markers; agent/tests/ipvs_vm.rs compares them.
#
# usage: scripts/ipvs-vm.sh PATH/TO/kube-converge   (needs root for apt-get download only)
#        scripts/ipvs-vm.sh --bench PATH/TO/read_cost SERVICES ENDPOINTS RUNS
#   The second form runs the read-cost benchmark in the VM instead (`read_cost ipvs ...`: the
#   agent's IPVS reads against `ipvsadm -Ln`, side by side) and prints its result line.
# needs: qemu-system-x86, busybox-static, cpio, ipvsadm (apt-get install ...)
set -euo pipefail
bench=""
if [ "${1:-}" = "--bench" ]; then
  shift
  bench="${2:?usage: $0 --bench PATH/TO/read_cost SERVICES ENDPOINTS RUNS} ${3:?ENDPOINTS} ${4:?RUNS}"
  case "$bench" in *[!0-9\ ]*) echo "SERVICES, ENDPOINTS and RUNS must be numbers" >&2; exit 2 ;; esac
fi
bin=$(readlink -f "${1:?usage: $0 PATH/TO/kube-converge}")
work=${IPVS_VM_DIR:-$(dirname "$0")/../target/ipvs-vm}
mkdir -p "$work"
work=$(readlink -f "$work")

# 1. The kernel package: the current dependency of linux-image-cloud-amd64.
pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
if [ -z "$pkg" ]; then
  apt-get update -qq
  pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
fi
if ! ls "$work"/"$pkg"_*.deb >/dev/null 2>&1; then
  (cd "$work" && apt-get download "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
fi
deb=$(ls "$work"/"$pkg"_*.deb | head -n1)
kroot="$work/kernel"
if [ ! -d "$kroot/boot" ]; then
  rm -rf "$kroot"
  dpkg-deb -x "$deb" "$kroot"
fi
vmlinuz=$(ls "$kroot"/boot/vmlinuz-* | head -n1)
moddir=$(ls -d "$kroot"/lib/modules/* | head -n1)/kernel

# 2. The initramfs: static busybox, the modules, kube-converge and ipvsadm with their libraries.
root="$work/root"
rm -rf "$root"
mkdir -p "$root"/{bin,proc,sys,dev,tmp,modules}
cp /bin/busybox "$root/bin/busybox"
for m in lib/libcrc32c net/ipv4/netfilter/nf_defrag_ipv4 net/ipv6/netfilter/nf_defrag_ipv6 \
         net/netfilter/nf_conntrack net/netfilter/ipvs/ip_vs net/netfilter/ipvs/ip_vs_rr; do
  src=$(ls "$moddir/$m".ko* | head -n1)
  case "$src" in
    *.xz) xz -dc "$src" > "$root/modules/$(basename "$m").ko" ;;
    *.zst) zstd -qdc "$src" > "$root/modules/$(basename "$m").ko" ;;
    *) cp "$src" "$root/modules/$(basename "$m").ko" ;;
  esac
done
# Debug info is most of a debug build; the VM's memory holds the whole initramfs.
strip --strip-debug -o "$root/bin/$(basename "$bin")" "$bin"
cp "$(command -v ipvsadm)" "$root/bin/ipvsadm"
for f in "$bin" "$(command -v ipvsadm)"; do
  ldd "$f" | grep -o '/[^ ]*' | while read -r lib; do cp --parents -L "$lib" "$root/"; done
done
# What both forms of /init do first: tools, filesystems, the IPVS modules, loopback up.
cat > "$root/prelude" <<'PRELUDE'
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "@@BOOTED $(cut -d' ' -f1 /proc/uptime)"
for m in libcrc32c nf_defrag_ipv4 nf_defrag_ipv6 nf_conntrack ip_vs ip_vs_rr; do
  insmod /modules/$m.ko || echo "@@ERROR insmod $m failed"
done
ip link set lo up
PRELUDE
# 3. Boot. TCG: KVM may be unusable on the build machine.
boot() { # TIMEOUT MEMORY_MIB
  chmod +x "$root/init"
  (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/initrd.gz"
  exec timeout "$1" qemu-system-x86_64 -machine q35,accel=tcg -cpu max -m "$2" -smp 1 -nographic -no-reboot \
    -kernel "$vmlinuz" -initrd "$work/initrd.gz" -append "console=ttyS0 panic=-1 quiet"
}
if [ -n "$bench" ]; then
  cat > "$root/init" <<INIT
#!/bin/busybox sh
. /prelude
# The benchmark's real servers are in 10.240.0.0/12: local addresses, so ipvsadm accepts them.
ip addr add 10.240.0.1/12 dev lo
echo "@@BENCH \$($(basename "$bin") ipvs $bench 2>&1 | tr '\n' ' ')"
poweroff -f
INIT
  boot 3600 3072
fi
cat > "$root/init" <<'INIT'
#!/bin/busybox sh
. /prelude
# Real servers need a route to their address, or ipvsadm reports "address not unicast".
ip addr add 10.180.0.1/32 dev lo
ip addr add 10.180.0.2/32 dev lo
ip -6 addr add fd00:10:180::1/128 dev lo
step() {
  echo "@@STEP $1"
  echo "@@IPVSADM"
  ipvsadm -Ln
  echo "@@INSPECT"
  kube-converge inspect --mode ipvs -o json 2>&1
  echo "@@END"
}
start=$(cut -d' ' -f1 /proc/uptime)
ipvsadm -A -t 10.96.0.10:80 -s rr
ipvsadm -a -t 10.96.0.10:80 -r 10.180.0.1:8080 -m -w 1
ipvsadm -a -t 10.96.0.10:80 -r 10.180.0.2:8080 -m -w 1
ipvsadm -A -u [fd00:96::10]:53 -s rr
ipvsadm -a -u [fd00:96::10]:53 -r [fd00:10:180::1]:5353 -m -w 1
step two-servers
# Targeted reads (what the agent does while a change is pending): by key for addresses, by a
# dump for NodePorts (*:PORT), none for a frontend with no virtual server.
echo "@@TARGETED"
kube-converge inspect --mode ipvs --frontend 10.96.0.10:80 --frontend '[fd00:96::10]:53' --frontend 10.96.0.99:80 -o json 2>&1
echo "@@TEND"
echo "@@NODEPORT"
kube-converge inspect --mode ipvs --frontend '*:80' -o json 2>&1
echo "@@NEND"
ipvsadm -e -t 10.96.0.10:80 -r 10.180.0.2:8080 -m -w 0
step weight-zero
ipvsadm -d -t 10.96.0.10:80 -r 10.180.0.2:8080
step deleted
# Every virtual server gone (kube-proxy switching modes): not found, never "routes nothing".
ipvsadm -C
echo "@@CLEARED"
kube-converge inspect --mode ipvs -o json 2>&1
kube-converge inspect --mode ipvs --frontend 10.96.0.10:80 -o json 2>&1
echo "@@CEND"
echo "@@TESTED $start $(cut -d' ' -f1 /proc/uptime)"
poweroff -f
INIT
boot 300 1024
