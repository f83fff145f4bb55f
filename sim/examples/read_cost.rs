//! Benchmark: the agent's dataplane read against the userland tool on the same ruleset.
//!
//! sudo cargo run --release --example read_cost -- MODE SERVICES ENDPOINTS RUNS
//! MODE: iptables-nft | iptables-legacy | nftables | ipvs. Loads a kube-proxy-format ruleset into
//! a throw-away network namespace, then times (median of RUNS, side by side) the userland tool
//! (`iptables-*-save -t nat`, `nft -j list table ip kube-proxy`, `ipvsadm -Ln`), the agent's full
//! read, and its targeted check of one pending service port (what it does while a change is
//! pending).
//!
//! `ipvs` loads the virtual servers with `ipvsadm -R` into the current network namespace (it
//! runs inside the qemu VM of `scripts/ipvs-vm.sh --bench`, where the kernel has IPVS and no
//! other rules) and removes them afterwards.

use std::process::Stdio;
use std::time::{Duration, Instant};

use kc_sim::emulate::{load_ruleset, render_nat, render_nft, EmulatedServicePort};
use kc_sim::node::NetnsGuard;
use kube_converge::dataplane::iptables::{Backend, IptablesReader};
use kube_converge::dataplane::ipvs::IpvsReader;
use kube_converge::dataplane::nftables::NftablesReader;
use kube_converge::dataplane::{DataplaneReader, ReadTargets};
use kube_converge::model::{Protocol, ServicePortName};
use kube_converge::netns::NetNs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time_n(runs: usize, mut f: impl FnMut()) -> Duration {
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect(),
    )
}

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let mode = a.get(1).map(String::as_str).unwrap_or("iptables-legacy");
    let n: u32 = a.get(2).and_then(|v| v.parse().ok()).unwrap_or(1000);
    let e: u32 = a.get(3).and_then(|v| v.parse().ok()).unwrap_or(5);
    let runs: usize = a.get(4).and_then(|v| v.parse().ok()).unwrap_or(5);
    let ports: Vec<EmulatedServicePort> = (0..n)
        .map(|i| EmulatedServicePort {
            name: ServicePortName::new(&format!("ns{}", i % 50), &format!("svc{i}"), "http"),
            protocol: Protocol::Tcp,
            cluster_ip: IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + i)),
            port: 80,
            node_port: None,
            endpoints: (0..e)
                .map(|j| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0af0_0000 + i * 8 + j)), 8080))
                .collect(),
        })
        .collect();
    // IPVS exists only in the VM, which is throw-away itself and has no `ip netns`.
    let guard = (mode != "ipvs")
        .then(|| NetnsGuard::create(&NetnsGuard::unique_name("bench")))
        .transpose()?;
    let netns = match &guard {
        Some(g) => NetNs::open(std::path::Path::new(&g.path()))?,
        None => NetNs::current(),
    };
    // Large clusters drop the per-endpoint comments (kube-proxy's 1000-endpoint threshold).
    let comments = n * e <= 1000;
    let (program, args, rules): (&str, Vec<&str>, String) = match mode {
        // A fresh namespace has nothing to keep: without --noflush iptables-nft-restore loads
        // about 5x faster (it skips fetching and flushing each declared chain).
        "iptables-nft" => ("iptables-nft-restore", vec![], render_nat(&ports, comments, &[])),
        "iptables-legacy" => ("iptables-legacy-restore", vec![], render_nat(&ports, comments, &[])),
        "nftables" => ("nft", vec!["-f", "-"], render_nft("ip", &ports, &[], &[])),
        "ipvs" => ("ipvsadm", vec!["-R"], render_ipvsadm(&ports)),
        other => anyhow::bail!("unknown mode {other}"),
    };
    let t = Instant::now();
    load_ruleset(&netns, program, &args, rules)?;
    let load = t.elapsed();
    let tool = |prog: &str, args: &[&str]| {
        let out = netns
            .command(prog)
            .args(args)
            .stdout(Stdio::piped())
            .output()
            .expect("run tool");
        assert!(out.status.success());
        out.stdout.len()
    };
    // The targeted check: one service port in the middle of the table is pending.
    let probe = &ports[ports.len() / 2];
    let targets = ReadTargets {
        frontends: [SocketAddr::new(probe.cluster_ip, probe.port).to_string()].into(),
        ports: [(probe.name.clone(), probe.protocol)].into(),
    };
    let (tool_name, tool_args, mut reader): (String, Vec<&str>, Box<dyn DataplaneReader>) = match mode {
        "nftables" => (
            "nft -j list table ip kube-proxy".into(),
            vec!["-j", "list", "table", "ip", "kube-proxy"],
            Box::new(NftablesReader::new(netns.clone())),
        ),
        "ipvs" => (
            "ipvsadm -Ln".into(),
            vec!["-Ln"],
            Box::new(IpvsReader::new(netns.clone())),
        ),
        m => {
            let b = if m == "iptables-nft" {
                Backend::Nft
            } else {
                Backend::Legacy
            };
            (
                b.save_program(false),
                vec!["-t", "nat"],
                Box::new(IptablesReader::new(b, netns.clone())),
            )
        }
    };
    let tool_prog = tool_name.split(' ').next().unwrap_or_default().to_string();
    let tool_time = time_n(runs, || {
        tool(&tool_prog, &tool_args);
    });
    let mut routed = 0;
    let read_time = time_n(runs, || {
        routed = reader
            .read()
            .expect("read")
            .services
            .iter()
            .map(|s| s.endpoints.len())
            .sum()
    });
    let targeted_time = reader.can_read_targeted().then(|| {
        let mut seen = 0;
        let t = time_n(runs.max(20), || {
            let snap = reader.read_targeted(&targets).expect("targeted").expect("read");
            assert!(snap.scope.is_some(), "a targeted read says what it covered");
            seen = snap.services.iter().map(|s| s.endpoints.len()).sum();
        });
        assert_eq!(
            seen, e as usize,
            "the targeted read must see the pending port's endpoints"
        );
        t
    });
    let tool_name = if mode == "nftables" || mode == "ipvs" {
        tool_name
    } else {
        format!("{tool_name} -t nat")
    };
    assert_eq!(routed, (n * e) as usize, "the reader must see every endpoint");
    let ratio = |t: Duration| tool_time.as_secs_f64() / t.as_secs_f64();
    let targeted = targeted_time.map_or("n/a (polled mode: full reads only)".to_string(), |t| {
        format!("{t:8.2?} ratio(tool/targeted)={:.0}", ratio(t))
    });
    println!(
        "{mode:16} services={n:6} endpoints={:7} load={:8.2?} tool[{tool_name}]={tool_time:8.2?} agent_full_read={read_time:8.2?} ratio(tool/full)={:.2} agent_targeted={targeted}",
        n * e,
        load,
        ratio(read_time),
    );
    if mode == "ipvs" {
        let status = netns.command("ipvsadm").arg("-C").status()?;
        anyhow::ensure!(status.success(), "ipvsadm -C failed");
    }
    Ok(())
}

/// The virtual servers kube-proxy's IPVS mode makes for `ports`, as `ipvsadm -R` input:
/// round robin, masquerading, weight 1.
fn render_ipvsadm(ports: &[EmulatedServicePort]) -> String {
    let mut out = String::new();
    for p in ports {
        let vs = SocketAddr::new(p.cluster_ip, p.port);
        out.push_str(&format!("-A -t {vs} -s rr\n"));
        for e in &p.endpoints {
            out.push_str(&format!("-a -t {vs} -r {e} -m -w 1\n"));
        }
    }
    out
}
