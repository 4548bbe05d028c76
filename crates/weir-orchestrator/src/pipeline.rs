//! One pipeline run.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{ArrayRef, Int64Array, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use weir_common::Error;
use weir_config::{Pipeline, Project};
use weir_core::{BadRow, Position, Progress, SourceEvent};
use weir_engine::session::lake_session;
use weir_lake::{Lake, WriteOptions, WriteSpec};

use crate::run::{AssetResult, ProgressFn};

/// The txn app id of a pipeline.
pub fn app_id(pipeline: &str) -> String {
    format!("weir.pipeline.{pipeline}")
}

pub async fn run_pipeline(
    project: &Project,
    lake: &Lake,
    p: &Pipeline,
    run_id: &str,
    full_refresh: bool,
    on_progress: &ProgressFn,
) -> Result<AssetResult, Error> {
    let table = &p.config.sink.table;
    let app = app_id(&p.name);
    let hints = if full_refresh {
        None
    } else {
        lake.schema(table).await?
    };
    let source = weir_connectors::source_for(&p.config.source, &project.root, hints)?;

    // Where the last commit left off.
    let committed = if lake.exists(table) {
        let t = lake.open(table).await?;
        lake.txn_version(&t, &app).await?.unwrap_or(0)
    } else {
        0
    };
    let position = if committed > 0 && !full_refresh {
        Some(Position(lake.read_manifest(table, &app, committed)?))
    } else {
        None
    };
    let plan = source.plan(position.as_ref()).await?;
    let mut result = AssetResult::new(&p.name, table);
    result.units = plan.units.len();
    if plan.units.is_empty() && lake.exists(table) && !full_refresh {
        result.note = Some("up to date: no new input".into());
        return Ok(result);
    }

    // Read everything, keeping the bad rows aside.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<SourceEvent>(8);
    let progress = Arc::new(Progress::default());
    let reader = {
        let source = source.clone();
        let plan = plan.clone();
        let progress = progress.clone();
        tokio::spawn(async move { source.read(&plan, tx, progress).await })
    };
    let mut batches = Vec::new();
    let mut bad: Vec<BadRow> = Vec::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(SourceEvent::Batch(b)) => batches.push(b),
                Some(SourceEvent::Bad(rows)) => bad.extend(rows),
                None => break,
            },
            _ = ticker.tick() => on_progress(&p.name, &progress),
        }
    }
    reader
        .await
        .map_err(|e| Error::internal(format!("reader task: {e}")))??;
    on_progress(&p.name, &progress);
    let good: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
    result.rows_read = good + bad.len() as u64;
    result.rows_quarantined = bad.len() as u64;
    result.bytes_read = progress.bytes.load(std::sync::atomic::Ordering::Relaxed);

    if let Some(limit) = p.config.max_bad_rows {
        if limit.exceeded(bad.len() as u64, result.rows_read) {
            let sample: Vec<String> = bad
                .iter()
                .take(3)
                .map(|b| format!("  {}:{}: {}", b.source, b.line, b.reason))
                .collect();
            return Err(Error::user(format!(
                "pipeline `{}`: {} of {} rows are malformed, more than max_bad_rows ({limit}); nothing was committed\n{}",
                p.name,
                bad.len(),
                result.rows_read,
                sample.join("\n")
            ))
            .with_hint("fix the input files or raise `max_bad_rows`; the rejected rows are listed above"));
        }
    }

    let n = committed + 1;
    lake.write_manifest(table, &app, n, &plan.next.0)?;
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("weir.pipeline".to_string(), serde_json::json!(p.name));
    metadata.insert("weir.run_id".to_string(), serde_json::json!(run_id));
    metadata.insert("weir.files".to_string(), serde_json::json!(plan.units));
    let opts = WriteOptions {
        txn: Some((app.clone(), n as i64)),
        metadata,
    };

    if !bad.is_empty() {
        let q = quarantine_batch(&bad, &p.name, run_id)?;
        let qname = format!("{table}__quarantine");
        let ctx = weir_lake::new_session();
        let df = ctx
            .read_batch(q)
            .map_err(|e| Error::internal(format!("quarantine frame: {e}")))?;
        lake.write(&qname, &ctx, df, &WriteSpec::default(), &opts)
            .await?;
    }

    let ctx = lake_session(lake).await?;
    let mem = MemTable::try_new(plan.schema.clone(), vec![batches])
        .map_err(|e| Error::internal(format!("staging batches: {e}")))?;
    let df = match &p.config.transform {
        Some(sql) => {
            ctx.register_table("source", Arc::new(mem))
                .map_err(|e| Error::internal(e.to_string()))?;
            ctx.sql(sql).await.map_err(|e| {
                Error::user(format!(
                    "transform of pipeline `{}` ({}): {e}",
                    p.name,
                    p.file.display()
                ))
                .with_hint("the incoming rows are the table `source`")
            })?
        }
        None => ctx
            .read_table(Arc::new(mem))
            .map_err(|e| Error::internal(e.to_string()))?,
    };
    let sink = &p.config.sink;
    let spec = WriteSpec {
        mode: if full_refresh {
            weir_config::WriteMode::Overwrite
        } else {
            sink.mode
        },
        key: sink.key.clone(),
        delete_flag: sink.delete_flag.clone(),
        partition_by: sink.partition_by.clone(),
        evolution: sink.schema_evolution,
    };
    let m = lake.write(table, &ctx, df, &spec, &opts).await?;
    result.rows_written = m.rows_inserted + m.rows_updated;
    result.rows_deleted = m.rows_deleted;
    result.version = Some(m.version);
    if m.skipped {
        result.note = Some("already committed by an earlier attempt".into());
    }
    Ok(result)
}

fn quarantine_batch(bad: &[BadRow], pipeline: &str, run_id: &str) -> Result<RecordBatch, Error> {
    let now = chrono::Utc::now().timestamp_micros();
    let schema = Arc::new(Schema::new(vec![
        Field::new("run_id", DataType::Utf8, false),
        Field::new("pipeline", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("line", DataType::Int64, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("raw", DataType::Utf8, false),
        Field::new(
            "quarantined_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
    ]));
    let n = bad.len();
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![run_id; n])),
        Arc::new(StringArray::from(vec![pipeline; n])),
        Arc::new(StringArray::from(
            bad.iter().map(|b| b.source.as_str()).collect::<Vec<_>>(),
        )),
        Arc::new(Int64Array::from(
            bad.iter().map(|b| b.line as i64).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(
            bad.iter().map(|b| b.reason.as_str()).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(
            bad.iter().map(|b| b.raw.as_str()).collect::<Vec<_>>(),
        )),
        Arc::new(TimestampMicrosecondArray::from(vec![now; n]).with_timezone("UTC")),
    ];
    RecordBatch::try_new(schema, cols)
        .map_err(|e| Error::internal(format!("quarantine batch: {e}")))
}
