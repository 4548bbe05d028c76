//! Operating weir: run history (`weir runs`) and workers that take runs from the queue.

use weir_orchestrator::store::{AssetRecord, RunRecord};

use crate::output::{text_table, thousands};

/// `2026-11-25 14:03:07` in local time.
pub fn when(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| {
            t.with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_default()
}

fn took(start: Option<i64>, end: Option<i64>) -> String {
    match (start, end) {
        (Some(s), Some(e)) => format!("{:.1}s", (e - s).max(0) as f64 / 1000.0),
        (Some(_), None) => "…".into(),
        _ => String::new(),
    }
}

pub fn short(id: &str) -> &str {
    &id[..8.min(id.len())]
}

pub fn runs_table(runs: &[RunRecord]) -> String {
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                short(&r.id).to_string(),
                when(r.created_at),
                r.trigger.clone(),
                r.status.clone(),
                r.selector.clone().unwrap_or_else(|| "(all)".into()),
                r.partition.clone().unwrap_or_default(),
                took(r.started_at, r.ended_at),
            ]
        })
        .collect();
    text_table(
        &[
            "run",
            "created",
            "trigger",
            "status",
            "selection",
            "partition",
            "time",
        ],
        &rows,
    )
}

pub fn run_detail(run: &RunRecord, assets: &[AssetRecord]) -> String {
    let mut out = format!(
        "run {}\n  trigger   {}\n  status    {}\n  created   {}\n",
        run.id,
        run.trigger,
        run.status,
        when(run.created_at)
    );
    if let Some(s) = run.started_at {
        out.push_str(&format!("  started   {}\n", when(s)));
    }
    if let Some(e) = run.ended_at {
        out.push_str(&format!(
            "  ended     {} ({})\n",
            when(e),
            took(run.started_at, Some(e))
        ));
    }
    if let Some(w) = &run.worker {
        out.push_str(&format!("  worker    {w}\n"));
    }
    if let Some(s) = &run.selector {
        out.push_str(&format!("  selection {s}\n"));
    }
    if let Some(p) = &run.partition {
        out.push_str(&format!("  partition {p}\n"));
    }
    if let Some(r) = &run.retry_of {
        out.push_str(&format!("  retry of  {r}\n"));
    }
    if run.recoveries > 0 {
        out.push_str(&format!(
            "  resumed   {} time(s) after its worker stopped\n",
            run.recoveries
        ));
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = assets
        .iter()
        .map(|a| {
            vec![
                a.asset.clone(),
                a.kind.clone(),
                a.status.clone(),
                format!("{}/{}", a.attempts, a.max_attempts),
                a.rows_read.map(|v| thousands(v as u64)).unwrap_or_default(),
                a.rows_written
                    .map(|v| thousands(v as u64))
                    .unwrap_or_default(),
                a.rows_quarantined
                    .map(|v| thousands(v as u64))
                    .unwrap_or_default(),
                took(a.started_at, a.ended_at),
            ]
        })
        .collect();
    out.push_str(&text_table(
        &[
            "asset",
            "kind",
            "status",
            "attempts",
            "read",
            "written",
            "quarantined",
            "time",
        ],
        &rows,
    ));
    for a in assets {
        if let Some(e) = &a.error {
            out.push_str(&format!(
                "\n{} ({}):\n    {}\n",
                a.asset,
                a.error_domain.as_deref().unwrap_or("skipped"),
                e.trim_end().replace('\n', "\n    ")
            ));
        } else if let Some(n) = &a.note {
            out.push_str(&format!("  {}: {n}\n", a.asset));
        }
    }
    if run.status == "failed" {
        out.push_str(&format!(
            "\nrerun what failed: weir run --retry-failed {}\n",
            short(&run.id)
        ));
    }
    out
}

/// One line per finished run, for workers and the server.
pub fn print_outcome(
    run: &RunRecord,
    summary: &Result<weir_orchestrator::RunSummary, weir_common::Error>,
) {
    match summary {
        Ok(s) if s.ok => eprintln!("run {} ({}) succeeded", short(&run.id), run.trigger),
        Ok(_) => eprintln!(
            "run {} ({}) FAILED: weir runs show {}",
            short(&run.id),
            run.trigger,
            short(&run.id)
        ),
        Err(e) => eprintln!(
            "run {} ({}) FAILED: {}",
            short(&run.id),
            run.trigger,
            e.render()
        ),
    }
}
