//! Runs every `flag` row of the hostile-input table in tests/README.md that is the agent's and
//! checks its answer: the exit code and the quoted text. The table documents what an SRE gets;
//! this keeps it true. The simulator's rows (`kube-converge-sim …`) run in `sim/tests/cli.rs`.

mod common;

#[test]
fn every_agent_flag_row_of_the_hostile_input_table_answers_as_written() {
    let rows: Vec<_> = common::hostile_rows()
        .into_iter()
        .filter(|r| !r.args.starts_with("kube-converge-sim "))
        .collect();
    assert!(rows.len() >= 12, "the table lost its rows: {}", rows.len());
    for r in &rows {
        common::check_hostile_row(env!("CARGO_BIN_EXE_kube-converge"), &r.args, r);
    }
}
