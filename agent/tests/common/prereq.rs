//! Prerequisite checks and the hostile-input table, shared by the agent's tests and the
//! simulator's (`sim/tests` includes this file by path).
#![allow(dead_code)] // each test binary uses a different subset

/// Checks a test's prerequisites: root and `tools` on PATH. Every test that calls it is marked
/// `#[ignore = "needs …"]`, so a plain `cargo test` without them reports it ignored, never
/// passed; when it runs anyway (`--include-ignored`, as scripts/test.sh does as root and
/// under CI), a missing prerequisite fails it with what to install. Returns true so callers
/// read as a guard.
pub fn require(tools: &[&str]) -> bool {
    let mut missing = Vec::new();
    if unsafe { libc_geteuid() } != 0 {
        missing.push("root (network namespaces need CAP_SYS_ADMIN)".to_string());
    }
    for t in tools {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file()))
            .unwrap_or(false);
        if !found {
            missing.push(format!("{t} (.ci/run installs it)"));
        }
    }
    assert!(
        missing.is_empty(),
        "prerequisites missing: {} (run the tests as root with scripts/test.sh, after .ci/run's installs)",
        missing.join(", ")
    );
    true
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// One `flag` row of the hostile-input table in tests/README.md.
pub struct HostileRow {
    /// The command line: the agent's arguments, or `kube-converge-sim …`.
    pub args: String,
    pub code: i32,
    pub text: String,
}

pub const HOSTILE_TABLE: &str = include_str!("../../../tests/README.md");

/// The `flag` rows of the hostile-input table.
pub fn hostile_rows() -> Vec<HostileRow> {
    HOSTILE_TABLE
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            // | kind | input | answer |  ->  ["", kind, input, answer, ""]
            if cells.len() < 5 || cells[1] != "flag" {
                return None;
            }
            let args = cells[2].trim_matches('`').to_string();
            let answer = cells[3];
            let code = answer.strip_prefix("exit ")?.split(':').next()?.trim().parse().ok()?;
            let text = answer.split_once('"')?.1.rsplit_once('"')?.0.to_string();
            Some(HostileRow { args, code, text })
        })
        .collect()
}

/// Runs `program` with a row's arguments (through `sh`, for the quoting) and checks its answer:
/// the exit code, the quoted text, and neither a panic nor a `Status { … }` dump.
pub fn check_hostile_row(program: &str, args: &str, row: &HostileRow) {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("exec \"$KC\" {args}"))
        .env("KC", program)
        .env_remove("RUST_BACKTRACE")
        .env_remove("KUBECONFIG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(row.code), "{}: {err}", row.args);
    assert!(err.contains(&row.text), "{}: {err:?} lacks {:?}", row.args, row.text);
    assert!(
        !err.contains("panicked") && !err.contains("Status {"),
        "{}: {err}",
        row.args
    );
}
