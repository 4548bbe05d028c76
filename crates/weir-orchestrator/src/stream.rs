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
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use weir_common::Error;
use weir_config::{Project, Stream};
use weir_connectors::kafka::{self, Record};
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
    // The topic's partitions, and where each resumes: the table's position, else `start`.
    let (consumer, partitions) = connect(stream)?;
    let mut positions: BTreeMap<i32, i64> = BTreeMap::new();
    let mut epoch = 0i64;
    if lake.exists(&table).await {
        let t = lake.open_existing(&table).await?;
        epoch = lake.txn_version(&t, &epoch_app(name)).await?.unwrap_or(0);
        for p in &partitions {
            if let Some(next) = lake
                .txn_version(&t, &position_app(name, &src.topic, *p))
                .await?
            {
                positions.insert(*p, next);
            }
        }
    }
    let mut assignment = TopicPartitionList::new();
    for p in &partitions {
        let offset = match positions.get(p) {
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
    tracing::info!(stream = name, table = %table, ?positions, epoch, "stream started");

    let mut summary = StreamSummary {
        stream: name.to_string(),
        table: table.clone(),
        positions: positions.clone(),
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
    let mut expect: BTreeMap<i32, i64> = positions.clone();
    // Maintenance runs after a commit at most once a minute, and at the end of a run.
    let mut maintained: Option<Instant> = None;
    let mut unmaintained = false;
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
            epoch += 1;
            flush(lake, stream, &buffer, epoch, &mut positions, &mut summary).await?;
            let mut done = TopicPartitionList::new();
            for (p, next) in &positions {
                let _ = done.add_partition_offset(&src.topic, *p, Offset::Offset(*next));
            }
            if let Err(e) = consumer.commit(&done, CommitMode::Async) {
                tracing::warn!(stream = name, "committing the group's offsets: {e}");
            }
            buffer.clear();
            buffered_bytes = 0;
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
    summary.positions = positions;
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

/// Commits `records` (epoch `epoch`) to the stream's table with the partitions' next
/// offsets; the quarantined ones first, to the quarantine table.
async fn flush(
    lake: &Lake,
    stream: &Stream,
    records: &[Record],
    epoch: i64,
    positions: &mut BTreeMap<i32, i64>,
    summary: &mut StreamSummary,
) -> Result<(), Error> {
    let cfg = &stream.config;
    let table = &cfg.sink.table;
    let known = lake.schema(table).await?;
    let decoded = kafka::decode(
        records,
        cfg.source.format,
        &cfg.source.topic,
        known.as_ref(),
    )?;
    if let (Some(first), weir_config::OnIncompatible::Stop) =
        (decoded.misfits.first(), cfg.sink.on_incompatible)
    {
        return Err(Error::user(format!(
            "stream `{}`: the record at {} offset {} does not fit table `{table}`: {}; \
             nothing of this batch was committed ({} such records in it)",
            stream.name,
            first.source,
            first.line,
            first.reason,
            decoded.misfits.len()
        ))
        .with_hint(format!(
            "fix the producer, or set `sink.on_incompatible: quarantine` in {} to set such \
             records aside; the stream resumes at the same records",
            stream.file.display()
        )));
    }
    let batch = decoded.batch;
    let mut bad = decoded.malformed;
    bad.extend(decoded.misfits);
    let mut next = positions.clone();
    for r in records {
        let e = next.entry(r.partition).or_insert(r.offset + 1);
        *e = (*e).max(r.offset + 1);
    }
    let metadata: std::collections::HashMap<String, serde_json::Value> = [(
        "weir.stream".to_string(),
        serde_json::json!({"stream": stream.name, "epoch": epoch, "records": records.len()}),
    )]
    .into_iter()
    .collect();
    if !bad.is_empty() {
        let qtable = format!("{table}__quarantine");
        let target = crate::quarantine::Target {
            lake,
            table: &qtable,
            pipeline: &stream.name,
            run_id: "stream",
            load: epoch,
            partition: None,
            metadata: &metadata,
        };
        crate::quarantine::write(&target, crate::quarantine::Scope::Read, &bad).await?;
    }
    let rows = batch.num_rows();
    let ctx = weir_lake::new_session();
    let df = ctx
        .read_batch(batch)
        .map_err(|e| Error::internal(format!("buffering records: {e}")))?;
    let spec = WriteSpec {
        partition_by: cfg.sink.partition_by.clone(),
        evolution: cfg.sink.schema_evolution,
        ..Default::default()
    };
    let write = WriteOptions {
        txn: Some((epoch_app(&stream.name), epoch)),
        positions: next
            .iter()
            .map(|(p, n)| (position_app(&stream.name, &cfg.source.topic, *p), *n))
            .collect(),
        metadata,
    };
    let m = lake.write(table, &ctx, df, &spec, &write).await?;
    tracing::info!(
        stream = %stream.name,
        epoch,
        rows,
        quarantined = bad.len(),
        version = m.version,
        "committed"
    );
    *positions = next;
    summary.records += records.len() as u64;
    summary.rows += rows as u64;
    summary.quarantined += bad.len() as u64;
    summary.commits += 1;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
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
}

/// A stream's source error, with where its settings are.
fn kafka_error(stream: &Stream, what: &str, e: rdkafka::error::KafkaError) -> Error {
    let src = &stream.config.source;
    Error::external(format!("stream `{}`: {what}: {e}", stream.name)).with_hint(format!(
        "check `source.brokers` ({}) in {}",
        src.brokers,
        stream.file.display()
    ))
}

/// A consumer for the stream's topic (not yet assigned) and the topic's partitions.
fn connect(stream: &Stream) -> Result<(StreamConsumer, Vec<i32>), Error> {
    let cfg = &stream.config;
    let src = &cfg.source;
    let group = src
        .group
        .clone()
        .unwrap_or_else(|| format!("weir-{}", stream.name));
    let consumer: StreamConsumer = kafka::consumer_config(src, &group, cfg.flush.bytes)
        .create()
        .map_err(|e| kafka_error(stream, "creating the consumer", e))?;
    let metadata = tokio::task::block_in_place(|| {
        consumer.fetch_metadata(Some(&src.topic), Duration::from_secs(10))
    })
    .map_err(|e| kafka_error(stream, "reading the topic's metadata", e))?;
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
    let (consumer, partitions) = connect(stream)?;
    let mut out = StreamStatus {
        stream: name.to_string(),
        topic: src.topic.clone(),
        table: table.clone(),
        ..Default::default()
    };
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
        out.last_commit = lake
            .last_commit_time(table)
            .await?
            .and_then(chrono::DateTime::from_timestamp_millis)
            .map(|d| d.to_rfc3339());
    }
    let topic = src.topic.clone();
    let marks = tokio::task::block_in_place(|| {
        partitions
            .iter()
            .map(|p| consumer.fetch_watermarks(&topic, *p, Duration::from_secs(10)))
            .collect::<Result<Vec<_>, _>>()
    })
    .map_err(|e| kafka_error(stream, "reading the topic's offsets", e))?;
    for (p, (low, high)) in partitions.into_iter().zip(marks) {
        let position = match &t {
            Some(t) => {
                lake.txn_version(t, &position_app(name, &src.topic, p))
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
        });
    }
    Ok(out)
}
