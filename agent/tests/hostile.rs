//! Runs every `flag` row of the hostile-input table in tests/README.md and checks its answer:
//! the exit code and the quoted text. The table documents what an SRE gets; this keeps it true.

mod common;

const TABLE: &str = include_str!("../../tests/README.md");

struct Row {
    args: String,
    code: i32,
    text: String,
}

fn rows() -> Vec<Row> {
    TABLE
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
            Some(Row { args, code, text })
        })
        .collect()
}

#[test]
fn every_flag_row_of_the_hostile_input_table_answers_as_written() {
    // `sim` rows need to create (and clean up) a network namespace before refusing the port.
    if !common::require(&["ip"]) {
        return;
    }
    let rows = rows();
    assert!(rows.len() >= 10, "the table lost its rows: {}", rows.len());
    for r in rows {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("exec \"$KC\" {}", r.args))
            .env("KC", env!("CARGO_BIN_EXE_kube-converge"))
            .env_remove("RUST_BACKTRACE")
            .env_remove("KUBECONFIG")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(r.code), "{}: {err}", r.args);
        assert!(err.contains(&r.text), "{}: {err:?} lacks {:?}", r.args, r.text);
        assert!(
            !err.contains("panicked") && !err.contains("Status {"),
            "{}: {err}",
            r.args
        );
    }
}
