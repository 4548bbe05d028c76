//! Operating weir: run history (`weir runs`) and workers that take runs from the queue.

use std::time::Duration;

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

/// `weir backfill`.
pub struct Backfill {
    pub asset: String,
    pub from: Option<String>,
    pub to: Option<String>,
    pub all: bool,
    pub parallel: usize,
    pub queue: bool,
}

/// Queues a run for every partition in the range that is not built (or every one with
/// `all`) and not already queued or running, then builds them with `parallel` workers.
pub async fn backfill(
    project: &weir_config::Project,
    store: &weir_orchestrator::Store,
    b: Backfill,
) -> Result<u8, weir_common::Error> {
    use weir_common::Error;
    let graph = weir_engine::Graph::build(project)?;
    graph.select(Some(&b.asset))?;
    let parts = project.partitions(&b.asset).ok_or_else(|| {
        Error::user(format!("`{}` is not partitioned", b.asset)).with_hint(
            "declare `partitions: {every: daily, start: 2024-01-01, column: day}` on the pipeline, or for the model in models/*.yaml",
        )
    })?;
    let keys = parts.keys_between(b.from.as_deref(), b.to.as_deref())?;
    weir_orchestrator::notify_recovered(
        &store
            .recover(project.config.state.lease, &weir_orchestrator::worker_id())
            .await?,
    );
    let done: std::collections::BTreeSet<String> = store
        .partitions(&b.asset)
        .await?
        .into_iter()
        .filter(|(_, status, _)| status == "succeeded")
        .map(|(k, _, _)| k)
        .collect();
    let active: std::collections::BTreeSet<String> = store
        .active_partitions(&b.asset)
        .await?
        .into_iter()
        .collect();
    let id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let mut queued = 0;
    for key in &keys {
        if (!b.all && done.contains(key)) || active.contains(key) {
            continue;
        }
        let mut run = weir_orchestrator::store::RunRecord::new(
            &project.config.name,
            &format!("backfill:{id}"),
        );
        run.selector = Some(b.asset.clone());
        run.partition = Some(key.clone());
        weir_orchestrator::enqueue(store, &run).await?;
        queued += 1;
    }
    let built_before = keys.iter().filter(|k| done.contains(*k)).count();
    eprintln!(
        "backfill {id} of {}: {} partitions in range, {} built before{}, {} queued or running already, {queued} queued now",
        b.asset,
        keys.len(),
        built_before,
        if b.all { " (rebuilding them)" } else { "" },
        keys.iter().filter(|k| active.contains(*k)).count(),
    );
    if b.queue {
        return Ok(0);
    }
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let opts = weir_orchestrator::worker::WorkerOptions {
        drain: true,
        max_runs: None,
        poll: Duration::from_millis(200),
        only: Some("backfill:%"),
    };
    let workers = (0..b.parallel.max(1)).map(|_| {
        weir_orchestrator::worker::work(project, store, opts, &rx, &|run, outcome| {
            let part = run.partition.as_deref().unwrap_or("?");
            match outcome {
                Ok(s) if s.ok => eprintln!("partition {part}: built (run {})", short(&run.id)),
                _ => eprintln!(
                    "partition {part}: FAILED (weir runs show {})",
                    short(&run.id)
                ),
            }
        })
    });
    for r in futures::future::join_all(workers).await {
        r?;
    }
    let states: std::collections::BTreeMap<String, String> = store
        .partitions(&b.asset)
        .await?
        .into_iter()
        .map(|(k, s, _)| (k, s))
        .collect();
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| states.get(*k).map(String::as_str) != Some("succeeded"))
        .collect();
    eprintln!(
        "{} of {} partitions built{}",
        keys.len() - missing.len(),
        keys.len(),
        if missing.is_empty() {
            String::new()
        } else {
            format!(
                "; not built: {} (run the same command again to retry them)",
                missing
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    );
    Ok(if missing.is_empty() { 0 } else { 1 })
}

fn age(ms: i64) -> String {
    let secs = (ms / 1000).max(0) as u64;
    humantime::format_duration(std::time::Duration::from_secs(if secs > 3600 {
        secs / 60 * 60
    } else {
        secs
    }))
    .to_string()
}

pub fn status_table(states: &[weir_orchestrator::alert::AssetState], now: i64) -> String {
    let rows: Vec<Vec<String>> = states
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.kind.clone(),
                match s.state.as_str() {
                    "late" => "LATE".into(),
                    "failing" => "FAILING".into(),
                    other => other.into(),
                },
                s.last_status.clone().unwrap_or_default(),
                s.last_success_at
                    .map(|t| format!("{} ago", age(now - t)))
                    .unwrap_or_else(|| "never".into()),
                s.freshness_sla_secs
                    .map(|v| {
                        humantime::format_duration(std::time::Duration::from_secs(v)).to_string()
                    })
                    .unwrap_or_default(),
            ]
        })
        .collect();
    text_table(
        &["asset", "kind", "state", "last run", "last success", "sla"],
        &rows,
    )
}
