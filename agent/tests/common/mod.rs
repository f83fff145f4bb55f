//! Shared harness for real-kernel tests: throw-away network namespaces and prerequisite checks.
#![allow(dead_code)] // each test binary uses a different subset of the harness

mod prereq;
#[allow(unused_imports)] // not every test binary uses the checks
pub use prereq::*;

use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A network namespace deleted on drop.
pub struct Netns {
    pub name: String,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = format!(
            "kc-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip netns add");
        assert!(st.success(), "ip netns add {name} failed");
        Self { name }
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs a command inside the namespace with `input` on stdin; panics on failure.
    pub fn run_stdin(&self, program: &str, args: &[&str], input: &str) -> Output {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn ip netns exec");
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        self.run_stdin(program, args, "")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Runs `kube-converge inspect -o json` against the namespace and parses its output.
pub fn inspect_json(ns: &Netns, args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_kube-converge"))
        .args(["inspect", "-o", "json", "--netns", &ns.path()])
        .args(args)
        .output()
        .expect("run kube-converge inspect");
    assert!(
        out.status.success(),
        "inspect failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("inspect -o json prints JSON")
}

/// `(name, sorted endpoints)` per service port of an inspect report, sorted.
pub fn routed(report: &serde_json::Value) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = report["services"]
        .as_array()
        .expect("services array")
        .iter()
        .map(|s| {
            let name = s["name"].as_str().unwrap_or("<null>").to_string();
            let eps = s["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e.as_str().unwrap().to_string())
                .collect();
            (name, eps)
        })
        .collect();
    out.sort();
    out
}

pub fn pair(name: &str, eps: &[&str]) -> (String, Vec<String>) {
    (name.to_string(), eps.iter().map(|e| e.to_string()).collect())
}

/// Options for a small simulated cluster in tests. Its callers are `#[ignore = "needs root…"]`;
/// run anyway without root or tools, it fails with what is missing. `Option` so callers read
/// as a guard.
pub fn sim_options(
    mode: kc_sim::node::ProxyMode,
    nodes: usize,
    slow: &[(&str, u64)],
) -> Option<kc_sim::scenario::SimOptions> {
    use std::time::Duration;
    if let Err(e) = kc_sim::scenario::preflight(mode) {
        panic!("{e}");
    }
    Some(kc_sim::scenario::SimOptions {
        nodes,
        proxy_mode: mode,
        delay: kc_sim::node::Delay {
            base: Duration::from_millis(50),
            jitter: Duration::from_millis(100),
        },
        slow: slow
            .iter()
            .map(|(n, ms)| (n.to_string(), Duration::from_millis(*ms)))
            .collect(),
        grace: Duration::from_secs(2),
        timeout: Duration::from_secs(30),
        metrics_port: 0,
        keep: false,
        traffic_rate: 50,
        faulty_agents: false,
    })
}
