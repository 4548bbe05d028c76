//! One pipeline run.

use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use datafusion::catalog::TableProvider;
use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::error::DataFusionError;
use datafusion::functions_window::expr_fn::row_number;
use datafusion::logical_expr::{col, lit, Expr, ExprFunctionExt};
use datafusion::prelude::{DataFrame, ParquetReadOptions, SessionContext};
use futures::StreamExt;
use weir_common::Error;
use weir_config::{BadRowLimit, PartitionWindow, PartitionsConfig, Pipeline, Project, SinkKind};
use weir_connectors::postgres::sink::{PgSink, PgWrite};
use weir_core::{BadRow, Position, Progress, SourceEvent, SEQ_COLUMN};
use weir_engine::session::lake_session;
use weir_engine::stream::{channel_table, BatchResult};
use weir_lake::{Lake, WriteMetrics, WriteOptions, WriteSpec};

use crate::run::{AssetResult, ProgressFn};

/// The txn app id of a pipeline.
pub fn app_id(pipeline: &str) -> String {
    format!("weir.pipeline.{pipeline}")
}

/// The txn app id of one partition of a pipeline.
fn partition_app_id(pipeline: &str, key: &str) -> String {
    format!("{}[{key}]", app_id(pipeline))
}

/// A partitioned pipeline as it runs for one partition: its source and transform filled
/// in, and a check that quarantines rows outside the partition (which the load would
/// otherwise put where they do not belong).
/// Also returns the predicate of the partition's rows.
fn for_partition(
    p: &Pipeline,
    parts: &PartitionsConfig,
    w: &PartitionWindow,
) -> Result<(Pipeline, String), Error> {
    let mut p = p.clone();
    let ctx = |what: &str| format!("{} (`{what}` of pipeline `{}`)", p.file.display(), p.name);
    let src = &mut p.config.source;
    src.path = w
        .fill(&src.path)
        .map_err(|e| e.context(ctx("source.path")))?;
    if let Some(q) = &src.query {
        src.query = Some(w.fill(q).map_err(|e| e.context(ctx("source.query")))?);
    }
    if let Some(t) = &p.config.transform {
        p.config.transform = Some(w.fill(t).map_err(|e| e.context(ctx("transform")))?);
    }
    let predicate = parts.predicate(&w.key)?;
    let check = serde_json::json!({
        "check": "expression",
        "name": format!("in_partition_{}", parts.column),
        "sql": predicate,
        "on_fail": "quarantine",
    });
    p.config.checks.push(
        serde_json::from_value(check)
            .map_err(|e| Error::internal(format!("partition check: {e}")))?,
    );
    Ok((p, predicate))
}

pub async fn run_pipeline(
    project: &Project,
    lake: &Lake,
    p: &Pipeline,
    run_id: &str,
    full_refresh: bool,
    partition: Option<&str>,
    on_progress: &ProgressFn,
) -> Result<AssetResult, Error> {
    // A partitioned pipeline loads one partition: `partition`, or the last complete one.
    // It reads the whole partition and replaces its rows, which is all a full refresh
    // could mean for it.
    let filled;
    let (p, window) = match &p.config.partitions {
        Some(parts) => {
            let w = parts
                .resolve(partition, chrono::Utc::now().naive_utc())
                .map_err(|e| e.context(format!("pipeline `{}`", p.name)))?;
            let (pipeline, predicate) = for_partition(p, parts, &w)?;
            filled = pipeline;
            (&filled, Some((w, predicate)))
        }
        None => (p, None),
    };
    let full_refresh = full_refresh && window.is_none();
    let table = &p.config.sink.table;
    let app = match &window {
        Some((w, _)) => partition_app_id(&p.name, &w.key),
        None => app_id(&p.name),
    };
    let pg_sink = match p.config.sink.kind {
        SinkKind::Delta => None,
        SinkKind::Postgres => {
            let name = p.config.sink.connection.clone().unwrap_or_default();
            let conn = project
                .config
                .connections
                .get(&name)
                .cloned()
                .ok_or_else(|| {
                    Error::user(format!(
                        "unknown connection `{name}` in the sink of `{}`",
                        p.name
                    ))
                })?;
            Some(PgSink::new(&name, conn, table))
        }
    };
    if p.config.source.kind == weir_config::SourceKind::Lake {
        return run_lake_source(lake, p, pg_sink.as_ref(), run_id, full_refresh).await;
    }
    let hints = if full_refresh || pg_sink.is_some() {
        None
    } else {
        lake.schema(table).await?
    };
    // A merge keeps the last row of each key, by input order.
    let merge =
        p.config.sink.mode == weir_config::WriteMode::Merge || p.config.sink.mode.scd().is_some();
    let source = weir_connectors::source_for(project, &p.config.source, hints, merge)?;

    let (committed, position) =
        committed(lake, pg_sink.as_ref(), table, &app, window.is_none()).await?;
    let position = if full_refresh { None } else { position };
    let plan = source.plan(position.as_ref()).await?;
    let mut result = AssetResult::new(&p.name, table);
    result.units = plan.units.len();
    let loaded_before = match &pg_sink {
        Some(_) => committed > 0,
        None => lake.exists(table).await,
    };
    // An empty partition from files is a file not there yet, not a partition to empty.
    if let (Some((w, _)), true, weir_config::SourceKind::Files) =
        (&window, plan.units.is_empty(), p.config.source.kind)
    {
        return Err(Error::user(format!(
            "pipeline `{}`: no input for partition {}: `{}` matches no files",
            p.name, w.key, p.config.source.path
        ))
        .with_hint("load the partition once its files have arrived"));
    }
    if plan.units.is_empty() && loaded_before && !full_refresh && window.is_none() {
        result.note = Some("up to date: no new input".into());
        return Ok(result);
    }

    let n = committed + 1;
    if pg_sink.is_none() && window.is_none() {
        lake.write_manifest(table, &app, n, &plan.next.0).await?;
    }
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("weir.pipeline".to_string(), serde_json::json!(p.name));
    metadata.insert("weir.run_id".to_string(), serde_json::json!(run_id));
    if let Some((w, _)) = &window {
        metadata.insert("weir.partition".to_string(), serde_json::json!(w.key));
    }
    metadata.insert("weir.files".to_string(), serde_json::json!(plan.units));
    let opts = WriteOptions {
        txn: Some((app.clone(), n)),
        positions: Vec::new(),
        metadata,
    };

    // The source streams into the write: batches flow through a bounded channel into
    // DataFusion (transform, casts, Parquet encoding on every core), bad rows are kept
    // aside. After the last row the feeder checks `max_bad_rows` and commits the
    // quarantine; only then does the stream end and the table commit follow.
    let progress = Arc::new(Progress::default());
    let (events_tx, events_rx) = tokio::sync::mpsc::channel::<SourceEvent>(8);
    let reader = {
        let source = source.clone();
        let plan = plan.clone();
        let progress = progress.clone();
        tokio::spawn(async move { source.read(&plan, events_tx, progress).await })
    };
    let ctx = lake_session(lake).await?;
    let partitions = ctx.state().config().target_partitions();
    let (batches_tx, batches_rx) = tokio::sync::mpsc::channel(partitions * 2);
    let incoming = channel_table(plan.schema.clone(), batches_rx, partitions)?;
    let partition_key = window.as_ref().map(|(w, _)| w.key.clone());
    let replace_where = window.as_ref().map(|(_, pred)| pred.clone());
    let feeder = tokio::spawn(feed(
        Feed {
            pipeline: p.name.clone(),
            max_bad_rows: p.config.max_bad_rows,
            lake: lake.clone(),
            quarantine: format!("{table}__quarantine"),
            run_id: run_id.to_string(),
            partition: partition_key.clone(),
            opts: opts.clone(),
        },
        reader,
        events_rx,
        batches_tx,
    ));

    let load = Load {
        n,
        partition: partition_key.as_deref(),
        replace_where: replace_where.as_deref(),
        full_refresh,
    };
    let write = async {
        let df = incoming_frame(p, &ctx, incoming, full_refresh).await?;
        let audited = audit_load(lake, &ctx, p, run_id, &load, &opts.metadata, df).await?;
        let df = audited.df.clone();
        let m = match &pg_sink {
            Some(sink) => write_postgres(sink, p, df, &load, &app, &plan.next.0).await,
            None => {
                let rereadable = audited.is_staged();
                write_delta(lake, p, &ctx, df, &load, &opts, rereadable).await
            }
        }?;
        Ok::<_, Error>((m, audited.results.clone(), audited.quarantined))
    };
    tokio::pin!(write);
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    let written = loop {
        tokio::select! {
            w = &mut write => break w,
            _ = ticker.tick() => on_progress(&p.name, &progress),
        }
    };
    on_progress(&p.name, &progress);
    // The write has stopped reading: a feeder still blocked on a full channel sees it
    // closed and ends, so this join cannot hang.
    let fed = feeder
        .await
        .map_err(|e| Error::internal(format!("feeder task: {e}")))?;
    let (m, fed, refused) = match (written, fed) {
        // The feeder's own failure (a source error, too many bad rows) is the cause; the
        // write only saw the stream end in error.
        (_, Err(e)) => return Err(e),
        (Err(e), _) => return Err(e),
        (Ok((m, checks, refused)), Ok(fed)) => {
            result.checks = checks;
            (m, fed, refused)
        }
    };
    result.rows_read = fed.good + fed.bad;
    result.rows_quarantined = fed.bad + refused;
    result.bytes_read = progress.bytes.load(std::sync::atomic::Ordering::Relaxed);
    result.record(&m);
    if let Some((w, _)) = window {
        result.note = Some(format!("partition {} (replaced)", w.key));
        result.partition = Some(w.key);
    }
    Ok(result)
}

/// One load of a pipeline: its number, and for a partition the key and the predicate of
/// the rows it replaces.
struct Load<'a> {
    n: i64,
    partition: Option<&'a str>,
    replace_where: Option<&'a str>,
    full_refresh: bool,
}

/// Where the last commit left off: a Delta table's txn and position manifest, or the
/// pipeline's row in the PostgreSQL target's `weir.positions`.
async fn committed(
    lake: &Lake,
    pg_sink: Option<&PgSink>,
    table: &str,
    app: &str,
    with_position: bool,
) -> Result<(i64, Option<Position>), Error> {
    match pg_sink {
        Some(sink) => {
            let (n, pos) = sink.committed(app).await?;
            Ok((n, pos.map(Position)))
        }
        None => {
            let committed = if lake.exists(table).await {
                let t = lake.open(table).await?;
                lake.txn_version(&t, app).await?.unwrap_or(0)
            } else {
                0
            };
            let position = if committed > 0 && with_position {
                Some(Position(lake.read_manifest(table, app, committed).await?))
            } else {
                None
            };
            Ok((committed, position))
        }
    }
}

/// A pipeline reading a table of the lake (to load it into PostgreSQL, say). The position
/// is the table version read; an unchanged table is not loaded again.
async fn run_lake_source(
    lake: &Lake,
    p: &Pipeline,
    pg_sink: Option<&PgSink>,
    run_id: &str,
    full_refresh: bool,
) -> Result<AssetResult, Error> {
    let table = &p.config.sink.table;
    let app = app_id(&p.name);
    let src = p.config.source.table.clone().unwrap_or_default();
    let source_table = lake.open_existing(&src).await.map_err(|e| {
        e.with_hint(format!(
            "run the pipeline or model that writes `{src}` first (`weir run +{}`)",
            p.name
        ))
    })?;
    let version = source_table.version().unwrap_or(0);
    let (done, position) = committed(lake, pg_sink, table, &app, true).await?;
    let mut result = AssetResult::new(&p.name, table);
    result.units = 1;
    let read_before = position
        .as_ref()
        .and_then(|p| p.0.get("version"))
        .and_then(|v| v.as_u64());
    if !full_refresh && read_before == Some(version) {
        result.units = 0;
        result.note = Some(format!("up to date: `{src}` is still at version {version}"));
        return Ok(result);
    }
    let n = done + 1;
    let next = serde_json::json!({ "version": version, "table": src });
    let ctx = lake_session(lake).await?;
    let provider = ctx
        .table_provider(src.as_str())
        .await
        .map_err(|e| Error::internal(format!("reading `{src}`: {e}")))?;
    let df = incoming_frame(p, &ctx, provider, full_refresh).await?;
    let metadata =
        std::collections::HashMap::from([("weir.pipeline".to_string(), serde_json::json!(p.name))]);
    let load = Load {
        n,
        partition: None,
        replace_where: None,
        full_refresh,
    };
    let audited = audit_load(lake, &ctx, p, run_id, &load, &metadata, df).await?;
    let df = audited.df.clone();
    result.checks = audited.results.clone();
    result.rows_quarantined = audited.quarantined;
    let m = match pg_sink {
        Some(sink) => write_postgres(sink, p, df, &load, &app, &next).await?,
        None => {
            lake.write_manifest(table, &app, n, &next).await?;
            let mut metadata = std::collections::HashMap::new();
            metadata.insert("weir.pipeline".to_string(), serde_json::json!(p.name));
            metadata.insert("weir.run_id".to_string(), serde_json::json!(run_id));
            let opts = WriteOptions {
                txn: Some((app.clone(), n)),
                positions: Vec::new(),
                metadata,
            };
            // A lake table can be read more than once as it is.
            write_delta(lake, p, &ctx, df, &load, &opts, true).await?
        }
    };
    result.rows_read = m.rows_inserted + m.rows_updated;
    result.record(&m);
    Ok(result)
}

/// Runs the pipeline's checks on load `n` before it is committed; quarantining checks put
/// their rows in the sink table's quarantine.
async fn audit_load(
    lake: &Lake,
    ctx: &SessionContext,
    p: &Pipeline,
    run_id: &str,
    load: &Load<'_>,
    metadata: &std::collections::HashMap<String, serde_json::Value>,
    df: DataFrame,
) -> Result<crate::gate::Audited, Error> {
    let table = &p.config.sink.table;
    let qtable = format!("{table}__quarantine");
    let target = crate::quarantine::Target {
        lake,
        table: &qtable,
        pipeline: &p.name,
        run_id,
        load: load.n,
        partition: load.partition,
        metadata,
    };
    crate::gate::audit(ctx, &p.name, table, &p.config.checks, df, Some(&target)).await
}

/// What the feeder needs besides its channels.
struct Feed {
    pipeline: String,
    max_bad_rows: Option<BadRowLimit>,
    lake: Lake,
    quarantine: String,
    run_id: String,
    partition: Option<String>,
    opts: WriteOptions,
}

/// Rows the feeder passed on and set aside.
struct Fed {
    good: u64,
    bad: u64,
}

/// Moves batches from the source to the write and bad rows aside; at the end, enforces
/// `max_bad_rows` and commits the quarantine. On failure the write receives the error, so
/// it commits nothing, and the error is returned for the user.
async fn feed(
    f: Feed,
    reader: tokio::task::JoinHandle<Result<(), Error>>,
    mut events: tokio::sync::mpsc::Receiver<SourceEvent>,
    out: tokio::sync::mpsc::Sender<BatchResult>,
) -> Result<Fed, Error> {
    let mut good = 0u64;
    let mut bad: Vec<BadRow> = Vec::new();
    while let Some(ev) = events.recv().await {
        match ev {
            SourceEvent::Batch(b) => {
                good += b.num_rows() as u64;
                if out.send(Ok(b)).await.is_err() {
                    // The write stopped early (it failed, or the commit had already landed).
                    reader.abort();
                    return Ok(Fed {
                        good,
                        bad: bad.len() as u64,
                    });
                }
            }
            SourceEvent::Bad(rows) => {
                bad.extend(rows);
                if let Some(limit) = f.max_bad_rows {
                    // A count limit can fail as soon as it is passed; a ratio needs the total.
                    let seen = good + bad.len() as u64;
                    if matches!(limit, BadRowLimit::Count(_))
                        && limit.exceeded(bad.len() as u64, seen)
                    {
                        reader.abort();
                        return veto(&out, too_many_bad_rows(&f, &bad, seen, limit, false)).await;
                    }
                }
            }
        }
    }
    let read = match reader.await {
        Ok(r) => r,
        Err(e) => Err(Error::internal(format!("reader task: {e}"))),
    };
    if let Err(e) = read {
        return veto(&out, e).await;
    }
    let total = good + bad.len() as u64;
    if let Some(limit) = f.max_bad_rows {
        if limit.exceeded(bad.len() as u64, total) {
            return veto(&out, too_many_bad_rows(&f, &bad, total, limit, true)).await;
        }
    }
    if let Err(e) = quarantine(&f, &bad).await {
        return veto(&out, e).await;
    }
    Ok(Fed {
        good,
        bad: bad.len() as u64,
    })
}

async fn quarantine(f: &Feed, bad: &[BadRow]) -> Result<(), Error> {
    let target = crate::quarantine::Target {
        lake: &f.lake,
        table: &f.quarantine,
        pipeline: &f.pipeline,
        run_id: &f.run_id,
        load: f.opts.txn.as_ref().map(|(_, n)| *n).unwrap_or(0),
        partition: f.partition.as_deref(),
        metadata: &f.opts.metadata,
    };
    crate::quarantine::write(&target, crate::quarantine::Scope::Read, bad).await
}

/// Fails the write reading `out` with `e`, and returns `e`.
async fn veto(out: &tokio::sync::mpsc::Sender<BatchResult>, e: Error) -> Result<Fed, Error> {
    let _ = out
        .send(Err(DataFusionError::External(e.message.clone().into())))
        .await;
    Err(e)
}

fn too_many_bad_rows(
    f: &Feed,
    bad: &[BadRow],
    read: u64,
    limit: BadRowLimit,
    finished: bool,
) -> Error {
    let sample: Vec<String> = bad
        .iter()
        .take(3)
        .map(|b| format!("  {}:{}: {}", b.source, b.line, b.reason))
        .collect();
    let counted = if finished {
        format!("{} of {read} rows are malformed", bad.len())
    } else {
        format!(
            "{} of the first {read} rows are malformed (reading stopped there)",
            bad.len()
        )
    };
    Error::user(format!(
        "pipeline `{}`: {counted}, more than max_bad_rows ({limit}); nothing was committed\n{}",
        f.pipeline,
        sample.join("\n")
    ))
    .with_hint("fix the input files or raise `max_bad_rows`; the rejected rows are listed above")
}

/// The incoming rows after the transform: the last row per key for merges, deleted keys
/// dropped on a full refresh of a merge pipeline.
async fn incoming_frame(
    p: &Pipeline,
    ctx: &SessionContext,
    incoming: Arc<dyn TableProvider>,
    full_refresh: bool,
) -> Result<DataFrame, Error> {
    let sink = &p.config.sink;
    let df = match &p.config.transform {
        Some(sql) => {
            ctx.register_table("source", incoming)
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
            .read_table(incoming)
            .map_err(|e| Error::internal(e.to_string()))?,
    };
    let df = if df.schema().field_with_unqualified_name(SEQ_COLUMN).is_ok() {
        if sink.mode.scd().is_some() {
            // A dimension applies every change, in arrival order.
            df
        } else if sink.mode == weir_config::WriteMode::Merge && !sink.key.is_empty() {
            last_row_per_key(df, &sink.key)?
        } else {
            df.drop_columns(&[SEQ_COLUMN])
                .map_err(|e| Error::internal(format!("dropping {SEQ_COLUMN}: {e}")))?
        }
    } else {
        df
    };
    // A full refresh of a merge pipeline rebuilds what merging would have left: no rows of
    // deleted keys, no flag column.
    Ok(match (&sink.delete_flag, full_refresh, sink.mode) {
        (Some(flag), true, weir_config::WriteMode::Merge) => df
            .filter(col(flag.as_str()).is_not_true())
            .and_then(|d| d.drop_columns(&[flag.as_str()]))
            .map_err(|e| Error::user(format!("delete_flag `{flag}` of `{}`: {e}", p.name)))?,
        _ => df,
    })
}

/// Loads the rows into the PostgreSQL target, with the position, in one transaction.
async fn write_postgres(
    sink: &PgSink,
    p: &Pipeline,
    df: DataFrame,
    load: &Load<'_>,
    app: &str,
    position: &serde_json::Value,
) -> Result<WriteMetrics, Error> {
    let (full_refresh, n) = (load.full_refresh, load.n);
    let cfg = &p.config.sink;
    let write = PgWrite {
        mode: if full_refresh || load.replace_where.is_some() {
            weir_config::WriteMode::Overwrite
        } else {
            cfg.mode
        },
        replace_where: load.replace_where.map(str::to_string),
        key: cfg.key.clone(),
        delete_flag: if full_refresh {
            None
        } else {
            cfg.delete_flag.clone()
        },
        evolution: cfg.schema_evolution,
    };
    let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    let stream = df
        .execute_stream()
        .await
        .map_err(|e| Error::user(format!("pipeline `{}`: {e}", p.name)))?;
    let rows = stream
        .map(|b| b.map_err(|e| Error::external(format!("reading rows to load: {e}"))))
        .boxed();
    let m = sink.write(schema, rows, &write, app, n, position).await?;
    Ok(WriteMetrics {
        rows_inserted: m.inserted,
        rows_updated: m.updated,
        rows_deleted: m.deleted,
        version: n as u64,
        skipped: m.skipped,
    })
}

/// Writes the rows into the sink's Delta table.
async fn write_delta(
    lake: &Lake,
    p: &Pipeline,
    ctx: &SessionContext,
    df: DataFrame,
    load: &Load<'_>,
    opts: &WriteOptions,
    rereadable: bool,
) -> Result<WriteMetrics, Error> {
    let sink = &p.config.sink;
    if let Some(dim) = sink.dimension() {
        return write_dimension(lake, p, ctx, df, &dim, load, opts, rereadable).await;
    }
    let mode = if load.full_refresh || load.replace_where.is_some() {
        weir_config::WriteMode::Overwrite
    } else {
        sink.mode
    };
    // Merge and replace_partitions read their input more than once (key checks, partition
    // values, the join): a stream is staged to local Parquet first, which keeps memory
    // bounded; input already staged (by checks) or stored is read as it is.
    let _staging;
    let df = match mode {
        weir_config::WriteMode::Merge | weir_config::WriteMode::ReplacePartitions
            if !rereadable && lake.exists(&sink.table).await =>
        {
            let (dir, staged) = stage(ctx, df, &p.name).await?;
            _staging = dir;
            staged
        }
        _ => df,
    };
    let spec = WriteSpec {
        mode,
        key: sink.key.clone(),
        delete_flag: sink.delete_flag.clone(),
        partition_by: sink.partition_by.clone(),
        evolution: sink.schema_evolution,
        replace_where: load.replace_where.map(str::to_string),
        hash_columns: Vec::new(),
        fast_compression: false,
    };
    lake.write(&sink.table, ctx, df, &spec, opts).await
}

/// Applies the rows to the sink's slowly changing dimension. The input is read more than
/// once (the key check, then the changes), so a stream is staged first.
#[allow(clippy::too_many_arguments)] // write_delta's arguments and the dimension
async fn write_dimension(
    lake: &Lake,
    p: &Pipeline,
    ctx: &SessionContext,
    df: DataFrame,
    dim: &weir_config::Dimension,
    load: &Load<'_>,
    opts: &WriteOptions,
    rereadable: bool,
) -> Result<WriteMetrics, Error> {
    let _staging;
    let df = if rereadable {
        df
    } else {
        let (dir, staged) = stage(ctx, df, &p.name).await?;
        _staging = dir;
        staged
    };
    let txn = opts
        .txn
        .clone()
        .ok_or_else(|| Error::internal("a dimension load without a txn"))?;
    let applied = weir_engine::scd::apply::apply(
        lake,
        ctx,
        &p.config.sink.table,
        dim,
        df,
        &weir_engine::scd::apply::Load {
            txn,
            time: chrono::Utc::now(),
            rebuild: load.full_refresh,
            metadata: opts.metadata.clone(),
        },
    )
    .await
    .map_err(|e| e.context(format!("pipeline `{}` ({})", p.name, p.file.display())))?;
    Ok(WriteMetrics {
        rows_inserted: applied.changes,
        ..applied.write
    })
}

/// Writes `df` to local Parquet and reads it back: input that can be read twice.
async fn stage(
    ctx: &SessionContext,
    df: DataFrame,
    pipeline: &str,
) -> Result<(tempfile::TempDir, DataFrame), Error> {
    let dir = tempfile::Builder::new()
        .prefix("weir-staging-")
        .tempdir()
        .map_err(|e| Error::io("creating a staging directory", e))?;
    let path = dir.path().to_string_lossy().to_string();
    df.write_parquet(&path, DataFrameWriteOptions::new(), None)
        .await
        .map_err(|e| Error::external(format!("staging pipeline `{pipeline}`: {e}")))?;
    let staged = ctx
        .read_parquet(&path, ParquetReadOptions::default())
        .await
        .map_err(|e| Error::internal(format!("reading staged rows: {e}")))?;
    Ok((dir, staged))
}

/// Keeps the last row (highest [`SEQ_COLUMN`]) of each key and drops the sequence.
fn last_row_per_key(df: DataFrame, key: &[String]) -> Result<DataFrame, Error> {
    let partition: Vec<Expr> = key.iter().map(|k| col(k.as_str())).collect();
    let rank = row_number()
        .partition_by(partition)
        .order_by(vec![col(SEQ_COLUMN).sort(false, false)])
        .build()
        .map_err(|e| Error::internal(format!("ranking rows per key: {e}")))?
        .alias("__weir_rank");
    df.window(vec![rank])
        .and_then(|d| d.filter(col("__weir_rank").eq(lit(1u64))))
        .and_then(|d| d.drop_columns(&["__weir_rank", SEQ_COLUMN]))
        .map_err(|e| Error::user(format!("keeping the last row per key: {e}")))
}
