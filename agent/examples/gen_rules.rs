//! Writes a kube-proxy ruleset for N services of E endpoints: `gen_rules iptables|nft N E`.
use kube_converge::emulate::{render_nat, render_nft, EmulatedServicePort};
use kube_converge::model::{Protocol, ServicePortName};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let n: u32 = a[2].parse().unwrap();
    let e: u32 = a[3].parse().unwrap();
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
    match a[1].as_str() {
        "iptables" => print!("{}", render_nat(&ports, n * e <= 1000, &[])),
        _ => print!("{}", render_nft("ip", &ports, &[], &[])),
    }
}
