//! Plain-text tables for the CLI: columns padded to their widest cell.

/// Renders `rows` (the first is the header) with two spaces between columns.
pub fn render<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    rows.iter()
        .map(|r| {
            let cells: Vec<String> = r.iter().zip(widths).map(|(c, w)| format!("{c:w$}")).collect();
            cells.join("  ").trim_end().to_string() + "\n"
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn pads_columns_and_trims_line_ends() {
        let rows = [["A".to_string(), "BB".into()], ["ccc".into(), "d".into()]];
        assert_eq!(super::render(&rows), "A    BB\nccc  d\n");
    }
}
