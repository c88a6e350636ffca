//! How the operator command prints: the API's JSON for scripts, or
//! column-aligned tables for people.

use anyhow::Result;
use serde::Serialize;

/// Prints `value` as JSON, or `table` for people.
pub fn show<T: Serialize>(json: bool, value: &T, table: impl FnOnce(&T) -> Vec<Vec<String>>) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print_table(&table(value));
    }
    Ok(())
}

/// Column-aligned rows; the first is the header.
fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|i| rows.iter().filter_map(|r| r.get(i)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, s)| if i + 1 == r.len() { s.clone() } else { format!("{s:<w$}", w = widths[i]) })
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

/// Label-value rows.
pub fn fields(pairs: &[(&str, String)]) -> Vec<Vec<String>> {
    pairs.iter().map(|(k, v)| vec![format!("{k}:"), v.clone()]).collect()
}
