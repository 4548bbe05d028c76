//! Formatting for people (tables on stderr) and machines (CSV/JSON on stdout).

use arrow::record_batch::RecordBatch;
use weir_common::Error;
use weir_lake::{HistoryEntry, TableStats};
use weir_orchestrator::{AssetStatus, RunSummary};

pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub use weir_common::memory::human_bytes;

/// Left-aligned text table.
/// The progress line of an asset: rows, bytes and rate so far.
pub fn progress_line(name: &str, rows: u64, bytes: u64, secs: f64) -> String {
    let rate = if secs >= 0.5 {
        format!(", {} rows/s", thousands((rows as f64 / secs) as u64))
    } else {
        String::new()
    };
    format!(
        "{name}: {} rows, {}{rate}",
        thousands(rows),
        human_bytes(bytes)
    )
}

/// The `weir test` report: one line per check, then failing rows of failed checks.
pub fn check_report(results: &[weir_engine::checks::CheckResult]) -> String {
    use weir_engine::checks::CheckStatus;
    if results.is_empty() {
        return "no checks declared for the selected assets\n".into();
    }
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.asset.clone(),
                r.name.clone(),
                match r.status {
                    CheckStatus::Pass => "pass".into(),
                    CheckStatus::Warn => "WARN".into(),
                    CheckStatus::Fail => "FAIL".into(),
                },
                thousands(r.failing),
                r.message.clone(),
            ]
        })
        .collect();
    let mut out = text_table(&["asset", "check", "status", "failing", "detail"], &rows);
    for r in results.iter().filter(|r| r.status != CheckStatus::Pass) {
        if r.sample.is_empty() {
            continue;
        }
        out.push_str(&format!(
            "\n{} / {}: failing rows (up to {}):\n",
            r.asset,
            r.name,
            r.sample.len()
        ));
        for row in &r.sample {
            out.push_str(&format!("  {row}\n"));
        }
    }
    let (pass, warn, fail) = results
        .iter()
        .fold((0, 0, 0), |(p, w, f), r| match r.status {
            CheckStatus::Pass => (p + 1, w, f),
            CheckStatus::Warn => (p, w + 1, f),
            CheckStatus::Fail => (p, w, f + 1),
        });
    out.push_str(&format!(
        "\n{} checks: {pass} passed, {warn} warned, {fail} failed\n",
        results.len()
    ));
    out
}

pub fn text_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| -> String {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(&format!("{c:<w$}", w = widths[i]));
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(|s| s.to_string()).collect());
    out.push_str(&line(widths.iter().map(|w| "-".repeat(*w)).collect()));
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

pub fn run_table(s: &RunSummary) -> String {
    let rows: Vec<Vec<String>> = s
        .assets
        .iter()
        .map(|a| {
            vec![
                a.name.clone(),
                a.kind.clone(),
                match a.status {
                    AssetStatus::Succeeded => "ok".into(),
                    AssetStatus::Failed => "FAILED".into(),
                    AssetStatus::Skipped => "skipped".into(),
                },
                thousands(a.rows_read),
                thousands(a.rows_written),
                thousands(a.rows_quarantined),
                a.table.clone(),
                format!("{:.1}s", a.duration_ms as f64 / 1000.0),
            ]
        })
        .collect();
    let mut out = text_table(
        &[
            "asset",
            "kind",
            "status",
            "read",
            "written",
            "quarantined",
            "table",
            "time",
        ],
        &rows,
    );
    let total =
        |f: fn(&weir_orchestrator::AssetResult) -> u64| thousands(s.assets.iter().map(f).sum());
    let failed = s
        .assets
        .iter()
        .filter(|a| a.status == AssetStatus::Failed)
        .count();
    let skipped = s
        .assets
        .iter()
        .filter(|a| a.status == AssetStatus::Skipped)
        .count();
    out.push_str(&format!(
        "\nrun {}: {} assets, {failed} failed, {skipped} skipped; rows read {}, written {}, quarantined {} in {:.1}s\n",
        &s.run_id[..8.min(s.run_id.len())],
        s.assets.len(),
        total(|a| a.rows_read),
        total(|a| a.rows_written),
        total(|a| a.rows_quarantined),
        s.duration_ms as f64 / 1000.0
    ));
    if failed > 0 {
        out.push_str(&format!(
            "  details: weir runs show {id}; rerun what failed: weir run --retry-failed {id}\n",
            id = &s.run_id[..8.min(s.run_id.len())]
        ));
    }
    for a in &s.assets {
        if let Some(note) = &a.note {
            if a.status == AssetStatus::Succeeded && note.starts_with("up to date") {
                out.push_str(&format!("  {}: {note}\n", a.name));
            }
        }
        if a.rows_quarantined > 0 {
            out.push_str(&format!(
                "  {}: {} rows quarantined; see `weir query \"select * from {}__quarantine\"`\n",
                a.name, a.rows_quarantined, a.table
            ));
        }
        if !a.checks.is_empty() {
            let warned: Vec<&weir_engine::checks::CheckResult> = a
                .checks
                .iter()
                .filter(|c| c.status != weir_engine::checks::CheckStatus::Pass)
                .collect();
            out.push_str(&format!(
                "  {}: {} checks passed before publishing{}\n",
                a.name,
                a.checks.len() - warned.len(),
                if warned.is_empty() {
                    String::new()
                } else {
                    format!(", {} warned", warned.len())
                }
            ));
            for c in warned {
                out.push_str(&format!("    warn {}: {}\n", c.name, c.message));
            }
        }
        if let Some(m) = &a.maintenance {
            let done = maintenance_summary(m);
            if !done.is_empty() {
                out.push_str(&format!("  {}: maintenance: {done}\n", a.name));
            }
        }
        if let Some(note) = a
            .note
            .as_deref()
            .filter(|n| n.contains("maintenance failed"))
        {
            out.push_str(&format!("  {}: {note}\n", a.name));
        }
        if let Some(e) = &a.error {
            let text = e.replace('\n', "\n    ");
            out.push_str(&format!(
                "\n{} ({}):\n    {text}\n",
                a.name,
                a.error_domain.as_deref().unwrap_or("skipped")
            ));
        }
    }
    out
}

/// What a maintenance policy did (or would do), in a few words per step.
pub fn maintenance_summary(m: &weir_lake::MaintenanceReport) -> String {
    let (del, comp, vac) = if m.dry_run {
        ("would delete", "would compact", "would vacuum")
    } else {
        ("deleted", "compacted", "vacuumed")
    };
    let mut steps = Vec::new();
    if let Some(r) = &m.retention {
        steps.push(format!(
            "retention {del} {} rows in {} files older than {}",
            r.rows, r.files, r.cutoff
        ));
    }
    if let Some(o) = &m.optimize {
        steps.push(if m.dry_run {
            format!("{comp} {} small files", o.files_removed)
        } else {
            format!("{comp} {} files into {}", o.files_removed, o.files_added)
        });
    }
    if let Some(v) = &m.vacuum {
        steps.push(format!("{vac} {} files", v.files.len()));
    }
    steps.extend(m.skipped.iter().map(|s| format!("skipped {s}")));
    steps.join("; ")
}

pub fn print_batches(batches: &[RecordBatch], csv: bool, json: bool) -> Result<(), Error> {
    let fail = |e: arrow::error::ArrowError| Error::internal(format!("formatting output: {e}"));
    let mut stdout = std::io::stdout().lock();
    if json {
        let mut w = arrow::json::ArrayWriter::new(&mut stdout);
        for b in batches {
            w.write(b).map_err(fail)?;
        }
        w.finish().map_err(fail)?;
        println!();
    } else if csv {
        let mut w = arrow::csv::WriterBuilder::new()
            .with_header(true)
            .build(&mut stdout);
        for b in batches {
            w.write(b).map_err(fail)?;
        }
    } else {
        let text = arrow::util::pretty::pretty_format_batches(batches).map_err(fail)?;
        println!("{text}");
        let n: usize = batches.iter().map(|b| b.num_rows()).sum();
        eprintln!(
            "{} row{}",
            thousands(n as u64),
            if n == 1 { "" } else { "s" }
        );
    }
    Ok(())
}

pub fn print_tables(stats: &[TableStats], json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(stats).unwrap_or_default()
        );
        return;
    }
    let rows: Vec<Vec<String>> = stats
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                thousands(t.rows),
                thousands(t.files),
                human_bytes(t.bytes),
                t.version.to_string(),
                t.partition_columns.join(","),
                t.last_modified.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print!(
        "{}",
        text_table(
            &[
                "table",
                "rows",
                "files",
                "bytes",
                "version",
                "partitions",
                "last_modified"
            ],
            &rows
        )
    );
}

pub fn print_history(history: &[HistoryEntry], json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(history).unwrap_or_default()
        );
        return;
    }
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "?".into());
    let rows: Vec<Vec<String>> = history
        .iter()
        .map(|h| {
            let c = &h.counts;
            let source = h
                .weir
                .get("weir.pipeline")
                .or_else(|| h.weir.get("weir.model"))
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string();
            vec![
                h.version.to_string(),
                h.timestamp.clone().unwrap_or_default(),
                h.operation.clone(),
                h.parameters
                    .get("mode")
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_string(),
                format!("+{} -{}", c.files_added, c.files_removed),
                format!("+{} -{}", c.rows_added, opt(c.rows_removed)),
                opt(c.files),
                opt(c.rows),
                source,
            ]
        })
        .collect();
    print!(
        "{}",
        text_table(
            &[
                "version",
                "timestamp",
                "operation",
                "mode",
                "files_changed",
                "rows_changed",
                "files",
                "rows",
                "by"
            ],
            &rows
        )
    );
}

/// `weir table stats`: one row per table, then each table's suggested actions.
pub fn print_health(tables: &[weir_lake::TableHealth], json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(tables).unwrap_or_default()
        );
        return;
    }
    let rows: Vec<Vec<String>> = tables
        .iter()
        .map(|h| {
            vec![
                h.name.clone(),
                thousands(h.files),
                human_bytes(h.bytes),
                human_bytes(h.avg_file_bytes),
                format!("{:.0}%", h.small_file_share * 100.0),
                thousands(h.partitions),
                thousands(h.rows),
                h.compression_ratio
                    .map(|r| format!("{r:.2}x"))
                    .unwrap_or_else(|| "-".into()),
                thousands(h.versions),
                h.last_checkpoint
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "-".into()),
                human_bytes(h.reclaimable_bytes),
            ]
        })
        .collect();
    print!(
        "{}",
        text_table(
            &[
                "table",
                "files",
                "size",
                "avg_file",
                "small",
                "partitions",
                "rows",
                "compression",
                "versions",
                "checkpoint",
                "reclaimable"
            ],
            &rows
        )
    );
    for h in tables {
        for s in &h.suggestions {
            println!("{}: {s}", h.name);
        }
    }
}

/// One result: JSON on stdout with `json`, else the text line(s).
pub fn print_record(record: serde_json::Value, json: bool, text: &str) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&record).unwrap_or_default()
        );
    } else {
        println!("{text}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_show_rows_bytes_and_rate() {
        assert_eq!(
            progress_line("orders", 1_500_000, 3 << 20, 2.0),
            "orders: 1,500,000 rows, 3.0 MiB, 750,000 rows/s"
        );
        // Too early for a meaningful rate.
        assert_eq!(
            progress_line("orders", 10, 100, 0.1),
            "orders: 10 rows, 100 B"
        );
    }

    #[test]
    fn formats_numbers() {
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(12), "12");
        assert_eq!(human_bytes(2048), "2.0 KiB");
    }
}
