//! The `kube-converge-sim` command line: flags it refuses, its cleanup on SIGTERM, its report
//! at the timeout, and the simulator's rows of the hostile-input table in tests/README.md.

#[path = "../../agent/tests/common/prereq.rs"]
mod prereq;

use std::time::Duration;

#[test]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
fn every_sim_flag_row_of_the_hostile_input_table_answers_as_written() {
    // The rows need to create (and clean up) a network namespace before refusing the port.
    if !prereq::require(&["ip"]) {
        return;
    }
    let rows: Vec<_> = prereq::hostile_rows()
        .into_iter()
        .filter(|r| r.args.starts_with("kube-converge-sim "))
        .collect();
    assert!(rows.len() >= 3, "the table lost its rows: {}", rows.len());
    for r in &rows {
        let args = r.args.trim_start_matches("kube-converge-sim ");
        prereq::check_hostile_row(env!("CARGO_BIN_EXE_kube-converge-sim"), args, r);
    }
}

fn sim_cmd(args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_kube-converge-sim"));
    c.args(args).env_remove("RUST_BACKTRACE");
    c
}

fn our_namespaces(pid: u32) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("kc-sim-{pid}-")))
        .map(String::from)
        .collect()
}

/// Flags that cannot work are refused with a sentence, before anything is created.
#[test]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
fn sim_refuses_flags_that_cannot_work() {
    if !prereq::require(&["ip"]) {
        return;
    }
    let out = sim_cmd(&["--nodes", "3", "--slow", "node-9=1s"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("node-9") && err.contains("node-3"),
        "{err}"
    );
    let out = sim_cmd(&["--nodes", "3", "--metrics-port", "65535"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("past 65535"), "{err}");
    // A busy port is an error, not a silent random port.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let out = sim_cmd(&["--nodes", "1", "--metrics-port", &port]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not free") && err.contains("node-1"),
        "{err}"
    );
}

/// SIGTERM (a `kill`, a container stop) removes the namespaces as Ctrl-C does.
#[test]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
fn sim_removes_its_namespaces_on_sigterm() {
    use std::io::{BufRead, BufReader};
    if !prereq::require(&["ip", "iptables-nft-restore"]) {
        return;
    }
    let mut child = sim_cmd(&["--nodes", "2", "--keep", "--metrics-port", "0"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let line = lines.next().expect("sim ended before keeping the cluster").unwrap();
        if line.contains("keeping the cluster running") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "sim never reached --keep");
    }
    assert!(!our_namespaces(pid).is_empty(), "the running sim has its namespaces");
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
    let status = child.wait().unwrap();
    // It printed a kubeconfig for the fake API server and the commands to try, and removed it.
    let kc = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("export KUBECONFIG="))
        .unwrap_or_else(|| panic!("no kubeconfig printed: {stdout}"));
    assert!(
        stdout.contains("isolate web-2 -n demo") && stdout.contains("/v1/hold?"),
        "{stdout}"
    );
    assert!(!std::path::Path::new(kc).exists(), "{kc} left behind");
    assert!(
        status.code().is_some(),
        "ended by its handler, not killed by the signal: {status:?}"
    );
    assert!(
        our_namespaces(pid).is_empty(),
        "namespaces left: {:?}",
        our_namespaces(pid)
    );
}

/// With --timeout shorter than a slow node, the report still lists that node's changes,
/// unconverged, and the exit code says so.
#[test]
#[ignore = "needs root: network namespaces and kernel rules (scripts/test.sh runs it as root)"]
fn sim_reports_unconverged_nodes_at_the_timeout() {
    if !prereq::require(&["ip", "iptables-nft-restore"]) {
        return;
    }
    let out = sim_cmd(&[
        "--nodes",
        "2",
        "--slow",
        "node-2=10s",
        "--timeout",
        "3s",
        "--metrics-port",
        "0",
    ])
    .output()
    .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{table}{err}");
    assert!(err.contains("not every node converged"), "{err}");
    let slow: Vec<&str> = table.lines().filter(|l| l.starts_with("node-2")).collect();
    assert_eq!(slow.len(), 2, "node-2's two removals listed:\n{table}");
    assert!(
        slow.iter().all(|l| l.contains(" - ")),
        "unconverged rows show '-':\n{table}"
    );
    assert_eq!(table.lines().filter(|l| l.starts_with("node-1")).count(), 2, "{table}");
}
