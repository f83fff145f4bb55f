#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets (fuzz/corpus/<target>/seed-*).

The dataplane seeds are what the kernel really hands the readers: the kube-proxy fixtures
(agent/tests/fixtures/kube-proxy) are loaded into a throw-away network namespace with nft,
iptables-nft-restore and iptables-legacy-restore, and the nf_tables dumps, the legacy nat
blob and the notifications they cause are captured raw. The xt, IPVS, conntrack and JSON
seeds are encoded here the way the agent's unit-test builders encode them. Needs root (a
network namespace); run from anywhere: `sudo python3 fuzz/seeds.py`. `python3 fuzz/seeds.py
conntrack` writes only the conntrack seeds, without root.
"""

import ctypes
import json
import os
import socket
import struct
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "agent/tests/fixtures/kube-proxy")
CORPUS = os.path.join(ROOT, "fuzz/corpus")

NETLINK_NETFILTER = 12
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 1, 4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETRULE, NFT_MSG_GETSET, NFT_MSG_GETSETELEM = 7, 10, 13
NFPROTO_IPV4, NFPROTO_IPV6 = 2, 10


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)
    print(f"{target}/seed-{name}: {len(data)} bytes")


def nla(kind, data):
    out = struct.pack("=HH", 4 + len(data), kind) + data
    return out + b"\0" * (-len(out) % 4)


def fixture(name):
    return os.path.join(FIXTURES, name)


def run(*cmd, stdin=None):
    subprocess.run(cmd, check=True, stdin=stdin)


# --- nf_tables dumps --------------------------------------------------------------------------


def nft_dump(family, cmd, attrs):
    """Every message of one nf_tables dump, raw, without the final DONE."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    s.bind((0, 0))
    body = struct.pack("=BBH", family, 0, 0) + attrs
    hdr = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_NFTABLES << 8) | cmd, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
    s.send(hdr + body)
    msgs = []
    while True:
        buf = s.recv(1 << 20)
        off = 0
        while off + 16 <= len(buf):
            length, kind = struct.unpack_from("=IH", buf, off)
            if kind == NLMSG_DONE:
                s.close()
                return msgs
            if kind == NLMSG_ERROR:
                raise OSError(f"nf_tables dump failed: {buf[off:off + length]!r}")
            msgs.append(buf[off:off + length])
            off += (length + 3) & ~3


def cstr(name):
    return name.encode() + b"\0"


def set_names(set_msgs):
    names = []
    for m in set_msgs:
        off = 20
        while off + 4 <= len(m):
            alen, kind = struct.unpack_from("=HH", m, off)
            if alen < 4:
                break
            if kind & 0x3FFF == 2:  # NFTA_SET_NAME
                names.append(m[off + 4:off + alen].rstrip(b"\0").decode())
            off += (alen + 3) & ~3
    return names


def table_stream(family, table):
    """Rules, then each set followed by its elements: the stream the nftables target reads."""
    rules = nft_dump(family, NFT_MSG_GETRULE, nla(1, cstr(table)))
    sets = nft_dump(family, NFT_MSG_GETSET, nla(1, cstr(table)))
    stream = list(rules)
    per_set = []
    for msg, name in zip(sets, set_names(sets)):
        elems = nft_dump(family, NFT_MSG_GETSETELEM, nla(1, cstr(table)) + nla(2, cstr(name)))
        stream.append(msg)
        stream.extend(elems)
        per_set.append((name, [msg] + elems))
    return rules, per_set, stream


def nftables_seeds():
    for name, family, table in [
        ("nft_TestOverallNFTablesRules_loadable.nft", NFPROTO_IPV4, "kube-proxy"),
        ("nft_real_v1.37.2_web3.nft", NFPROTO_IPV4, "kube-proxy"),
        ("constructed_nft_ipv6_min.nft", NFPROTO_IPV6, "kube-proxy"),
    ]:
        run("nft", "flush", "ruleset")
        run("nft", "-f", fixture(name))
        rules, per_set, stream = table_stream(family, table)
        base = name.rsplit(".", 1)[0]
        write("nftables_table", base, b"".join(stream))
        # Small ones: each verdict or data map with the rules that refer to it.
        for set_name, msgs in per_set:
            if set_name.startswith("__map") or set_name in ("service-ips", "service-nodeports"):
                users = [r for r in rules if cstr(set_name) in r]
                write("nftables_table", f"{base}-{set_name}", b"".join(users[:4] + msgs))
    run("nft", "flush", "ruleset")


def iptables_nft_seeds():
    for name in ["iptables-save_nat_TestOverallIPTablesRules.txt", "constructed_ipt_3ep_local_iptables-save.txt"]:
        run("nft", "flush", "ruleset")
        with open(fixture(name), "rb") as f:
            run("iptables-nft-restore", stdin=f)
        rules = nft_dump(NFPROTO_IPV4, NFT_MSG_GETRULE, nla(1, cstr("nat")))
        base = name.rsplit(".", 1)[0]
        write("iptables_nft_rules", base, b"".join(rules))
        # The rules of one service port, from its entry rule to its DNATs.
        chains = [b"KUBE-SERVICES", b"KUBE-SVC-", b"KUBE-SEP-"]
        small = [next(r for r in rules if c in r) for c in chains if any(c in r for r in rules)]
        write("iptables_nft_rules", f"{base}-one-port", b"".join(small))
    run("nft", "flush", "ruleset")


# --- the legacy blob --------------------------------------------------------------------------

IPT_SO_GET_INFO, IPT_SO_GET_ENTRIES = 64, 65


def legacy_blob(v6):
    libc = ctypes.CDLL(None, use_errno=True)
    domain, level = (socket.AF_INET6, socket.IPPROTO_IPV6) if v6 else (socket.AF_INET, socket.SOL_IP)
    s = socket.socket(domain, socket.SOCK_RAW, socket.IPPROTO_RAW)

    def getsockopt(opt, buf):
        n = ctypes.c_uint32(len(buf))
        if libc.getsockopt(s.fileno(), level, opt, buf, ctypes.byref(n)) < 0:
            raise OSError(ctypes.get_errno(), "getsockopt")

    info = ctypes.create_string_buffer(b"nat", 84)
    getsockopt(IPT_SO_GET_INFO, info)
    valid, *hooks = struct.unpack_from("=I5I", info.raw, 32)
    (size,) = struct.unpack_from("=I", info.raw, 80)
    entries = ctypes.create_string_buffer(40 + size)
    entries.raw = b"nat".ljust(32, b"\0") + struct.pack("=I", size)
    getsockopt(IPT_SO_GET_ENTRIES, entries)
    s.close()
    # The target's header: flags (bit 0 IPv6, bits 1..5 valid hooks) and five u16 offsets.
    header = bytes([(1 if v6 else 0) | ((valid & 0x1F) << 1)]) + struct.pack("=5H", *[h & 0xFFFF for h in hooks])
    return header + entries.raw[40:]


def legacy_seeds():
    for name in ["constructed_ipt_3ep_local_iptables-save.txt", "iptables-save_nat_TestOverallIPTablesRules.txt"]:
        with open(fixture(name), "rb") as f:
            run("iptables-legacy-restore", stdin=f)
        write("iptables_legacy_blob", name.rsplit(".", 1)[0], legacy_blob(False))
    restore = b"""*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-X - [0:0]
:KUBE-SEP-A - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d fd00:10:96::a/128 -p udp -m comment --comment "kube-system/dns:dns cluster IP" -m udp --dport 53 -j KUBE-SVC-X
-A KUBE-SVC-X -m comment --comment "kube-system/dns:dns -> [fd00:10:180::1]:53" -j KUBE-SEP-A
-A KUBE-SEP-A -p udp -m comment --comment "kube-system/dns:dns" -m udp -j DNAT --to-destination [fd00:10:180::1]:53
COMMIT
"""
    subprocess.run(["ip6tables-legacy-restore"], input=restore, check=True)
    write("iptables_legacy_blob", "constructed_ipv6", legacy_blob(True))


# --- notifications ----------------------------------------------------------------------------


def notification_seeds():
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    s.bind((0, 1 << (7 - 1)))  # NFNLGRP_NFTABLES
    run("nft", "add", "table", "ip", "seeds")
    run("nft", "add", "chain", "ip", "seeds", "c")
    s.settimeout(1)
    got = []
    try:
        while len(got) < 4:
            got.append(s.recv(1 << 16))
    except socket.timeout:
        pass
    s.close()
    for i, datagram in enumerate(got):
        write("nf_notifications", f"kernel-{i}", datagram)
    error = struct.pack("=IHHII", 36, NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -2) + b"\0" * 16
    write("nf_notifications", "error", error)
    run("nft", "flush", "ruleset")


# --- encoded like the unit-test builders ------------------------------------------------------


def xt_seeds():
    write("xt_payload", "comment", bytes([0]) + b"ns1/svc1:p80 cluster IP".ljust(256, b"\0"))
    tcp = struct.pack("=HHHHBBBB", 0, 0xFFFF, 80, 80, 0, 0, 0, 0)
    write("xt_payload", "tcp", bytes([1]) + tcp)
    write("xt_payload", "udp", bytes([2]) + struct.pack("=HHHHBB", 0, 0xFFFF, 53, 53, 0, 0))
    sctp = bytearray(72)
    struct.pack_into("=HH", sctp, 0, 3868, 3868)
    struct.pack_into("=I", sctp, 60, 2)
    write("xt_payload", "sctp", bytes([3]) + bytes(sctp))

    def range2(ip, port):
        b = bytearray(48)
        struct.pack_into("=I", b, 0, 3)
        b[4:4 + len(ip)] = ip
        b[20:20 + len(ip)] = ip
        struct.pack_into(">HH", b, 36, port, port)
        return bytes(b)

    write("xt_payload", "dnat-rev2", bytes([0x24]) + range2(bytes([10, 180, 0, 1]), 80))
    v6 = socket.inet_pton(socket.AF_INET6, "fd00:10:180::1")
    write("xt_payload", "dnat-rev2-v6", bytes([0x2C]) + range2(v6, 8080))
    write("xt_payload", "dnat-rev1", bytes([0x14]) + range2(bytes([10, 180, 0, 1]), 80)[:40])
    rev0 = struct.pack("=II", 1, 3) + bytes([10, 180, 0, 1, 10, 180, 0, 1]) + struct.pack(">HH", 80, 80)
    write("xt_payload", "dnat-rev0", bytes([0x04]) + rev0)


def ipvs_seeds():
    NESTED = 0x8000
    af4, af6 = socket.AF_INET, socket.AF_INET6

    def service(af, addr, port, proto):
        nested = nla(1, struct.pack("=H", af)) + nla(2, struct.pack("=H", proto))
        nested += nla(3, addr.ljust(16, b"\0")) + nla(4, struct.pack(">H", port)) + nla(6, b"rr\0")
        return nla(1 | NESTED, nested)

    def dest(addr, port, weight, active, af=None):
        nested = nla(1, addr.ljust(16, b"\0")) + nla(2, struct.pack(">H", port))
        nested += nla(4, struct.pack("=I", weight)) + nla(7, struct.pack("=I", active)) + nla(8, struct.pack("=I", 1))
        if af is not None:
            nested += nla(11, struct.pack("=H", af))
        return nla(2 | NESTED, nested)

    write("ipvs_attributes", "service", service(af4, bytes([10, 96, 0, 10]), 80, 6))
    v6 = socket.inet_pton(socket.AF_INET6, "fd00:10:96::a")
    write("ipvs_attributes", "service-v6", service(af6, v6, 53, 17))
    write("ipvs_attributes", "dest", dest(bytes([10, 180, 0, 1]), 8080, 1, 0))
    write("ipvs_attributes", "dest-draining-v6", dest(socket.inet_pton(socket.AF_INET6, "fd00::1"), 53, 0, 3, af6))
    fwmark = nla(1 | NESTED, nla(1, struct.pack("=H", af4)) + nla(5, struct.pack("=I", 7)))
    write("ipvs_attributes", "service-fwmark", fwmark + dest(bytes([10, 180, 0, 2]), 80, 1, 0))


def conntrack_seeds():
    """ctnetlink new-connection events, encoded as conntrack.rs's test builder `ct_new` encodes
    them, plus the attributes a kernel event also carries (which the parser skips)."""
    NESTED = 0x8000
    NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_DELETE = 1, 0, 2
    NLM_F_CREATE, NLM_F_EXCL = 0x400, 0x200

    def sockaddr(text):
        host, port = text.rsplit(":", 1)
        if host.startswith("["):
            return socket.inet_pton(socket.AF_INET6, host[1:-1]), int(port), True
        return socket.inet_pton(socket.AF_INET, host), int(port), False

    def tuple_attr(kind, src, dst, proto):
        (sip, sport, v6), (dip, dport, _) = sockaddr(src), sockaddr(dst)
        s, d = (3, 4) if v6 else (1, 2)
        ip = nla(1 | NESTED, nla(s, sip) + nla(d, dip))
        ports = nla(1, bytes([proto])) + nla(2, struct.pack(">H", sport)) + nla(3, struct.pack(">H", dport))
        return nla(kind | NESTED, ip + nla(2 | NESTED, ports))

    def ct(client, dst, target, proto=6, start_ns=None, extra=b"", kind=IPCTNL_MSG_CT_NEW):
        family = socket.AF_INET6 if client.startswith("[") else socket.AF_INET
        payload = struct.pack("=BBH", family, 0, 0)
        payload += tuple_attr(1, client, dst, proto) + tuple_attr(2, target, client, proto)
        if start_ns is not None:
            payload += nla(20 | NESTED, nla(1, struct.pack(">Q", start_ns)))
        payload += extra
        hdr = struct.pack("=IHHII", 16 + len(payload), (NFNL_SUBSYS_CTNETLINK << 8) | kind, NLM_F_CREATE | NLM_F_EXCL, 0, 0)
        return hdr + payload

    # CTA_STATUS, CTA_TIMEOUT, CTA_PROTOINFO (TCP state), CTA_ID, CTA_USE, CTA_MARK.
    kernel_extra = nla(3, struct.pack(">I", 0x188)) + nla(7, struct.pack(">I", 120))
    kernel_extra += nla(4 | NESTED, nla(1 | NESTED, nla(1, bytes([3]))))
    kernel_extra += nla(12, struct.pack(">I", 0xDEADBEEF)) + nla(11, struct.pack(">I", 1)) + nla(8, struct.pack(">I", 0))
    write("conntrack_events", "translated", ct("10.0.0.9:40000", "172.30.0.41:80", "10.244.1.10:8080"))
    write("conntrack_events", "untranslated", ct("10.0.0.1:40001", "10.244.1.10:8080", "10.244.1.10:8080"))
    write(
        "conntrack_events",
        "v6-started",
        ct("[fd00::9]:40000", "[fd00:172:30::41]:80", "[fd00:10:244::10]:8080", start_ns=1_700_000_000_000_000_000),
    )
    write(
        "conntrack_events",
        "kernel-like",
        ct("10.0.0.9:40002", "10.0.0.2:30080", "10.244.2.7:8080", start_ns=1_700_000_000_000_000_001, extra=kernel_extra),
    )
    batch = ct("10.0.0.9:40003", "172.30.0.10:53", "10.244.0.5:53", proto=17)
    batch += ct("10.0.0.9:40004", "172.30.0.12:9", "10.244.0.6:9", proto=132)
    batch += ct("10.0.0.9:40005", "172.30.0.41:80", "10.244.1.10:8080", kind=IPCTNL_MSG_CT_DELETE)
    batch += ct("10.0.0.9:40006", "172.30.0.41:80", "10.244.1.11:8080")[:40]
    write("conntrack_events", "batch", batch)


def json_seeds():
    svc = {
        "metadata": {"namespace": "ns1", "name": "svc1"},
        "spec": {
            "type": "NodePort",
            "clusterIP": "172.30.0.41",
            "clusterIPs": ["172.30.0.41"],
            "externalIPs": ["192.168.99.11"],
            "externalTrafficPolicy": "Local",
            "ports": [{"name": "p80", "protocol": "TCP", "port": 80, "nodePort": 3001}],
        },
        "status": {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}},
    }

    def endpoint(ip, node, ready=True, terminating=False, zones=None):
        e = {
            "addresses": [ip],
            "conditions": {"ready": ready, "serving": True, "terminating": terminating},
            "nodeName": node,
        }
        if zones:
            e["hints"] = {"forZones": [{"name": z} for z in zones], "forNodes": [{"name": node}]}
        return e

    slice_ = {
        "metadata": {
            "namespace": "ns1",
            "name": "svc1-abc",
            "resourceVersion": "1234",
            "labels": {"kubernetes.io/service-name": "svc1"},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-12-04T10:00:00.123Z"},
            "managedFields": [{"manager": "kube-controller-manager", "time": "2026-12-04T10:00:01Z"}],
        },
        "addressType": "IPv4",
        "endpoints": [
            endpoint("10.180.0.1", "node-1", zones=["zone-a"]),
            endpoint("10.180.0.2", "node-2", terminating=True, ready=False),
            endpoint("10.180.0.3", "node-1", zones=["zone-b"]),
        ],
        "ports": [{"name": "p80", "protocol": "TCP", "port": 8080}],
    }
    view = {"service": svc, "slices": [slice_], "node": "node-1", "zone": "zone-a"}
    write("endpoint_slices_json", "nodeport-local", json.dumps(view).encode())
    v6 = {
        "service": {
            "metadata": {"namespace": "kube-system", "name": "dns"},
            "spec": {
                "clusterIPs": ["fd00:10:96::a"],
                "internalTrafficPolicy": "Local",
                "ports": [{"name": "dns", "protocol": "UDP", "port": 53}, {"protocol": "SCTP", "port": 9}],
            },
        },
        "slices": [
            {
                "metadata": {"namespace": "kube-system", "name": "dns-1", "labels": {"kubernetes.io/service-name": "dns"}},
                "addressType": "IPv6",
                "endpoints": [endpoint("fd00:10:180::1", "node-1"), {"addresses": []}, {"addresses": ["bad"]}],
                "ports": [{"name": "dns", "protocol": "UDP", "port": 53}, {"protocol": "QUIC", "port": 0}],
            },
            {"metadata": {"name": "orphan"}, "addressType": "FQDN", "endpoints": []},
        ],
        "node": "node-1",
        "localFallsBackToCluster": True,
    }
    write("endpoint_slices_json", "ipv6-local", json.dumps(v6).encode())


def main():
    if sys.argv[1:] == ["conntrack"]:
        conntrack_seeds()  # encoded only: no root, no capture
        return
    if os.geteuid() != 0:
        sys.exit("seeds.py needs root: it captures from a throw-away network namespace")
    xt_seeds()
    ipvs_seeds()
    conntrack_seeds()
    json_seeds()
    for name in ["iptables-save_nat_TestOverallIPTablesRules.txt", "constructed_ipt_3ep_local_iptables-save.txt"]:
        with open(fixture(name), "rb") as f:
            write("iptables_save_text", name.rsplit(".", 1)[0], f.read())
    # A network namespace of this process alone: the kernel state goes away with it.
    if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:  # CLONE_NEWNET
        sys.exit(f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())}")
    nftables_seeds()
    iptables_nft_seeds()
    legacy_seeds()
    notification_seeds()


if __name__ == "__main__":
    main()
