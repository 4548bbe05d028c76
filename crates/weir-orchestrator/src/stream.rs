//! `weir stream run`: a Kafka topic landed in a lake table, exactly once.
//!
//! Records are buffered and committed together when `flush.rows`, `flush.bytes` or
//! `flush.interval` is reached. Each commit carries, as Delta `txn` actions in the same
//! transaction as the rows, every partition's next offset
//! (`weir:stream:<stream>:<topic>:<partition>`) and the commit's epoch
//! (`weir:stream:<stream>`). On start the consumer is positioned from the table, never
//! from the consumer group: a crash before the commit re-reads the records, a crash after
//! it does not. The group's offsets are committed after the table commit, for monitoring.
//!
//! Records that cannot become rows go to `<table>__quarantine` with their epoch (a replay
//! of the epoch replaces them, so they are not doubled) before the data commit.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};

/// The stream's Kafka consumer, which keeps librdkafka's errors.
type Consumer = StreamConsumer<kafka::Recorder>;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use weir_common::Error;
use weir_config::{Project, Stream};
use weir_connectors::avro as kafka_avro;
use weir_connectors::kafka::{self, Record};
use weir_connectors::kafka_sink;
use weir_lake::{Lake, WriteOptions, WriteSpec};

/// When a run stops (besides Ctrl-C or SIGTERM, after a last flush).
#[derive(Debug, Clone, Default)]
pub struct StreamOptions {
    /// Stop once no record has arrived for this long (everything read is committed).
    pub until_idle: Option<Duration>,
}

/// What a run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamSummary {
    pub stream: String,
    pub table: String,
    pub records: u64,
    pub rows: u64,
    pub quarantined: u64,
    pub commits: u64,
    /// Next offset per partition after the run.
    pub positions: BTreeMap<i32, i64>,
    /// Offsets the broker skipped where a partition resumed (see `run_stream`).
    pub skipped_offsets: u64,
    /// Runs of the table's maintenance policy (`maintenance:` in weir.yaml) and the
    /// small files they compacted away.
    pub maintenance_runs: u64,
    pub files_compacted: u64,
    /// Records published to `sink.kafka`.
    pub published: u64,
}

/// The least time between two runs of a streamed table's maintenance policy.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(60);

/// The app id of the stream's epoch counter.
fn epoch_app(stream: &str) -> String {
    format!("weir:stream:{stream}")
}

/// The app id holding one partition's next offset.
pub fn position_app(stream: &str, topic: &str, partition: i32) -> String {
    format!("weir:stream:{stream}:{topic}:{partition}")
}

/// The stream named `name` in the project, or a usage error listing the ones there are.
pub fn find<'a>(project: &'a Project, name: &str) -> Result<&'a Stream, Error> {
    project
        .streams
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| {
            let names: Vec<String> = project.streams.iter().map(|s| s.name.clone()).collect();
            Error::user(format!("unknown stream `{name}`")).with_hint(
                match weir_config::closest(name, &names) {
                    Some(c) => format!("did you mean `{c}`?"),
                    None if names.is_empty() => "streams are defined in streams/*.yaml".into(),
                    None => format!("streams: {}", names.join(", ")),
                },
            )
        })
}

/// Runs stream `name` until it is stopped (or idle, with `until_idle`).
pub async fn run_stream(
    project: &Project,
    lake: &Lake,
    name: &str,
    opts: &StreamOptions,
) -> Result<StreamSummary, Error> {
    let stream = find(project, name)?;
    let cfg = &stream.config;
    let src = &cfg.source;
    let table = cfg.sink.table.clone();
    let kafka_err = |what: &str, e| kafka_error(stream, what, e);
    if src.kind == weir_config::StreamSourceKind::File {
        return run_file_stream(project, lake, stream).await;
    }
    let mut job = match &cfg.sql {
        Some(_) => Some(SqlJob::compile(lake, stream).await?),
        None => None,
    };
    // The topic's partitions, and where each resumes: the table's position, else `start`.
    let (consumer, partitions) = connect(stream)?;
    let mut prep = prepare(project, lake, stream, &partitions, job.as_mut()).await?;
    // When each partition last delivered a record: a silent one stops holding the
    // watermark back after `event_time.idle_timeout`.
    let mut heard: BTreeMap<i32, Instant> =
        partitions.iter().map(|p| (*p, Instant::now())).collect();
    let mut assignment = TopicPartitionList::new();
    for p in &partitions {
        let offset = match prep.positions.get(p) {
            Some(next) => Offset::Offset(*next),
            None => match src.start {
                weir_config::StartAt::Earliest => Offset::Beginning,
                weir_config::StartAt::Latest => Offset::End,
            },
        };
        assignment
            .add_partition_offset(&src.topic, *p, offset)
            .map_err(|e| kafka_err("assigning partitions", e))?;
    }
    consumer
        .assign(&assignment)
        .map_err(|e| kafka_err("assigning partitions", e))?;
    tracing::info!(stream = name, table = %table, positions = ?prep.positions, epoch = prep.epoch, "stream started");

    let mut summary = StreamSummary {
        stream: name.to_string(),
        table: table.clone(),
        positions: prep.positions.clone(),
        ..Default::default()
    };
    let mut buffer: Vec<Record> = Vec::new();
    let mut buffered_bytes = 0u64;
    let mut oldest: Option<Instant> = None;
    let mut last_record = Instant::now();
    // Where each partition resumes: a first record past it means the broker skipped
    // offsets (compaction, retention, transaction markers, or a broker that answers a
    // fetch inside a batch with the next batch). Reported, not refused: on Kafka itself
    // gaps are normal in compacted and transactional topics.
    let mut expect: BTreeMap<i32, i64> = prep.positions.clone();
    // Maintenance runs after a commit at most once a minute, and at the end of a run.
    let mut maintained: Option<Instant> = None;
    let mut unmaintained = false;
    let mut since_commit = Instant::now();
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        let wait = match oldest {
            Some(t) => cfg.flush.interval.saturating_sub(t.elapsed()),
            None => cfg.flush.interval,
        };
        let wait = match opts.until_idle {
            Some(idle) => wait.min(idle.saturating_sub(last_record.elapsed())),
            None => wait,
        };
        let mut stopping = false;
        tokio::select! {
            m = consumer.recv() => {
                let m = m.map_err(|e| kafka_err("reading records", e))?;
                if let Some(want) = expect.remove(&m.partition()) {
                    if m.offset() > want {
                        tracing::warn!(
                            stream = name,
                            partition = m.partition(),
                            "resumed at offset {want}, but the broker's first record is at {}: {} offsets skipped",
                            m.offset(),
                            m.offset() - want
                        );
                        summary.skipped_offsets += (m.offset() - want) as u64;
                    }
                }
                heard.insert(m.partition(), Instant::now());
                let value = m.payload().map(<[u8]>::to_vec);
                buffered_bytes += value.as_ref().map_or(0, |v| v.len() as u64);
                buffer.push(Record {
                    partition: m.partition(),
                    offset: m.offset(),
                    timestamp: m.timestamp().to_millis(),
                    key: m.key().map(<[u8]>::to_vec),
                    value,
                    headers: m
                        .headers()
                        .map(|hs| {
                            hs.iter()
                                .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                                .collect()
                        })
                        .unwrap_or_default(),
                });
                oldest.get_or_insert_with(Instant::now);
                last_record = Instant::now();
            }
            _ = tokio::time::sleep(wait) => {}
            _ = &mut stop => { stopping = true; }
        }
        let idle = opts.until_idle.is_some_and(|d| last_record.elapsed() >= d);
        let due = buffer.len() >= cfg.flush.rows
            || buffered_bytes >= cfg.flush.bytes
            || oldest.is_some_and(|t| t.elapsed() >= cfg.flush.interval);
        if !buffer.is_empty() && (due || idle || stopping) {
            if let (Some(job), Some(et)) = (&mut job, &cfg.event_time) {
                job.query.set_idle(
                    heard
                        .iter()
                        .filter(|(_, t)| t.elapsed() >= et.idle_timeout)
                        .map(|(p, _)| *p),
                );
            }
            prep.commit(
                lake,
                stream,
                &buffer,
                since_commit,
                &mut summary,
                job.as_mut(),
            )
            .await?;
            since_commit = Instant::now();
            // Idle time is time spent waiting for records: a slow commit is not idleness
            // (records that arrived meanwhile wait in the consumer).
            last_record = last_record.max(since_commit);
            let mut done = TopicPartitionList::new();
            for (p, next) in &prep.positions {
                let _ = done.add_partition_offset(&src.topic, *p, Offset::Offset(*next));
            }
            if let Err(e) = consumer.commit(&done, CommitMode::Async) {
                tracing::warn!(stream = name, "committing the group's offsets: {e}");
            }
            buffer = Vec::new();
            buffered_bytes = 0;
            weir_common::memory::release();
            oldest = None;
            unmaintained = true;
            if maintained.is_none_or(|t| t.elapsed() >= MAINTENANCE_EVERY) {
                maintain(project, lake, &table, &mut summary).await;
                maintained = Some(Instant::now());
                unmaintained = false;
            }
        }
        if stopping || idle {
            if unmaintained {
                maintain(project, lake, &table, &mut summary).await;
            }
            break;
        }
    }
    summary.positions = prep.positions;
    Ok(summary)
}

/// What a run starts from: the table's epoch and positions (with the SQL job's state
/// restored), the Avro schemas and the Kafka sink (caught up).
struct Prepared {
    avro: Option<kafka_avro::AvroSchemas>,
    epoch: i64,
    positions: BTreeMap<i32, i64>,
    publisher: Option<kafka_sink::Publisher>,
}

impl Prepared {
    /// Commits `records` as the next epoch (see [`Flush`]), then publishes the epoch's rows
    /// to the Kafka sink, if there is one.
    async fn commit(
        &mut self,
        lake: &Lake,
        stream: &Stream,
        records: &[Record],
        started: Instant,
        summary: &mut StreamSummary,
        job: Option<&mut SqlJob>,
    ) -> Result<(), Error> {
        self.epoch += 1;
        let epoch = self.epoch;
        if let Some(a) = &mut self.avro {
            a.fetch(
                records
                    .iter()
                    .map(|r| r.value.as_deref().unwrap_or_default()),
            )
            .await?;
        }
        let step = Flush {
            lake,
            stream,
            records,
            epoch,
            started,
            avro: self.avro.as_ref(),
            publish: self.publisher.is_some(),
            by_offset: Default::default(),
        };
        let rows = step.run(&mut self.positions, summary, job).await?;
        if let Some(p) = &self.publisher {
            summary.published += tokio::task::block_in_place(|| p.publish(epoch, &rows))?;
            let app = epoch_app(&stream.name);
            lake.delete_state_file(&stream.config.sink.table, &app, &out_file(epoch))
                .await?;
        }
        Ok(())
    }
}

async fn prepare(
    project: &Project,
    lake: &Lake,
    stream: &Stream,
    partitions: &[i32],
    job: Option<&mut SqlJob>,
) -> Result<Prepared, Error> {
    let (cfg, name) = (&stream.config, stream.name.as_str());
    let src = &cfg.source;
    let avro = match src.format {
        weir_config::PayloadFormat::Avro => Some(
            kafka_avro::AvroSchemas::new(&src.avro.clone().unwrap_or_default(), &project.root)
                .map_err(|e| e.context(format!("stream `{name}` ({})", stream.file.display())))?,
        ),
        _ => None,
    };
    let mut positions: BTreeMap<i32, i64> = BTreeMap::new();
    let mut epoch = 0i64;
    let table = &cfg.sink.table;
    if lake.exists(table).await {
        let t = lake.open_existing(table).await?;
        epoch = lake.txn_version(&t, &epoch_app(name)).await?.unwrap_or(0);
        for p in partitions {
            if let Some(next) = lake
                .txn_version(&t, &position_app(name, source_id(src), *p))
                .await?
            {
                positions.insert(*p, next);
            }
        }
    }
    if let Some(job) = job {
        job.query.set_partitions(partitions.iter().copied());
        if epoch > 0 {
            job.restore(lake, stream, epoch).await?;
        }
    }
    let publisher = match &cfg.sink.kafka {
        Some(k) => {
            let p = tokio::task::block_in_place(|| kafka_sink::Publisher::connect(k, src, name))?;
            catch_up(lake, stream, &p, epoch).await?;
            Some(p)
        }
        None => None,
    };
    Ok(Prepared {
        avro,
        epoch,
        positions,
        publisher,
    })
}

/// What positions are kept under: the topic, or `file` for a file source.
fn source_id(src: &weir_config::KafkaSourceConfig) -> &str {
    match src.kind {
        weir_config::StreamSourceKind::Kafka => &src.topic,
        weir_config::StreamSourceKind::File => "file",
    }
}

/// A file source: its lines (JSON objects, Avro bodies are not line-based) are records of
/// partition 0 whose offsets are line numbers, read to the end of the file in commits of
/// `flush.rows` lines (or `flush.bytes`). The same exactly-once rules hold: the position
/// is the next line, in the table.
async fn run_file_stream(
    project: &Project,
    lake: &Lake,
    stream: &Stream,
) -> Result<StreamSummary, Error> {
    use tokio::io::AsyncBufReadExt;
    let (cfg, name) = (&stream.config, stream.name.as_str());
    let src = &cfg.source;
    let path = project.root.join(src.path.as_deref().unwrap_or_default());
    let mut job = match &cfg.sql {
        Some(_) => Some(SqlJob::compile(lake, stream).await?),
        None => None,
    };
    let mut prep = prepare(project, lake, stream, &[0], job.as_mut()).await?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| Error::io(format!("stream `{name}`: {}", path.display()), e))?;
    let mut lines = tokio::io::BufReader::with_capacity(1 << 20, file).split(b'\n');
    let mut summary = StreamSummary {
        stream: name.to_string(),
        table: cfg.sink.table.clone(),
        positions: prep.positions.clone(),
        ..Default::default()
    };
    let start = prep.positions.get(&0).copied().unwrap_or(0);
    let mut line = 0i64;
    let mut started = Instant::now();
    let mut done = false;
    while !done {
        let mut buffer: Vec<Record> = Vec::with_capacity(cfg.flush.rows.min(1 << 20));
        let mut bytes = 0u64;
        while buffer.len() < cfg.flush.rows && bytes < cfg.flush.bytes {
            let Some(value) = lines
                .next_segment()
                .await
                .map_err(|e| Error::io(format!("stream `{name}`: {}", path.display()), e))?
            else {
                done = true;
                break;
            };
            line += 1;
            if line - 1 < start || value.is_empty() {
                continue;
            }
            bytes += value.len() as u64;
            buffer.push(Record {
                partition: 0,
                offset: line - 1,
                timestamp: None,
                key: None,
                value: Some(value),
                headers: Vec::new(),
            });
        }
        if buffer.is_empty() {
            continue;
        }
        prep.commit(lake, stream, &buffer, started, &mut summary, job.as_mut())
            .await?;
        started = Instant::now();
        drop(buffer);
        weir_common::memory::release();
    }
    maintain(project, lake, &cfg.sink.table, &mut summary).await;
    summary.positions = prep.positions;
    Ok(summary)
}

/// Runs the table's maintenance policy, if it has one (compaction of the many small files
/// a stream writes, vacuum, retention). The rows are committed: a failure is logged, and
/// the stream goes on.
async fn maintain(project: &Project, lake: &Lake, table: &str, summary: &mut StreamSummary) {
    if let Some(Ok(report)) = crate::run::maintain_table(project, lake, table).await {
        summary.maintenance_runs += 1;
        if let Some(o) = &report.optimize {
            summary.files_compacted += o.files_removed;
        }
    }
}

/// A streaming SQL job: the compiled query and the source's columns.
struct SqlJob {
    query: weir_engine::stream_sql::StreamSql,
    /// The records' columns: the declared ones, then the record's own.
    source: arrow::datatypes::SchemaRef,
    /// The declared ones.
    declared: arrow::datatypes::SchemaRef,
    /// Declared columns a record must have.
    required: Vec<usize>,
    ctx: datafusion::prelude::SessionContext,
}

impl SqlJob {
    async fn compile(lake: &Lake, stream: &Stream) -> Result<SqlJob, Error> {
        let cfg = &stream.config;
        let src = &cfg.source;
        let in_file = |e: Error| {
            e.context(format!(
                "stream `{}` ({})",
                stream.name,
                stream.file.display()
            ))
        };
        let declared = match (src.format, src.columns.is_empty()) {
            (weir_config::PayloadFormat::Raw, true) => {
                Arc::new(arrow::datatypes::Schema::new(vec![
                    arrow::datatypes::Field::new("value", arrow::datatypes::DataType::Utf8, true),
                ]))
            }
            (_, true) => return Err(Error::user(format!(
                "{}: a stream with `sql` declares its records' fields in `source.columns`",
                stream.file.display()
            ))
            .with_hint(
                "e.g. `columns: [{name: user_id, type: bigint}, {name: ts, type: timestamptz}]`",
            )),
            (_, false) => kafka::declared_schema(&src.columns).map_err(in_file)?,
        };
        let source = kafka::source_schema(&declared);
        let required = src
            .columns
            .iter()
            .filter(|c| !c.nullable)
            .filter_map(|c| source.index_of(&c.name).ok())
            .collect();
        let ctx = weir_engine::session::live_lake_session(lake).await?;
        let spec = weir_engine::stream_sql::StreamSqlSpec {
            sql: cfg.sql.clone().unwrap_or_default(),
            source: src.name.clone().unwrap_or_else(|| "source".into()),
            schema: source.clone(),
            partition_column: kafka::META_COLUMNS[0].into(),
            event_time: cfg
                .event_time
                .as_ref()
                .map(|e| (e.column.clone(), e.allowed_delay)),
            updating: !cfg.sink.key.is_empty(),
        };
        let query = weir_engine::stream_sql::StreamSql::compile(&ctx, &spec)
            .await
            .map_err(in_file)?;
        let output = query.output_schema();
        if let Some(k) = cfg.sink.key.iter().find(|k| output.index_of(k).is_err()) {
            return Err(Error::user(format!(
                "stream `{}`: `sink.key` names `{k}`, which the query does not return",
                stream.name
            ))
            .with_hint(format!(
                "the query returns: {}; set sink.key in {} to the columns that identify a row \
                 (a running aggregate's GROUP BY columns)",
                output
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                stream.file.display()
            )));
        }
        Ok(SqlJob {
            query,
            declared,
            source,
            required,
            ctx,
        })
    }

    /// Takes up the state of the table's epoch `epoch`.
    async fn restore(&mut self, lake: &Lake, stream: &Stream, epoch: i64) -> Result<(), Error> {
        let table = &stream.config.sink.table;
        let app = epoch_app(&stream.name);
        let bytes = lake.read_state(table, &app, epoch).await?.ok_or_else(|| {
            Error::user(format!(
                "stream `{}`: table `{table}` is at epoch {epoch} but its state checkpoint is gone",
                stream.name
            ))
            .with_hint(format!(
                "the windows open at that epoch cannot be rebuilt; to start over, drop `{table}` (its rows and offsets go with it)"
            ))
        })?;
        self.query.restore(&bytes)
    }
}

/// Records a SQL job decodes and queries at a time.
const QUERY_CHUNK: usize = 8192;

/// One commit: records of one epoch.
struct Flush<'a> {
    lake: &'a Lake,
    stream: &'a Stream,
    records: &'a [Record],
    epoch: i64,
    /// When the previous commit was made (for the throughput in `weir stream status`).
    started: Instant,
    /// Avro values' schemas, fetched for these records.
    avro: Option<&'a kafka_avro::AvroSchemas>,
    /// The rows go to a Kafka topic after the commit: keep them beside the table until
    /// they are published.
    publish: bool,
    /// `records` by partition and offset, when a row is set aside.
    by_offset: std::cell::OnceCell<std::collections::HashMap<(i32, i64), usize>>,
}

impl Flush<'_> {
    /// Commits the records (or, for a SQL job, what the query made of them) to the stream's
    /// table with the partitions' next offsets; the quarantined ones first, to the
    /// quarantine table.
    async fn run(
        &self,
        positions: &mut BTreeMap<i32, i64>,
        summary: &mut StreamSummary,
        job: Option<&mut SqlJob>,
    ) -> Result<Vec<arrow::record_batch::RecordBatch>, Error> {
        let (stream, epoch) = (self.stream, self.epoch);
        let cfg = &stream.config;
        let table = &cfg.sink.table;
        let known = match &job {
            Some(j) => Some(j.source.clone()),
            None => self.lake.schema(table).await?,
        };
        // A SQL job's records are decoded and queried in chunks: the same rows, but no
        // buffer of the whole commit's size is allocated and freed at once.
        let chunk = match &job {
            Some(_) => QUERY_CHUNK,
            None => self.records.len().max(1),
        };
        let mut parts = Vec::new();
        for records in self.records.chunks(chunk) {
            parts.push(match (&job, cfg.source.format) {
                (Some(j), weir_config::PayloadFormat::Json) => {
                    kafka::decode_declared(records, &cfg.source.topic, &j.declared)?
                }
                _ => kafka::decode(
                    records,
                    cfg.source.format,
                    &cfg.source.topic,
                    known.as_ref(),
                    self.avro,
                )?,
            });
        }
        let misfits: Vec<&weir_core::BadRow> = parts.iter().flat_map(|d| &d.misfits).collect();
        if let (Some(first), weir_config::OnIncompatible::Stop) =
            (misfits.first(), cfg.sink.on_incompatible)
        {
            return Err(Error::user(format!(
                "stream `{}`: the record at {} offset {} does not fit {}: {}; \
                 nothing of this batch was committed ({} such records in it)",
                stream.name,
                first.source,
                first.line,
                match job {
                    Some(_) => "`source.columns`".to_string(),
                    None => format!("table `{table}`"),
                },
                first.reason,
                misfits.len()
            ))
            .with_hint(format!(
                "fix the producer, or set `sink.on_incompatible: quarantine` in {} to set such \
                 records aside; the stream resumes at the same records",
                stream.file.display()
            )));
        }
        let mut bad = Vec::new();
        let mut batches = Vec::with_capacity(parts.len());
        for d in parts {
            bad.extend(d.malformed);
            bad.extend(d.misfits);
            batches.push(d.batch);
        }
        let (ctx, rows) = match job {
            None => (weir_lake::new_session(), batches),
            Some(job) => {
                let mut rows = Vec::new();
                for b in batches {
                    rows.extend(self.query(job, b, &mut bad).await?);
                }
                rows.extend(job.query.advance().await?);
                let held = job.query.state_bytes() as u64;
                if held > cfg.state.max_bytes {
                    return Err(Error::user(format!(
                        "stream `{}`: its query's state takes {} after these records, past \
                         `state.max_bytes` ({}); nothing of them was committed",
                        stream.name,
                        weir_common::memory::human_bytes(held),
                        weir_common::memory::human_bytes(cfg.state.max_bytes)
                    ))
                    .with_hint(format!(
                        "bound a join of the stream with itself in time (`b.ts BETWEEN a.ts AND \
                         a.ts + INTERVAL '1' HOUR`), use shorter windows, or raise \
                         `state: {{max_bytes: ...}}` in {}",
                        stream.file.display()
                    )));
                }
                if rows.is_empty() {
                    rows.push(arrow::record_batch::RecordBatch::new_empty(
                        job.query.output_schema().clone(),
                    ));
                }
                let state = job.query.checkpoint()?;
                self.lake
                    .write_state(table, &epoch_app(&stream.name), epoch, state)
                    .await?;
                (job.ctx.clone(), rows)
            }
        };
        if self.publish {
            self.lake
                .write_state_file(
                    table,
                    &epoch_app(&stream.name),
                    &out_file(epoch),
                    to_ipc(&rows)?,
                )
                .await?;
        }
        // A keyed sink takes each key's last row of the commit.
        let written = match cfg.sink.key.is_empty() {
            true => rows.clone(),
            false => last_per_key(&rows, &cfg.sink.key)?,
        };
        let df = ctx
            .read_batches(written)
            .map_err(|e| Error::internal(format!("buffering rows: {e}")))?;
        let mut next = positions.clone();
        let mut per_partition: BTreeMap<i32, u64> = BTreeMap::new();
        for r in self.records {
            let e = next.entry(r.partition).or_insert(r.offset + 1);
            *e = (*e).max(r.offset + 1);
            *per_partition.entry(r.partition).or_default() += 1;
        }
        let metadata: std::collections::HashMap<String, serde_json::Value> = [(
            "weir.stream".to_string(),
            serde_json::json!({
                "stream": stream.name,
                "epoch": epoch,
                "records": self.records.len(),
                "partition_records": per_partition,
                "elapsed_ms": self.started.elapsed().as_millis() as u64,
            }),
        )]
        .into_iter()
        .collect();
        if !bad.is_empty() {
            let qtable = format!("{table}__quarantine");
            let target = crate::quarantine::Target {
                lake: self.lake,
                table: &qtable,
                pipeline: &stream.name,
                run_id: "stream",
                load: epoch,
                partition: None,
                metadata: &metadata,
            };
            crate::quarantine::write(&target, crate::quarantine::Scope::Read, &bad).await?;
        }
        let keyed = !cfg.sink.key.is_empty();
        let spec = WriteSpec {
            mode: match keyed {
                true => weir_config::WriteMode::Merge,
                false => weir_config::WriteMode::Append,
            },
            key: cfg.sink.key.clone(),
            partition_by: cfg.sink.partition_by.clone(),
            evolution: cfg.sink.schema_evolution,
            fast_compression: true,
            ..Default::default()
        };
        let write = WriteOptions {
            txn: Some((epoch_app(&stream.name), epoch)),
            positions: next
                .iter()
                .map(|(p, n)| (position_app(&stream.name, source_id(&cfg.source), *p), *n))
                .collect(),
            metadata,
        };
        let m = self.lake.write(table, &ctx, df, &spec, &write).await?;
        tracing::info!(
            stream = %stream.name,
            epoch,
            rows = m.rows_inserted,
            quarantined = bad.len(),
            version = m.version,
            "committed"
        );
        if epoch > 1 {
            // The previous epoch's state is no longer needed: this one is committed.
            let app = epoch_app(&stream.name);
            if let Err(e) = self.lake.delete_state(table, &app, epoch - 1).await {
                tracing::warn!(stream = %stream.name, "{e}");
            }
        }
        *positions = next;
        summary.records += self.records.len() as u64;
        summary.rows += m.rows_inserted + m.rows_updated;
        summary.quarantined += bad.len() as u64;
        summary.commits += 1;
        Ok(rows)
    }

    /// Runs the SQL job over decoded records: the rows for the table (windows are emitted
    /// by the caller, after the last chunk); records missing a required field, late or
    /// without event time go to `bad`.
    async fn query(
        &self,
        job: &mut SqlJob,
        batch: arrow::record_batch::RecordBatch,
        bad: &mut Vec<weir_core::BadRow>,
    ) -> Result<Vec<arrow::record_batch::RecordBatch>, Error> {
        let topic = &self.stream.config.source.topic;
        // Records by partition and offset, built the first time a row is set aside.
        let by_offset = || -> &std::collections::HashMap<(i32, i64), usize> {
            self.by_offset.get_or_init(|| {
                self.records
                    .iter()
                    .enumerate()
                    .map(|(i, r)| ((r.partition, r.offset), i))
                    .collect()
            })
        };
        let record_at = |batch: &arrow::record_batch::RecordBatch, i: usize| {
            use arrow::array::AsArray;
            let p = batch
                .column_by_name(kafka::META_COLUMNS[0])
                .map(|c| c.as_primitive::<arrow::datatypes::Int32Type>().value(i));
            let o = batch
                .column_by_name(kafka::META_COLUMNS[1])
                .map(|c| c.as_primitive::<arrow::datatypes::Int64Type>().value(i));
            p.zip(o)
                .and_then(|k| by_offset().get(&k).map(|i| &self.records[*i]))
        };
        let err = |e: arrow::error::ArrowError| Error::internal(format!("records: {e}"));
        // Only the declared columns, in order (a field no record had is null); then the
        // rows with every required field.
        let columns: Vec<arrow::array::ArrayRef> = job
            .source
            .fields()
            .iter()
            .map(|f| match batch.column_by_name(f.name()) {
                Some(c) => c.clone(),
                None => arrow::array::new_null_array(f.data_type(), batch.num_rows()),
            })
            .collect();
        let batch =
            arrow::record_batch::RecordBatch::try_new(job.source.clone(), columns).map_err(err)?;
        let batch = if job.required.is_empty() {
            batch
        } else {
            let mut keep = Vec::with_capacity(batch.num_rows());
            for i in 0..batch.num_rows() {
                let missing = job
                    .required
                    .iter()
                    .find(|c| batch.column(**c).is_null(i))
                    .map(|c| job.source.field(*c).name().clone());
                match (missing, record_at(&batch, i)) {
                    (Some(name), Some(r)) => bad.push(kafka::bad_row(
                        r,
                        &format!("field `{name}` is missing (it is not nullable)"),
                        format!("kafka://{topic}/{}", r.partition),
                    )),
                    _ => keep.push(i as u32),
                }
            }
            arrow::compute::take_record_batch(&batch, &arrow::array::UInt32Array::from(keep))
                .map_err(err)?
        };
        let pushed = job.query.push(&batch).await?;
        for (i, reason) in &pushed.late {
            if let Some(r) = record_at(&batch, *i) {
                bad.push(kafka::bad_row(
                    r,
                    reason,
                    format!("kafka://{topic}/{}", r.partition),
                ));
            }
        }
        Ok(pushed.rows)
    }
}

/// Of `rows` (in the order they were made), the last one of each key.
fn last_per_key(
    rows: &[arrow::record_batch::RecordBatch],
    key: &[String],
) -> Result<Vec<arrow::record_batch::RecordBatch>, Error> {
    let err = |e: arrow::error::ArrowError| Error::internal(format!("rows by key: {e}"));
    let Some(first) = rows.first() else {
        return Ok(Vec::new());
    };
    let all = arrow::compute::concat_batches(first.schema_ref(), rows).map_err(err)?;
    let cols = key
        .iter()
        .map(|k| {
            all.column_by_name(k)
                .cloned()
                .ok_or_else(|| Error::internal(format!("key column {k} missing")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let converter = arrow::row::RowConverter::new(
        cols.iter()
            .map(|c| arrow::row::SortField::new(c.data_type().clone()))
            .collect(),
    )
    .map_err(err)?;
    let keys = converter.convert_columns(&cols).map_err(err)?;
    let mut last = std::collections::HashMap::new();
    for i in 0..all.num_rows() {
        last.insert(keys.row(i), i as u32);
    }
    if last.len() == all.num_rows() {
        return Ok(vec![all]);
    }
    let mut keep: Vec<u32> = last.into_values().collect();
    keep.sort_unstable();
    let picked = arrow::compute::take_record_batch(&all, &arrow::array::UInt32Array::from(keep))
        .map_err(err)?;
    Ok(vec![picked])
}

/// The file beside the table holding commit `epoch`'s rows until they are published.
fn out_file(epoch: i64) -> String {
    format!("{epoch}.out.arrow")
}

fn to_ipc(rows: &[arrow::record_batch::RecordBatch]) -> Result<Vec<u8>, Error> {
    let err = |e: arrow::error::ArrowError| Error::internal(format!("rows to publish: {e}"));
    let mut out = Vec::new();
    if let Some(first) = rows.first() {
        let mut w =
            arrow::ipc::writer::StreamWriter::try_new(&mut out, first.schema_ref()).map_err(err)?;
        for b in rows {
            w.write(b).map_err(err)?;
        }
        w.finish().map_err(err)?;
    }
    Ok(out)
}

fn from_ipc(bytes: &[u8]) -> Result<Vec<arrow::record_batch::RecordBatch>, Error> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let err = |e: arrow::error::ArrowError| Error::internal(format!("rows to publish: {e}"));
    arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
        .map_err(err)?
        .map(|b| b.map_err(err))
        .collect()
}

/// Publishes what the table committed but the topic does not have yet: the last commit's
/// rows, kept beside the table until published. A sink added to a stream that already
/// committed starts after its current commit.
async fn catch_up(
    lake: &Lake,
    stream: &Stream,
    publisher: &kafka_sink::Publisher,
    epoch: i64,
) -> Result<(), Error> {
    let table = &stream.config.sink.table;
    let app = epoch_app(&stream.name);
    let published = tokio::task::block_in_place(|| publisher.published())?;
    match published {
        None if epoch == 0 => Ok(()),
        None => {
            tracing::info!(stream = %stream.name, epoch, "the Kafka sink starts after commit {epoch}");
            tokio::task::block_in_place(|| publisher.publish(epoch, &[]))?;
            Ok(())
        }
        Some(p) if p == epoch => Ok(()),
        Some(p) if p + 1 == epoch => {
            let bytes = lake
                .read_state_file(table, &app, &out_file(epoch))
                .await?
                .ok_or_else(|| {
                    Error::user(format!(
                        "stream `{}`: commit {epoch} of `{table}` is not published to Kafka and its rows are gone",
                        stream.name
                    ))
                })?;
            let rows = from_ipc(&bytes)?;
            let n = tokio::task::block_in_place(|| publisher.publish(epoch, &rows))?;
            tracing::info!(stream = %stream.name, epoch, records = n, "published the last commit");
            lake.delete_state_file(table, &app, &out_file(epoch)).await
        }
        Some(p) => Err(Error::user(format!(
            "stream `{}`: the Kafka sink has published commit {p}, but `{table}` is at commit {epoch}",
            stream.name
        ))
        .with_hint(format!(
            "the table was replaced or the sink's group was changed; reset the offsets of group `weir-{}-publish`",
            stream.name
        ))),
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Where a stream stands: per partition, the table's position against the broker's end.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamStatus {
    pub stream: String,
    pub topic: String,
    pub table: String,
    /// Commits so far (the stream's epoch).
    pub epoch: i64,
    pub rows: u64,
    /// When the table last changed.
    pub last_commit: Option<String>,
    pub partitions: Vec<PartitionStatus>,
    /// Records on the broker not yet in the table, over all partitions.
    pub lag: i64,
    /// With event time: the stream's watermark (the least of its partitions'): windows
    /// ending by then are emitted.
    pub watermark: Option<String>,
    /// Records per second in the last commit's interval, over all partitions.
    pub records_per_second: Option<f64>,
    /// A SQL stream's state (open windows, a join's kept rows) as of the last commit: the
    /// size of its checkpoint.
    pub state_bytes: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PartitionStatus {
    pub partition: i32,
    /// The next offset the stream reads (none: it has not committed from this partition).
    pub position: Option<i64>,
    /// The broker's earliest and next offsets.
    pub low_watermark: i64,
    pub high_watermark: i64,
    pub lag: i64,
    /// With event time: this partition's watermark (its newest on-time event time minus
    /// the allowed delay), as of the last commit.
    pub watermark: Option<String>,
    /// Records per second read from this partition in the last commit's interval.
    pub records_per_second: Option<f64>,
}

/// A stream's source error, with where its settings are.
fn kafka_error(stream: &Stream, what: &str, e: rdkafka::error::KafkaError) -> Error {
    source_error(stream, what, e, None)
}

/// A stream's source error with librdkafka's own reason, when it gave one; the hint
/// points at the settings the reason is about.
fn source_error(
    stream: &Stream,
    what: &str,
    e: rdkafka::error::KafkaError,
    cause: Option<String>,
) -> Error {
    let src = &stream.config.source;
    let file = stream.file.display();
    let message = match &cause {
        Some(c) => format!("stream `{}`: {what}: {e}: {c}", stream.name),
        None => format!("stream `{}`: {what}: {e}", stream.name),
    };
    let cause = cause.unwrap_or_default().to_lowercase();
    let hint = if cause.contains("ssl") || cause.contains("certificate") {
        format!("check the TLS settings in `source.options` (security.protocol, ssl.ca.location) in {file}")
    } else if cause.contains("sasl") || cause.contains("authentication") {
        format!("check the SASL settings in `source.options` (sasl.mechanism, sasl.username, sasl.password) in {file}")
    } else {
        format!("check `source.brokers` ({}) in {file}", src.brokers)
    };
    Error::external(message).with_hint(hint)
}

/// A consumer for the stream's topic (not yet assigned) and the topic's partitions.
fn connect(stream: &Stream) -> Result<(Consumer, Vec<i32>), Error> {
    let cfg = &stream.config;
    let src = &cfg.source;
    let group = src
        .group
        .clone()
        .unwrap_or_else(|| format!("weir-{}", stream.name));
    let config = kafka::consumer_config(src, &group, cfg.flush.bytes);
    // The topic's metadata, read by a client of its own: when the read fails, polling
    // that client delivers librdkafka's reason (a TLS handshake, an authentication).
    let probe: rdkafka::consumer::BaseConsumer<kafka::Recorder> = config
        .create_with_context(kafka::Recorder::default())
        .map_err(|e| kafka_error(stream, "creating the consumer", e))?;
    let metadata = tokio::task::block_in_place(|| {
        probe
            .fetch_metadata(Some(&src.topic), Duration::from_secs(10))
            .map_err(|e| {
                for _ in 0..5 {
                    let _ = probe.poll(Duration::from_millis(20));
                }
                let cause = probe.context().last_error();
                source_error(stream, "reading the topic's metadata", e, cause)
            })
    })?;
    let consumer: Consumer = config
        .create_with_context(kafka::Recorder::default())
        .map_err(|e| kafka_error(stream, "creating the consumer", e))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == src.topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(Error::user(format!(
            "stream `{}`: topic `{}` does not exist on {}",
            stream.name, src.topic, src.brokers
        ))
        .with_hint("create the topic, or fix `source.topic`"));
    }
    Ok((consumer, partitions))
}

/// The status of stream `name`: what the table holds and what the broker has.
pub async fn status(project: &Project, lake: &Lake, name: &str) -> Result<StreamStatus, Error> {
    let stream = find(project, name)?;
    let src = &stream.config.source;
    let table = &stream.config.sink.table;
    let file = src.kind == weir_config::StreamSourceKind::File;
    let (consumer, partitions) = match file {
        true => (None, vec![0]),
        false => {
            let (c, p) = connect(stream)?;
            (Some(c), p)
        }
    };
    let mut out = StreamStatus {
        stream: name.to_string(),
        topic: match file {
            true => src.path.clone().unwrap_or_default(),
            false => src.topic.clone(),
        },
        table: table.clone(),
        ..Default::default()
    };
    let mut rates: BTreeMap<i32, f64> = BTreeMap::new();
    let mut event_marks: BTreeMap<i32, i64> = BTreeMap::new();
    let exists = lake.exists(table).await;
    let t = match exists {
        true => Some(lake.open_existing(table).await?),
        false => None,
    };
    if let Some(t) = &t {
        out.epoch = lake.txn_version(t, &epoch_app(name)).await?.unwrap_or(0);
        let stats = lake.stats(table).await?;
        out.rows = stats.rows;
        // The newest commit only: a stream's table has many, and history reads them all.
        let info = lake.last_commit_info(table).await?;
        out.last_commit = info
            .get("timestamp")
            .and_then(|t| t.as_i64())
            .and_then(chrono::DateTime::from_timestamp_millis)
            .map(|d| d.to_rfc3339());
        let last = info.get("weir.stream");
        let elapsed = last
            .and_then(|l| l["elapsed_ms"].as_u64())
            .filter(|ms| *ms > 0);
        if let (Some(l), Some(ms)) = (last, elapsed) {
            let secs = ms as f64 / 1000.0;
            out.records_per_second = l["records"].as_u64().map(|n| n as f64 / secs);
            if let Some(per) = l["partition_records"].as_object() {
                for (p, n) in per {
                    if let (Ok(p), Some(n)) = (p.parse::<i32>(), n.as_u64()) {
                        rates.insert(p, n as f64 / secs);
                    }
                }
            }
        }
        let state = match stream.config.sql.is_some() && out.epoch > 0 {
            true => lake.read_state(table, &epoch_app(name), out.epoch).await?,
            false => None,
        };
        out.state_bytes = state.as_ref().map(|b| b.len() as u64);
        if let (Some(et), Some(bytes)) = (&stream.config.event_time, state) {
            let delay = et.allowed_delay.as_micros() as i64;
            event_marks = weir_engine::stream_sql::checkpoint_marks(&bytes)?
                .into_iter()
                .map(|(p, m)| (p, m - delay))
                .collect();
            out.watermark = event_marks
                .values()
                .min()
                .map(|w| weir_engine::stream_sql::show_time(*w));
        }
    }
    let topic = src.topic.clone();
    let marks = match &consumer {
        Some(consumer) => tokio::task::block_in_place(|| {
            partitions
                .iter()
                .map(|p| consumer.fetch_watermarks(&topic, *p, Duration::from_secs(10)))
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(|e| kafka_error(stream, "reading the topic's offsets", e))?,
        None => {
            // A file: its lines are its offsets.
            let path = project.root.join(src.path.as_deref().unwrap_or_default());
            let text = tokio::fs::read(&path)
                .await
                .map_err(|e| Error::io(format!("stream `{name}`: {}", path.display()), e))?;
            // Offsets count every line, as the run does.
            let lines = text.iter().filter(|b| **b == b'\n').count()
                + usize::from(text.last().is_some_and(|b| *b != b'\n'));
            vec![(0, lines as i64)]
        }
    };
    for (p, (low, high)) in partitions.into_iter().zip(marks) {
        let position = match &t {
            Some(t) => {
                lake.txn_version(t, &position_app(name, source_id(src), p))
                    .await?
            }
            None => None,
        };
        let lag = (high - position.unwrap_or(low)).max(0);
        out.lag += lag;
        out.partitions.push(PartitionStatus {
            partition: p,
            position,
            low_watermark: low,
            high_watermark: high,
            lag,
            watermark: event_marks
                .get(&p)
                .map(|w| weir_engine::stream_sql::show_time(*w)),
            records_per_second: rates
                .get(&p)
                .copied()
                .or(out.records_per_second.map(|_| 0.0)),
        });
    }
    Ok(out)
}
