//! Real-kernel IPVS test: `scripts/ipvs-vm.sh` boots Debian's cloud kernel under qemu with
//! ip_vs loaded and prints, at each step, `ipvsadm -Ln` next to `kube-converge inspect`. Here
//! both are parsed and must agree: routed endpoints are exactly the destinations with weight
//! > 0. Also: on a kernel without IPVS, the reader fails clearly.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Instant;

use common::require;

/// `frontend -> (routed, draining)` from `ipvsadm -Ln`.
fn parse_ipvsadm(text: &str) -> BTreeMap<String, (Vec<String>, Vec<String>)> {
    let mut out: BTreeMap<String, (Vec<String>, Vec<String>)> = BTreeMap::new();
    let mut current = None;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["TCP" | "UDP" | "SCTP", addr, ..] => {
                current = Some(addr.to_string());
                out.entry(addr.to_string()).or_default();
            }
            ["->", addr, _fwd, weight, ..] if *addr != "RemoteAddress:Port" => {
                let entry = out
                    .get_mut(current.as_ref().expect("destination before service"))
                    .unwrap();
                if *weight == "0" {
                    entry.1.push(addr.to_string());
                } else {
                    entry.0.push(addr.to_string());
                }
            }
            _ => {}
        }
    }
    out
}

#[test]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
fn inspect_agrees_with_ipvsadm_in_a_kernel_with_ipvs() {
    if !require(&[
        "qemu-system-x86_64",
        "busybox",
        "cpio",
        "ipvsadm",
        "apt-get",
        "dpkg-deb",
    ]) {
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/ipvs-vm.sh");
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_kube-converge"))
        .output()
        .unwrap();
    let wall = started.elapsed();
    let log = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert!(
        !log.contains("@@ERROR"),
        "VM setup failed:\n{log}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tested = log
        .lines()
        .find_map(|l| l.strip_prefix("@@TESTED "))
        .unwrap_or_else(|| {
            panic!(
                "the VM did not finish its steps:\n{log}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let booted = log.lines().find_map(|l| l.split("@@BOOTED ").nth(1)).unwrap_or("?");
    eprintln!("ipvs-vm: kernel booted to init at {booted}s (guest uptime); steps ran in guest uptime {tested}; host wall {wall:.1?}");

    let mut steps = BTreeMap::new();
    for block in log.split("@@STEP ").skip(1) {
        let name = block.lines().next().unwrap().trim().to_string();
        let ipvsadm = block
            .split("@@IPVSADM")
            .nth(1)
            .unwrap()
            .split("@@INSPECT")
            .next()
            .unwrap();
        let inspect = block.split("@@INSPECT").nth(1).unwrap().split("@@END").next().unwrap();
        let report: serde_json::Value = serde_json::from_str(inspect.trim())
            .unwrap_or_else(|e| panic!("step {name}: inspect output {inspect:?}: {e}"));
        steps.insert(name, (parse_ipvsadm(ipvsadm), report));
    }
    assert_eq!(steps.len(), 3, "{log}");
    for (name, (kernel, report)) in &steps {
        assert_eq!(report["mode"], "ipvs");
        let services = report["services"].as_array().unwrap();
        assert_eq!(
            services.len(),
            kernel.len(),
            "step {name}: one entry per virtual server"
        );
        for (frontend, (routed, _)) in kernel {
            let s = services
                .iter()
                .find(|s| s["frontends"][0] == frontend.as_str())
                .unwrap_or_else(|| panic!("step {name}: {frontend} missing from inspect: {report}"));
            let mut got: Vec<String> = s["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e.as_str().unwrap().into())
                .collect();
            let mut want = routed.clone();
            got.sort();
            want.sort();
            assert_eq!(got, want, "step {name}: {frontend}");
        }
    }
    // No virtual server at all is "not found", not an empty dataplane.
    let cleared = log
        .split("@@CLEARED")
        .nth(1)
        .and_then(|t| t.split("@@CEND").next())
        .unwrap_or_else(|| panic!("no @@CLEARED section:\n{log}"));
    assert_eq!(
        cleared.matches("no IPVS virtual servers").count(),
        2,
        "a full and a targeted read of an empty table: {cleared}"
    );
    // Targeted reads: exactly the asked frontends' virtual servers.
    let section = |start: &str, end: &str| -> serde_json::Value {
        let text = log
            .split(start)
            .nth(1)
            .and_then(|t| t.split(end).next())
            .unwrap_or_else(|| panic!("no {start} section:\n{log}"));
        serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{start}: {text:?}: {e}"))
    };
    let served = |report: &serde_json::Value| -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = report["services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let mut eps: Vec<String> = s["endpoints"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e.as_str().unwrap().into())
                    .collect();
                eps.sort();
                (s["frontends"][0].as_str().unwrap().into(), eps)
            })
            .collect();
        out.sort();
        out
    };
    let by_key = served(&section("@@TARGETED", "@@TEND"));
    assert_eq!(
        by_key,
        [
            (
                "10.96.0.10:80".to_string(),
                vec!["10.180.0.1:8080".to_string(), "10.180.0.2:8080".to_string()]
            ),
            (
                "[fd00:96::10]:53".to_string(),
                vec!["[fd00:10:180::1]:5353".to_string()]
            ),
        ],
        "targeted read by address (TCP and UDP), nothing for an unknown frontend"
    );
    assert_eq!(
        served(&section("@@NODEPORT", "@@NEND")),
        by_key[..1],
        "a NodePort frontend matches the virtual servers on that port"
    );
    let vip = "10.96.0.10:80";
    assert_eq!(steps["two-servers"].0[vip].0.len(), 2);
    assert_eq!(
        steps["weight-zero"].0[vip].1,
        ["10.180.0.2:8080"],
        "ipvsadm shows the draining server"
    );
    assert_eq!(
        steps["weight-zero"].1["draining"]["endpoints"], 1,
        "inspect reports it draining, not routed"
    );
    assert!(!steps["deleted"].0[vip].0.contains(&"10.180.0.2:8080".to_string()));
    assert_eq!(steps["deleted"].1["draining"]["endpoints"], 0);
    assert_eq!(
        steps["two-servers"].0["[fd00:96::10]:53"].0,
        ["[fd00:10:180::1]:5353"],
        "IPv6 UDP decoded"
    );
}

#[test]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
fn a_kernel_without_ipvs_gives_a_clear_error() {
    if !require(&["ip"]) {
        return;
    }
    let ns = common::Netns::new("noipvs");
    let has_ipvs = std::path::Path::new("/proc/net/ip_vs").exists();
    let out = Command::new(env!("CARGO_BIN_EXE_kube-converge"))
        .args(["inspect", "--mode", "ipvs", "--netns", &ns.path()])
        .output()
        .unwrap();
    if has_ipvs {
        // The host has IPVS: an empty namespace has no virtual servers, which is not found.
        assert!(String::from_utf8_lossy(&out.stderr).contains("no IPVS virtual servers"));
        return;
    }
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Protocol not available") && err.contains("ip_vs"),
        "unclear error: {err}"
    );
}
