//! Streams: a Kafka topic (on the test broker) landed in a lake table exactly once, also
//! when `weir stream run` is SIGKILLed again and again while it runs.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;

use crate::{ok, query, scalar, weir};

/// Client settings for the test broker at `broker`.
fn client(broker: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", broker);
    c
}

fn topic(broker: &str, name: &str, partitions: i32) {
    topic_on(client(broker), name, partitions)
}

fn topic_on(client: ClientConfig, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = client.create().unwrap();
    let results = futures::executor::block_on(admin.create_topics(
        &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
    ))
    .unwrap();
    for r in results {
        r.unwrap();
    }
}

/// Sends `values` (keyed by their index), waiting until the broker has them all.
///
/// One record per batch: the test broker (tansu 0.6.0) answers a fetch that starts inside
/// a batch with the batches *after* it (its fetch keeps batches whose base offset is at
/// or past the requested one), so a consumer resuming mid-batch never sees the rest of
/// that batch. Found by the SIGKILL test; Kafka itself returns the containing batch.
fn produce(broker: &str, topic: &str, values: &[String]) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", broker)
        .set("linger.ms", "0")
        .set("batch.num.messages", "1")
        .create()
        .unwrap();
    for (i, v) in values.iter().enumerate() {
        let key = i.to_string();
        let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
            key: "n",
            value: Some(&key),
        });
        send(&producer, || {
            BaseRecord::to(topic)
                .key(&key)
                .payload(v)
                .headers(headers.clone())
        });
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// Sends the record `make` builds, waiting while the producer's queue is full.
fn send<'a, K, P>(producer: &BaseProducer, make: impl Fn() -> BaseRecord<'a, K, P>)
where
    K: rdkafka::message::ToBytes + ?Sized + 'a,
    P: rdkafka::message::ToBytes + ?Sized + 'a,
{
    loop {
        match producer.send(make()) {
            Ok(()) => break,
            Err((e, _)) => {
                assert!(
                    matches!(
                        e,
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull
                        )
                    ),
                    "{e}"
                );
                producer.poll(Duration::from_millis(50));
            }
        }
    }
    producer.poll(Duration::ZERO);
}

fn project(dir: &Path, broker: &str, topic: &str) {
    project_with(dir, broker, topic, "");
}

/// A project with stream `events` from `topic` into `raw.events`; `sink` adds sink keys.
fn project_with(dir: &Path, broker: &str, topic: &str, sink: &str) {
    crate::write(
        dir,
        "weir.yaml",
        "name: streams\nmaintenance:\n  - tables: [raw.events]\n    optimize: {min_small_files: 3}\n",
    );
    crate::write(
        dir,
        "streams/events.yaml",
        &format!(
            "source:\n  type: kafka\n  brokers: {broker}\n  topic: {topic}\n  format: json\n\
             sink:\n  table: raw.events\n{sink}flush:\n  rows: 700\n  interval: 300ms\n"
        ),
    );
}

/// `weir ARGS --format json`, which must succeed, parsed.
fn weir_json(project: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["--format", "json"]);
    serde_json::from_str(ok(&weir(project, &all)).trim()).unwrap()
}

/// Starts `weir stream run NAME ARGS` in the background, quietly, with this thread's lake
/// settings.
fn spawn_stream(project: &Path, name: &str, args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .envs(crate::ENV.with(|e| e.borrow().clone()))
        .arg("--project")
        .arg(project)
        .args(["stream", "run", name])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Starts `weir stream run NAME`, calls `meanwhile` (records arrive while it runs), lets it
/// run 0.3-1.5 s more and SIGKILLs it.
fn run_and_kill(project: &Path, name: &str, rng: &mut Lcg, meanwhile: impl FnOnce()) {
    let mut child = spawn_stream(project, name, &[]);
    meanwhile();
    std::thread::sleep(Duration::from_millis(300 + rng.next(1_200)));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

/// A small deterministic generator (the seed is printed, to replay a failure).
pub(crate) struct Lcg(pub(crate) u64);
impl Lcg {
    pub(crate) fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

#[test]
fn records_land_once_with_bad_ones_quarantined_and_a_rerun_adds_nothing() {
    let broker = weir_test::KafkaBroker::shared().bootstrap();
    let name = format!("plain-{}", uuid::Uuid::new_v4().simple());
    topic(&broker, &name, 3);
    let mut values: Vec<String> = (0..2_000)
        .map(|i| format!(r#"{{"id": {i}, "kind": "k{}", "amount": {}.5}}"#, i % 5, i))
        .collect();
    values.push("not json".into());
    values.push(r#"{"id": "not a number"}"#.into());
    produce(&broker, &name, &values);
    let dir = tempfile::tempdir().unwrap();
    project_with(
        dir.path(),
        &broker,
        &name,
        "  on_incompatible: quarantine\n",
    );
    let status = |dir: &Path| -> serde_json::Value {
        let out = ok(&weir(
            dir,
            &["stream", "status", "events", "--format", "json"],
        ));
        serde_json::from_str(out.trim()).unwrap()
    };
    let before = status(dir.path());
    assert_eq!(before["lag"], 2_002, "{before}");
    assert_eq!(before["epoch"], 0, "{before}");
    assert!(before["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["position"].is_null()));

    let run = |dir: &Path| -> serde_json::Value {
        let args = [
            "stream",
            "run",
            "events",
            "--until-idle",
            "2s",
            "--format",
            "json",
        ];
        serde_json::from_str(ok(&weir(dir, &args)).trim()).unwrap()
    };
    let summary = run(dir.path());
    assert_eq!(summary["records"], 2_002, "{summary}");
    assert_eq!(summary["rows"], 2_000, "{summary}");
    assert_eq!(summary["quarantined"], 2, "{summary}");
    assert_eq!(summary["skipped_offsets"], 0, "{summary}");
    // The many small files of its commits were compacted by the table's policy.
    assert!(summary["commits"].as_u64().unwrap() >= 3, "{summary}");
    assert!(
        summary["files_compacted"].as_u64().unwrap() >= 3,
        "{summary}"
    );
    assert_eq!(scalar(dir.path(), "select count(*) from raw.events"), 2_000);
    assert_eq!(
        scalar(dir.path(), "select count(distinct id) from raw.events"),
        2_000
    );
    assert_eq!(
        scalar(dir.path(), "select sum(amount) from raw.events"),
        2_000_000.0
    );
    let bad = query(
        dir.path(),
        "select reason, raw from raw.events__quarantine order by raw",
    );
    // The record's key and headers are columns.
    assert_eq!(
        scalar(
            dir.path(),
            "select count(*) from raw.events \
             where _kafka_key = cast(id as varchar) and map_extract(_kafka_headers, 'n')[1] = _kafka_key"
        ),
        2_000
    );
    assert_eq!(bad.len(), 2, "{bad:?}");
    assert_eq!(bad[0]["raw"], "not json");
    assert_eq!(bad[1]["raw"], r#"{"id": "not a number"}"#);
    let after = status(dir.path());
    assert_eq!(after["lag"], 0, "{after}");
    assert_eq!(after["rows"], 2_000, "{after}");
    assert!(
        after["last_commit"]
            .as_str()
            .is_some_and(|t| t.starts_with("20")),
        "{after}"
    );
    assert!(before["last_commit"].is_null(), "{before}");
    let positions: i64 = after["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["position"].as_i64().unwrap())
        .sum();
    assert_eq!(positions, 2_002, "{after}");
    // Every partition's next offset is in the table: a second run reads nothing again.
    let again = run(dir.path());
    assert_eq!(again["records"], 0, "{again}");
    assert_eq!(scalar(dir.path(), "select count(*) from raw.events"), 2_000);

    let out = weir(dir.path(), &["stream", "run", "event"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown stream `event`") && err.contains("did you mean `events`?"),
        "{err}"
    );
}

#[test]
fn a_record_that_does_not_fit_stops_the_stream_and_loses_nothing() {
    let broker = weir_test::KafkaBroker::shared().bootstrap();
    let name = format!("misfit-{}", uuid::Uuid::new_v4().simple());
    topic(&broker, &name, 1);
    let mut values: Vec<String> = (0..1_000).map(|i| format!(r#"{{"id": {i}}}"#)).collect();
    values.push(r#"{"id": "one thousand"}"#.into());
    values.extend((1_001..1_500).map(|i| format!(r#"{{"id": {i}, "note": "new field"}}"#)));
    produce(&broker, &name, &values);
    let dir = tempfile::tempdir().unwrap();
    project(dir.path(), &broker, &name);

    let out = weir(
        dir.path(),
        &["stream", "run", "events", "--until-idle", "3s"],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "the record at kafka://{name}/0 offset 1000 does not fit table `raw.events`"
        )),
        "{err}"
    );
    assert!(err.contains("on_incompatible: quarantine"), "{err}");
    // The batches before it are committed (700 records); the one holding it is not.
    assert_eq!(scalar(dir.path(), "select count(*) from raw.events"), 700);

    project_with(
        dir.path(),
        &broker,
        &name,
        "  on_incompatible: quarantine\n",
    );
    ok(&weir(
        dir.path(),
        &["stream", "run", "events", "--until-idle", "3s"],
    ));
    assert_eq!(scalar(dir.path(), "select count(*) from raw.events"), 1_499);
    assert_eq!(
        scalar(dir.path(), "select count(distinct id) from raw.events"),
        1_499
    );
    // The new field became a column: null before it appeared.
    assert_eq!(
        scalar(dir.path(), "select count(note) from raw.events"),
        499
    );
    let bad = query(dir.path(), "select raw from raw.events__quarantine");
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(bad[0]["raw"], r#"{"id": "one thousand"}"#);
}

#[test]
fn a_batch_of_bad_records_only_is_quarantined_and_not_read_again() {
    let broker = weir_test::KafkaBroker::shared().bootstrap();
    let name = format!("allbad-{}", uuid::Uuid::new_v4().simple());
    topic(&broker, &name, 1);
    let values: Vec<String> = (0..5).map(|i| format!("not json {i}")).collect();
    produce(&broker, &name, &values);
    let dir = tempfile::tempdir().unwrap();
    project(dir.path(), &broker, &name);
    let args = [
        "stream",
        "run",
        "events",
        "--until-idle",
        "2s",
        "--format",
        "json",
    ];
    let first: serde_json::Value =
        serde_json::from_str(ok(&weir(dir.path(), &args)).trim()).unwrap();
    assert_eq!(first["quarantined"], 5, "{first}");
    assert_eq!(first["rows"], 0, "{first}");
    assert_eq!(first["positions"]["0"], 5, "{first}");
    assert_eq!(
        scalar(dir.path(), "select count(*) from raw.events__quarantine"),
        5
    );
    let again: serde_json::Value =
        serde_json::from_str(ok(&weir(dir.path(), &args)).trim()).unwrap();
    assert_eq!(again["records"], 0, "{again}");
    assert_eq!(
        scalar(dir.path(), "select count(*) from raw.events__quarantine"),
        5
    );
}

#[test]
fn sigkill_at_random_points_loses_and_doubles_nothing() {
    let broker = weir_test::KafkaBroker::shared().bootstrap();
    let name = format!("kill-{}", uuid::Uuid::new_v4().simple());
    topic(&broker, &name, 3);
    const N: usize = 30_000;
    let values: Vec<String> = (0..N)
        .map(|i| format!(r#"{{"id": {i}, "payload": "event number {i}"}}"#))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    project(dir.path(), &broker, &name);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("seed {seed}");
    let mut rng = Lcg(seed);
    // Records arrive while weir runs and is killed: a third before, the rest between kills.
    produce(&broker, &name, &values[..N / 3]);
    let started = Instant::now();
    let mut kills = 0;
    let mut sent = N / 3;
    let mut landed = Vec::new();
    while kills < 8 && started.elapsed() < Duration::from_secs(120) {
        run_and_kill(dir.path(), "events", &mut rng, || {
            if sent < N {
                let upto = (sent + N / 12).min(N);
                produce(&broker, &name, &values[sent..upto]);
                sent = upto;
            }
        });
        kills += 1;
        if dir.path().join("lake/raw/events/_delta_log").exists() {
            landed.push(scalar(dir.path(), "select count(*) from raw.events"));
        }
    }
    produce(&broker, &name, &values[sent..]);
    eprintln!("rows after each kill: {landed:?}");
    ok(&weir(
        dir.path(),
        &["stream", "run", "events", "--until-idle", "3s"],
    ));
    assert!(kills >= 5, "only {kills} kills");
    assert_eq!(
        scalar(dir.path(), "select count(*) from raw.events"),
        N as u64,
        "seed {seed}"
    );
    assert_eq!(
        scalar(dir.path(), "select count(distinct id) from raw.events"),
        N as u64,
        "seed {seed}"
    );
    assert_eq!(
        scalar(dir.path(), "select min(id) + max(id) from raw.events"),
        (N - 1) as u64
    );
}

/// The highest resident memory of process `pid` seen while it runs (from /proc).
fn peak_rss_while_running(child: &mut std::process::Child) -> u64 {
    let path = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    loop {
        if let Ok(text) = std::fs::read_to_string(&path) {
            for line in text.lines() {
                if let Some(kb) = line.strip_prefix("VmHWM:") {
                    let kb: u64 = kb.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                    peak = peak.max(kb * 1024);
                }
            }
        }
        if child.try_wait().unwrap().is_some() {
            return peak;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The memory records can occupy stays far below the backlog: 231 MB of records read with
/// a 4 MiB buffer peak at 72-84 MB of anonymous resident memory (185-196 MB for the whole
/// debug process, its code included). With mimalloc's defaults the peak grew with every
/// commit (370 MB here, 886 MB in a release run with 2 MB commits); `weir stream run` runs
/// with settings that return freed memory within 10 ms (weir-cli's main.rs).
#[test]
fn a_backlog_far_larger_than_the_buffer_is_read_in_bounded_memory() {
    let broker = weir_test::KafkaBroker::shared().bootstrap();
    let name = format!("backlog-{}", uuid::Uuid::new_v4().simple());
    topic(&broker, &name, 2);
    // 240 MB of records waiting, against a 4 MiB buffer.
    const N: usize = 120_000;
    let filler = "x".repeat(2_000);
    let values: Vec<String> = (0..N)
        .map(|i| format!(r#"{{"id": {i}, "text": "{filler}"}}"#))
        .collect();
    produce_batched(&broker, &name, &values);
    let dir = tempfile::tempdir().unwrap();
    buffered_project(dir.path(), "name: backlog\n", &broker, &name);
    let mut child = spawn_stream(dir.path(), "events", &["--until-idle", "3s"]);
    let watch = AnonWatch::start(child.id());
    let peak = peak_rss_while_running(&mut child);
    let anon = watch.take();
    assert!(child.wait().unwrap().success());
    assert_eq!(
        scalar(dir.path(), "select count(*) from raw.events"),
        N as u64
    );
    let backlog: u64 = values.iter().map(|v| v.len() as u64).sum();
    eprintln!(
        "backlog {} MB, peak RSS {} MB, anonymous {anon} MB",
        backlog >> 20,
        peak >> 20
    );
    assert!(
        anon < 128,
        "anonymous memory peaked at {anon} MB for a 4 MiB buffer and a {} MB backlog",
        backlog >> 20
    );
}

/// Backpressure: the sink is slow on purpose. The lake is on an object store behind a link
/// held to 1 MiB/s while records arrive far faster. The stream reads only as fast as it
/// commits, so the backlog grows on the broker, not in weir: with a 4 MiB buffer
/// (`flush.bytes`, which also sizes librdkafka's prefetch) its anonymous resident memory
/// stays under 64 MB while more than that waits. Freed, the link lets the stream catch up,
/// and every record lands exactly once.
#[test]
fn a_slow_sink_slows_reading_and_memory_stays_bounded_while_the_backlog_grows() {
    let broker = weir_test::KafkaBroker::shared().bootstrap();
    let name = format!("slow-sink-{}", uuid::Uuid::new_v4().simple());
    topic(&broker, &name, 2);
    // A server of its own: it answers one request at a time, and the slow link holds each.
    let s3 = weir_test::S3Server::start().unwrap();
    let link = weir_test::SlowLink::start(s3.port()).unwrap();
    link.set_rate(1 << 20);
    let env: Vec<(&str, String)> = s3
        .options()
        .into_iter()
        .map(|(k, v)| match k {
            "AWS_ENDPOINT_URL" => (k, format!("http://127.0.0.1:{}", link.port())),
            _ => (k, v),
        })
        .collect();
    crate::ENV.with(|e| *e.borrow_mut() = env);
    let dir = tempfile::tempdir().unwrap();
    let lake = format!("s3://{}/slow-sink/lake", weir_test::S3Server::BUCKET);
    buffered_project(
        dir.path(),
        &format!("name: slow\nlake: {lake}\n"),
        &broker,
        &name,
    );
    // 96 MB of records that do not compress (the link carries Parquet files).
    const N: usize = 48_000;
    let mut rng = Lcg(0x5eed);
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let values: Vec<String> = (0..N)
        .map(|i| {
            let text: String = (0..2_000)
                .map(|_| ALPHABET[rng.next(64) as usize] as char)
                .collect();
            format!(r#"{{"id": {i}, "text": "{text}"}}"#)
        })
        .collect();
    let mut child = spawn_stream(dir.path(), "events", &["--until-idle", "5s"]);
    // Records keep arriving while the sink crawls: after each 16 MB, the stream's lag (from
    // `weir stream status`) and the most anonymous memory it held since the last look.
    let mut lags = Vec::new();
    let mut peaks = Vec::new();
    let watch = AnonWatch::start(child.id());
    for chunk in values.chunks(N / 6) {
        produce_batched(&broker, &name, chunk);
        std::thread::sleep(Duration::from_secs(1));
        let status = weir_json(dir.path(), &["stream", "status", "events"]);
        lags.push(status["lag"].as_i64().unwrap());
        peaks.push(watch.take());
    }
    let landed = scalar(dir.path(), "select count(*) from raw.events")
        .as_u64()
        .unwrap_or(0);
    // The link is freed: the stream catches up and stops once idle.
    link.set_rate(0);
    let peak = peak_rss_while_running(&mut child) >> 20;
    assert!(child.wait().unwrap().success());
    let backlog: u64 = values.iter().map(|v| v.len() as u64).sum();
    eprintln!(
        "backlog {} MB; while slow: lags {lags:?}, anonymous memory (MB) {peaks:?}, {landed} \
         of {N} landed; peak RSS {peak} MB in all",
        backlog >> 20,
    );
    // The sink held reading back: the backlog grew with every batch of records, and most
    // were still on the broker when the last arrived.
    assert!(lags.windows(2).all(|w| w[1] > w[0]), "{lags:?}");
    assert!(
        landed < N as u64 / 2,
        "{landed} of {N} landed through a 1 MiB/s link"
    );
    // Memory did not hold it: anonymous memory (records, buffers, the allocator's pools)
    // stayed under 64 MB in every interval while more than 48 MB of records waited on the
    // broker; had they been read ahead into memory, the working set (about 30-40 MB
    // measured) would have been on top of them. It was 27-40 MB (37-47 MB with the 10 ms
    // purge delay) in runs whose backlog grew to 64 MB; the whole process (code pages
    // included) peaked at 158-164 MB.
    let record = backlog / N as u64;
    let waiting = (*lags.last().unwrap() as u64 * record) >> 20;
    assert!(waiting > 48, "{waiting} MB waiting at the end: {lags:?}");
    assert!(
        peaks.iter().all(|mb| *mb < 64),
        "anonymous memory (MB) {peaks:?} with {waiting} MB waiting"
    );
    // Nor did it track the backlog: from the second interval on it grew by less than half
    // of what the backlog grew.
    let grown = ((lags.last().unwrap() - lags[1]) as u64 * record) >> 20;
    let growth = peaks.last().unwrap().saturating_sub(peaks[1]);
    assert!(
        growth * 2 < grown,
        "anonymous memory (MB) {peaks:?}, backlog +{grown} MB"
    );
    assert!(peak < 200, "peak RSS {peak} MB for a 4 MiB buffer");
    // Then every record, once.
    assert_eq!(
        scalar(dir.path(), "select count(*) from raw.events"),
        N as u64
    );
    assert_eq!(
        scalar(dir.path(), "select count(distinct id) from raw.events"),
        N as u64
    );
}

/// A project (`weir_yaml`) whose stream `events` lands `topic` in `raw.events` with a 4 MiB
/// buffer (`flush.bytes`), committing at least every second.
fn buffered_project(dir: &Path, weir_yaml: &str, broker: &str, topic: &str) {
    crate::write(dir, "weir.yaml", weir_yaml);
    crate::write(
        dir,
        "streams/events.yaml",
        &format!(
            "source:\n  type: kafka\n  brokers: {broker}\n  topic: {topic}\n\
             sink:\n  table: raw.events\nflush:\n  bytes: 4MiB\n  interval: 1s\n"
        ),
    );
}

/// Watches a process's anonymous resident memory (what records and buffers occupy; the
/// binary's code pages are not in it) every 10 ms, from a thread of its own.
struct AnonWatch {
    most: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl AnonWatch {
    fn start(pid: u32) -> AnonWatch {
        use std::sync::atomic::Ordering;
        let watch = AnonWatch {
            most: Default::default(),
            stop: Default::default(),
        };
        let (most, stop) = (watch.most.clone(), watch.stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let text = std::fs::read_to_string(format!("/proc/{pid}/status"));
                let anon = text.ok().and_then(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("RssAnon:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                });
                most.fetch_max(anon.unwrap_or(0) * 1024, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        watch
    }

    /// The most seen since the last call, in MB.
    fn take(&self) -> u64 {
        self.most.swap(0, std::sync::atomic::Ordering::SeqCst) >> 20
    }
}

impl Drop for AnonWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Sends `values` in large batches (fast; for tests that do not resume mid-batch).
fn produce_batched(broker: &str, topic: &str, values: &[String]) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", broker)
        .set("linger.ms", "20")
        .create()
        .unwrap();
    for (i, v) in values.iter().enumerate() {
        let key = i.to_string();
        while let Err((e, _)) = producer.send(BaseRecord::to(topic).key(&key).payload(v)) {
            assert!(e.to_string().contains("Queue full"), "{e}");
            producer.poll(Duration::from_millis(50));
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(60)).unwrap();
}

/// Sends `(partition, value)` records, each to its partition, one record per batch (see
/// `produce`).
fn produce_to(broker: &str, topic: &str, records: &[(i32, String)]) {
    produce_on(client(broker), topic, records)
}

fn produce_on(mut client: ClientConfig, topic: &str, records: &[(i32, String)]) {
    let producer: BaseProducer = client
        .set("linger.ms", "0")
        .set("batch.num.messages", "1")
        .create()
        .unwrap();
    for (p, v) in records {
        send(&producer, || {
            BaseRecord::<(), _>::to(topic).partition(*p).payload(v)
        });
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

const CLICK_COLUMNS: &str = "  columns:\n    - {name: id, type: bigint, nullable: false}\n    - {name: user_name, type: string}\n    - {name: amount, type: bigint}\n    - {name: ts, type: bigint}\n";

/// A project whose stream `clicks` runs `sql` over topic `topic` (as `clicks`) into
/// `agg.clicks`, with event time `ts` (epoch ms) and a 3 s allowed delay.
fn sql_project(dir: &Path, broker: &str, topic: &str, sql: &str, sink: &str) {
    crate::write(dir, "weir.yaml", "name: streams\n");
    crate::write(
        dir,
        "streams/clicks.yaml",
        &format!(
            "source:\n  type: kafka\n  brokers: {broker}\n  topic: {topic}\n  name: clicks\n{CLICK_COLUMNS}\
             event_time:\n  column: ts\n  allowed_delay: 3s\n\
             sql: |\n  {}\n\
             sink:\n  table: agg.clicks\n  on_incompatible: quarantine\n{sink}flush:\n  rows: 300\n  interval: 300ms\n",
            sql.replace('\n', "\n  ")
        ),
    );
}

/// Click events over 3 partitions: each partition's clock moves 0-400 ms a record, records
/// are up to 2.5 s out of order, and 1 in 40 is 5-30 s late.
fn clicks(rng: &mut Lcg, n: usize) -> Vec<(i32, i64, String, i64, i64)> {
    let users = ["ann", "bob", "cy", "dee"];
    let mut clocks = [1_700_000_000_000i64; 3];
    (0..n as i64)
        .map(|id| {
            let p = if id < 3 {
                id as usize
            } else {
                rng.next(3) as usize
            };
            clocks[p] += rng.next(400) as i64;
            let ts = match rng.next(40) {
                0 => clocks[p] - 5_000 - rng.next(25_000) as i64,
                _ => clocks[p] - rng.next(2_500) as i64,
            };
            let user = users[rng.next(4) as usize].to_string();
            (p as i32, id, user, rng.next(100) as i64, ts)
        })
        .collect()
}

fn click_json(c: &(i32, i64, String, i64, i64)) -> (i32, String) {
    (
        c.0,
        format!(
            r#"{{"id": {}, "user_name": "{}", "amount": {}, "ts": {}}}"#,
            c.1, c.2, c.3, c.4
        ),
    )
}

/// The reference: which clicks are late (before their partition's newest on-time time
/// minus 3 s), and per (10 s window start in µs, user) the count and sum of the others,
/// for the windows the final watermark has passed.
#[allow(clippy::type_complexity)]
fn expected_windows(
    clicks: &[(i32, i64, String, i64, i64)],
) -> (
    std::collections::BTreeSet<i64>,
    std::collections::BTreeMap<(i64, String), (u64, i64)>,
) {
    let mut marks = std::collections::BTreeMap::new();
    let mut late = std::collections::BTreeSet::new();
    let mut sums = std::collections::BTreeMap::new();
    for (p, id, user, amount, ts) in clicks {
        match marks.get(p) {
            Some(m) if *ts < m - 3_000 => {
                late.insert(*id);
                continue;
            }
            _ => {}
        }
        let m = marks.entry(*p).or_insert(*ts);
        *m = (*m).max(*ts);
        let start = ts.div_euclid(10_000) * 10_000;
        let e = sums.entry((start, user.clone())).or_insert((0u64, 0i64));
        e.0 += 1;
        e.1 += amount;
    }
    let wm = marks.values().min().unwrap() - 3_000;
    sums.retain(|(start, _), _| start + 10_000 <= wm);
    let sums = sums
        .into_iter()
        .map(|((s, u), v)| ((s * 1000, u), v))
        .collect();
    (late, sums)
}

/// A seed (printed, to replay a failure), the generator after `n` clicks made from it,
/// the clicks, and a last click per partition an hour after the newest (with `amount`),
/// which moves the watermark past every other one; and that hour-later time.
#[allow(clippy::type_complexity)]
fn clicks_closed_an_hour_later(
    n: usize,
    amount: i64,
) -> (u64, Lcg, Vec<(i32, i64, String, i64, i64)>, i64) {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("seed {seed}");
    let mut rng = Lcg(seed);
    let mut events = clicks(&mut rng, n);
    let end = events.iter().map(|e| e.4).max().unwrap() + 3_600_000;
    for p in 0..3 {
        events.push((p, (n as i64) + p as i64, "zz".into(), amount, end));
    }
    (seed, rng, events, end)
}

/// A project whose stream `clicks` runs `sql` (with `sink` lines) over `events` in
/// `(broker, topic)`. Produces the first `first` events, then runs the stream and
/// SIGKILLs it (at most `kills` times, within `limit`; at least `least` times), producing
/// `step` more events during each run; then the rest, and a last run until the stream is
/// idle. Returns the project's directory.
#[allow(clippy::type_complexity)]
fn run_through_sigkills(
    (broker, topic): (&str, &str),
    (sql, sink): (&str, &str),
    events: &[(i32, i64, String, i64, i64)],
    (first, step): (usize, usize),
    (least, kills, limit): (usize, usize, Duration),
    rng: &mut Lcg,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path();
    sql_project(project, broker, topic, sql, sink);
    let records: Vec<(i32, String)> = events.iter().map(click_json).collect();
    produce_to(broker, topic, &records[..first]);
    let mut sent = first;
    let started = Instant::now();
    let mut done = 0;
    while done < kills && started.elapsed() < limit {
        run_and_kill(project, "clicks", rng, || {
            if sent < records.len() {
                let upto = (sent + step).min(records.len());
                produce_to(broker, topic, &records[sent..upto]);
                sent = upto;
            }
        });
        done += 1;
    }
    produce_to(broker, topic, &records[sent..]);
    let out = weir_json(project, &["stream", "run", "clicks", "--until-idle", "3s"]);
    eprintln!("{out}");
    assert!(done >= least, "only {done} kills");
    dir
}

/// The shared broker's address and a new topic of 3 partitions named `prefix-<uuid>`.
fn new_topic(prefix: &str) -> (String, String) {
    let broker = weir_test::KafkaBroker::shared().bootstrap();
    let name = format!("{prefix}-{}", uuid::Uuid::new_v4().simple());
    topic(&broker, &name, 3);
    (broker, name)
}

#[test]
fn a_windowed_aggregate_is_exactly_once_and_correct_through_sigkills() {
    let (broker, name) = new_topic("win");
    topic(&broker, &format!("{name}-out"), 2);
    const N: usize = 6_000;
    let (seed, mut rng, events, end) = clicks_closed_an_hour_later(N, 0);
    let (late, want) = expected_windows(&events);
    // The Kafka sink publishes each commit in a transaction (the default, exactly once).
    let sink = format!("  kafka:\n    topic: {name}-out\n    key: [user_name]\n");
    let dir = run_through_sigkills(
        (&broker, &name),
        (
            "SELECT window_start, window_end, user_name, count(*) AS n, sum(amount) AS total\n\
             FROM TUMBLE(clicks, ts, INTERVAL '10' SECOND)\n\
             GROUP BY window_start, window_end, user_name",
            &sink,
        ),
        &events,
        (N / 3, N / 9),
        (4, 6, Duration::from_secs(120)),
        &mut rng,
    );
    let rows = query(
        dir.path(),
        "select cast(window_start as bigint) as s, cast(window_end as bigint) - cast(window_start as bigint) as len, \
         user_name, n, total from agg.clicks",
    );
    let mut got = std::collections::BTreeMap::new();
    for r in &rows {
        assert_eq!(r["len"], 10_000_000, "{r}");
        let key = (
            r["s"].as_i64().unwrap(),
            r["user_name"].as_str().unwrap().to_string(),
        );
        let v = (r["n"].as_u64().unwrap(), r["total"].as_i64().unwrap());
        assert!(
            got.insert(key.clone(), v).is_none(),
            "{key:?} twice (seed {seed})"
        );
    }
    assert!(want.len() > 40, "{} windows", want.len());
    assert_eq!(got, want, "seed {seed}");
    // Late clicks are in the quarantine table, each once, with the reason.
    let quarantined = query(
        dir.path(),
        "select line, reason from agg.clicks__quarantine",
    );
    assert!(late.len() > 50, "{} late", late.len());
    assert_eq!(quarantined.len(), late.len(), "seed {seed}");
    assert!(quarantined.iter().all(|q| q["reason"]
        .as_str()
        .unwrap()
        .starts_with("late: event time")));
    // The status shows the watermark: the hour-later records minus the allowed delay.
    let status = weir_json(dir.path(), &["stream", "status", "clicks"]);
    let wm = chrono::DateTime::from_timestamp_millis(end - 3_000)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
    assert_eq!(status["watermark"], wm.as_str(), "{status}");
    assert_eq!(status["lag"], 0, "{status}");
    // The Kafka sink has every window, with the table's values.
    let mut published = std::collections::BTreeMap::new();
    let mut repeats = 0;
    for (key, v) in read_committed(&broker, &format!("{name}-out")) {
        let v: serde_json::Value = serde_json::from_slice(&v).unwrap();
        assert_eq!(key.as_deref(), v["user_name"].as_str().map(str::as_bytes));
        let start = chrono::DateTime::parse_from_rfc3339(v["window_start"].as_str().unwrap())
            .unwrap()
            .timestamp_micros();
        let k = (start, v["user_name"].as_str().unwrap().to_string());
        let val = (v["n"].as_u64().unwrap(), v["total"].as_i64().unwrap());
        if let Some(before) = published.insert(k.clone(), val) {
            assert_eq!(
                before, val,
                "{k:?} published with other values (seed {seed})"
            );
            repeats += 1;
        }
    }
    // Records of transactions a kill left open are on the topic, aborted (seen by a reader
    // of uncommitted records only: how often a kill hit a transaction).
    let mut all = client(&broker);
    all.set("isolation.level", "read_uncommitted");
    let uncommitted = read_on(all, &format!("{name}-out")).len() - published.len();
    eprintln!("{uncommitted} records of aborted transactions");
    // A read-committed reader sees every window once: a transaction a kill left open was
    // aborted when the stream came back, and its commit was published again, whole.
    assert_eq!(
        repeats, 0,
        "{repeats} records published again (seed {seed})"
    );
    assert_eq!(published, want, "seed {seed}");
}

/// What a stream killed while publishing leaves behind: a transaction of its producer
/// (`transactional.id` = `weir-<stream>-<topic>`) open on the output topic. When the stream comes
/// back, its producer fences the old one and the broker aborts that transaction: readers of
/// committed records never see its records, and see each row the stream publishes once.
#[test]
fn a_transaction_a_crash_left_open_is_aborted_when_the_stream_comes_back() {
    let (broker, name) = new_topic("txn");
    let out = format!("{name}-out");
    topic(&broker, &out, 1);
    let stale: BaseProducer = client(&broker)
        .set("transactional.id", format!("weir-clicks-{out}"))
        .create()
        .unwrap();
    stale.init_transactions(Duration::from_secs(10)).unwrap();
    stale.begin_transaction().unwrap();
    for _ in 0..5 {
        send(&stale, || {
            BaseRecord::<(), _>::to(&out).payload(r#"{"stale": true}"#)
        });
    }
    stale.flush(Duration::from_secs(10)).unwrap();
    // Nothing of it is committed: a reader of committed records waits at its start.
    assert!(read_committed(&broker, &out).is_empty());
    let clicks: Vec<(i32, String)> = (0..20)
        .map(|i: i64| click_json(&((i % 3) as i32, i, format!("u{}", i % 4), i, 1_000 * i)))
        .collect();
    produce_to(&broker, &name, &clicks);
    let dir = tempfile::tempdir().unwrap();
    sql_project(
        dir.path(),
        &broker,
        &name,
        "SELECT id, user_name, amount FROM clicks",
        &format!("  kafka:\n    topic: {out}\n    key: [user_name]\n"),
    );
    let run = weir_json(
        dir.path(),
        &["stream", "run", "clicks", "--until-idle", "3s"],
    );
    assert_eq!(run["published"], 20, "{run}");
    let mut ids: Vec<i64> = read_committed(&broker, &out)
        .iter()
        .map(|(_, v)| {
            let v: serde_json::Value = serde_json::from_slice(v).unwrap();
            v["id"].as_i64().unwrap_or_else(|| panic!("{v}"))
        })
        .collect();
    ids.sort();
    assert_eq!(ids, (0..20).collect::<Vec<_>>());
    // The aborted records are on the topic all the same.
    let mut all = client(&broker);
    all.set("isolation.level", "read_uncommitted");
    assert_eq!(read_on(all, &out).len(), 25);
    drop(stale);
}

#[test]
fn a_join_of_the_stream_with_itself_is_exactly_once_through_sigkills() {
    let (broker, name) = new_topic("join");
    const N: usize = 4_000;
    let (seed, mut rng, events, end) = clicks_closed_an_hour_later(N, 50);
    // The reference: late clicks as for windows; each small click of a user with each
    // large one of the same user within 5 s after it, or alone (a null) when it has none
    // and the final watermark (the hour-later records minus 3 s) is past its 5 s.
    let (late, _) = expected_windows(&events);
    let on_time: Vec<_> = events.iter().filter(|e| !late.contains(&e.1)).collect();
    let mut want = Vec::new();
    for a in on_time.iter().filter(|a| a.3 < 10) {
        let before = want.len();
        for b in &on_time {
            if a.2 == b.2 && b.3 >= 90 && b.4 >= a.4 && b.4 <= a.4 + 5_000 {
                want.push((a.1, Some(b.1)));
            }
        }
        if want.len() == before && a.4 + 5_000 < end - 3_000 {
            want.push((a.1, None));
        }
    }
    let dir = run_through_sigkills(
        (&broker, &name),
        (
            "SELECT a.id AS small, b.id AS large, a.user_name\n\
             FROM clicks a LEFT JOIN clicks b\n\
             ON a.user_name = b.user_name AND b.ts BETWEEN a.ts AND a.ts + 5000 AND b.amount >= 90\n\
             WHERE a.amount < 10",
            "",
        ),
        &events,
        (N / 4, N / 6),
        (3, 5, Duration::from_secs(60)),
        &mut rng,
    );
    let rows = query(dir.path(), "select small, large from agg.clicks");
    let mut got: Vec<(i64, Option<i64>)> = rows
        .iter()
        .map(|r| (r["small"].as_i64().unwrap(), r["large"].as_i64()))
        .collect();
    got.sort_unstable();
    want.sort_unstable();
    // The data has both kinds: over 3,000 seeds, at least 31 lone rows and 520 pairs.
    let alone = want.iter().filter(|w| w.1.is_none()).count();
    assert!(
        want.len() - alone > 100 && alone > 20,
        "{alone} of {}",
        want.len()
    );
    assert_eq!(
        got.len(),
        want.len(),
        "each pair or lone row once (seed {seed})"
    );
    assert_eq!(got, want, "seed {seed}");
    let quarantined = query(dir.path(), "select reason from agg.clicks__quarantine");
    assert_eq!(quarantined.len(), late.len(), "seed {seed}");
}

#[test]
fn a_running_aggregate_counts_each_record_once_through_sigkills() {
    let (broker, name) = new_topic("running");
    const N: usize = 4_000;
    let (seed, mut rng, events, _) = clicks_closed_an_hour_later(N, 0);
    // Per user: records, total amount, distinct amounts; late ones are set aside.
    let (late, _) = expected_windows(&events);
    let mut want = std::collections::BTreeMap::new();
    for e in events.iter().filter(|e| !late.contains(&e.1)) {
        let w = want
            .entry(e.2.clone())
            .or_insert((0u64, 0i64, std::collections::BTreeSet::new()));
        w.0 += 1;
        w.1 += e.3;
        w.2.insert(e.3);
    }
    let want: std::collections::BTreeMap<String, (u64, i64, u64)> = want
        .into_iter()
        .map(|(u, (n, t, d))| (u, (n, t, d.len() as u64)))
        .collect();
    let dir = run_through_sigkills(
        (&broker, &name),
        (
            "SELECT user_name, count(*) AS n, sum(amount) AS total,\n\
             count(DISTINCT amount) AS amounts FROM clicks GROUP BY user_name",
            "  key: [user_name]\n",
        ),
        &events,
        (N / 4, N / 6),
        (3, 5, Duration::from_secs(60)),
        &mut rng,
    );
    let rows = query(
        dir.path(),
        "select user_name, n, total, amounts from agg.clicks",
    );
    let got: std::collections::BTreeMap<String, (u64, i64, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["user_name"].as_str().unwrap().to_string(),
                (
                    r["n"].as_u64().unwrap(),
                    r["total"].as_i64().unwrap(),
                    r["amounts"].as_u64().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(got.len(), rows.len(), "a user twice (seed {seed})");
    assert_eq!(got, want, "seed {seed}");
}

/// Every committed record of `topic` (key, value), read until none arrives for 3 s.
fn read_committed(broker: &str, topic: &str) -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
    read_on(client(broker), topic)
}

/// Every record of `topic`, read with `client`'s settings (read committed unless they say).
fn read_on(mut client: ClientConfig, topic: &str) -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    if client.get("isolation.level").is_none() {
        client.set("isolation.level", "read_committed");
    }
    let c: BaseConsumer = client
        .set(
            "group.id",
            format!("reader-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    c.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let mut last = Instant::now();
    while last.elapsed() < Duration::from_secs(3) {
        if let Some(m) = c.poll(Duration::from_millis(200)) {
            let m = m.unwrap();
            out.push((
                m.key().map(<[u8]>::to_vec),
                m.payload().unwrap_or_default().to_vec(),
            ));
            last = Instant::now();
        }
    }
    out
}

#[test]
fn a_query_enriches_records_from_a_lake_table_and_sets_bad_ones_aside() {
    let broker = weir_test::KafkaBroker::shared().bootstrap();
    let name = format!("enrich-{}", uuid::Uuid::new_v4().simple());
    topic(&broker, &name, 1);
    let dir = tempfile::tempdir().unwrap();
    sql_project(
        dir.path(),
        &broker,
        &name,
        "SELECT c.id, c.user_name, u.country, c.amount * 2 AS doubled\n\
         FROM clicks c JOIN ref.users u ON u.name = c.user_name\n\
         WHERE c.amount > 10",
        "",
    );
    crate::write(
        dir.path(),
        "data/users.csv",
        "name,country\nann,NO\nbob,FR\n",
    );
    crate::write(
        dir.path(),
        "pipelines/users.yaml",
        "source:\n  type: files\n  path: data/users.csv\nsink:\n  table: ref.users\n  mode: overwrite\n",
    );
    ok(&weir(dir.path(), &["run", "users"]));
    let mut records: Vec<(i32, String)> = (0..100)
        .map(|i| {
            let user = ["ann", "bob", "cy"][i % 3];
            (
                0,
                format!(r#"{{"id": {i}, "user_name": "{user}", "amount": {i}, "ts": 1}}"#),
            )
        })
        .collect();
    records.push((0, r#"{"user_name": "ann", "amount": 50, "ts": 1}"#.into()));
    records.push((
        0,
        r#"{"id": "x", "user_name": "ann", "amount": 50, "ts": 1}"#.into(),
    ));
    records.push((0, "no json".into()));
    produce_to(&broker, &name, &records);
    let s = weir_json(
        dir.path(),
        &["stream", "run", "clicks", "--until-idle", "2s"],
    );
    assert_eq!(s["records"], 103, "{s}");
    assert_eq!(s["quarantined"], 3, "{s}");
    // ann and bob (not cy) with amount > 10: ids 11..99 not divisible by 3 at 2.
    let want: Vec<u64> = (11..100).filter(|i| i % 3 != 2).collect();
    assert_eq!(
        scalar(dir.path(), "select count(*) from agg.clicks"),
        want.len() as u64
    );
    assert_eq!(
        scalar(
            dir.path(),
            "select sum(doubled) from agg.clicks where country = 'NO' or country = 'FR'"
        ),
        want.iter().map(|i| i * 2).sum::<u64>()
    );
    let reasons = query(
        dir.path(),
        "select reason from agg.clicks__quarantine order by line",
    );
    assert!(
        reasons[0]["reason"]
            .as_str()
            .unwrap()
            .contains("`id` is missing"),
        "{reasons:?}"
    );
    assert!(
        reasons[1]["reason"]
            .as_str()
            .unwrap()
            .contains("does not fit"),
        "{reasons:?}"
    );
    assert!(
        reasons[2]["reason"].as_str().unwrap().contains("not JSON"),
        "{reasons:?}"
    );

    // A running stream joins new records with the lake table as it is now: the table is
    // rewritten while the stream runs, and records produced after that see the new rows.
    let mut child = spawn_stream(dir.path(), "clicks", &[]);
    std::thread::sleep(Duration::from_secs(2));
    crate::write(
        dir.path(),
        "data/users.csv",
        "name,country\nann,DK\nbob,FR\ncy,SE\n",
    );
    ok(&weir(dir.path(), &["run", "users", "--full-refresh"]));
    std::thread::sleep(Duration::from_millis(1_500));
    let later: Vec<(i32, String)> = (200..230)
        .map(|i| {
            let user = ["ann", "bob", "cy"][i % 3];
            (
                0,
                format!(r#"{{"id": {i}, "user_name": "{user}", "amount": 50, "ts": 1}}"#),
            )
        })
        .collect();
    produce_to(&broker, &name, &later);
    let started = std::time::Instant::now();
    while scalar(
        dir.path(),
        "select count(*) from agg.clicks where id >= 200",
    )
    .as_u64()
    .unwrap_or(0)
        < 30
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the running stream did not commit the later records"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let countries = query(
        dir.path(),
        "select user_name, country, count(*) as n from agg.clicks where id >= 200 \
         group by user_name, country order by user_name",
    );
    let got: Vec<(String, String, u64)> = countries
        .iter()
        .map(|r| {
            (
                r["user_name"].as_str().unwrap().to_string(),
                r["country"].as_str().unwrap().to_string(),
                r["n"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("ann".to_string(), "DK".to_string(), 10),
            ("bob".to_string(), "FR".to_string(), 10),
            ("cy".to_string(), "SE".to_string(), 10)
        ]
    );
}

/// A schema registry on loopback, as Confluent's serves it: lookup by id
/// (`GET /schemas/ids/N`) and registration (`POST /subjects/S/versions`, ids from 1000). No
/// registry installs from this machine's package registries.
fn schema_registry(schemas: Vec<(u32, String)>) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut schemas = schemas;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut line = String::new();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let mut length = 0usize;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; length];
            let _ = reader.read_exact(&mut body);
            let mut words = line.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let (status, answer) = if method == "POST" && path.ends_with("/versions") {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let schema = v["schema"].as_str().unwrap().to_string();
                let id = match schemas.iter().find(|(_, s)| *s == schema) {
                    Some((id, _)) => *id,
                    None => {
                        let id = 1000 + schemas.len() as u32;
                        schemas.push((id, schema));
                        id
                    }
                };
                ("200 OK", serde_json::json!({ "id": id }).to_string())
            } else {
                let id: Option<u32> = path
                    .strip_prefix("/schemas/ids/")
                    .and_then(|i| i.parse().ok());
                match schemas.iter().find(|(i, _)| Some(*i) == id) {
                    Some((_, s)) => ("200 OK", serde_json::json!({ "schema": s }).to_string()),
                    None => (
                        "404 Not Found",
                        r#"{"error_code":40403,"message":"Schema not found"}"#.to_string(),
                    ),
                }
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: application/vnd.schemaregistry.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                answer.len()
            );
        }
    });
    format!("http://{addr}")
}

/// The schema registry's schema `id`, fetched as a consumer would.
fn registered_schema(registry: &str, id: u32) -> serde_json::Value {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(registry.trim_start_matches("http://")).unwrap();
    write!(
        s,
        "GET /schemas/ids/{id} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap();
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    serde_json::from_str(v["schema"].as_str().unwrap()).unwrap()
}

/// Decodes one Avro value of `schema` (records, unions, long/int/double/string and their
/// logical types), written here from the specification, not with the library weir uses.
fn avro_decode(schema: &serde_json::Value, bytes: &mut &[u8]) -> serde_json::Value {
    fn long(bytes: &mut &[u8]) -> i64 {
        let (mut z, mut shift) = (0u64, 0);
        loop {
            let b = bytes[0];
            *bytes = &bytes[1..];
            z |= ((b & 0x7f) as u64) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        ((z >> 1) as i64) ^ -((z & 1) as i64)
    }
    match schema {
        serde_json::Value::Array(branches) => {
            let i = long(bytes) as usize;
            avro_decode(&branches[i], bytes)
        }
        serde_json::Value::Object(o) if o["type"] == "record" => {
            let mut out = serde_json::Map::new();
            for f in o["fields"].as_array().unwrap() {
                out.insert(
                    f["name"].as_str().unwrap().to_string(),
                    avro_decode(&f["type"], bytes),
                );
            }
            serde_json::Value::Object(out)
        }
        serde_json::Value::Object(o) => avro_decode(&o["type"], bytes),
        serde_json::Value::String(t) => match t.as_str() {
            "null" => serde_json::Value::Null,
            "long" | "int" => long(bytes).into(),
            "double" => {
                let v = f64::from_le_bytes(bytes[..8].try_into().unwrap());
                *bytes = &bytes[8..];
                v.into()
            }
            "string" => {
                let n = long(bytes) as usize;
                let s = String::from_utf8(bytes[..n].to_vec()).unwrap();
                *bytes = &bytes[n..];
                s.into()
            }
            other => panic!("type {other} not decoded here"),
        },
        other => panic!("schema {other}"),
    }
}

#[test]
fn query_results_are_published_as_avro_with_a_registered_schema() {
    let broker = weir_test::KafkaBroker::shared().bootstrap();
    let out = format!("avro-out-{}", uuid::Uuid::new_v4().simple());
    topic(&broker, &out, 1);
    let registry = schema_registry(Vec::new());
    let dir = tempfile::tempdir().unwrap();
    crate::write(dir.path(), "weir.yaml", "name: streams\n");
    let lines: String = (0..200)
        .map(|i| {
            format!(
                r#"{{"id": {i}, "user_name": "u{}", "amount": {i}, "ts": 1}}"#,
                i % 7
            ) + "\n"
        })
        .collect();
    crate::write(dir.path(), "data/clicks.jsonl", &lines);
    crate::write(
        dir.path(),
        "streams/clicks.yaml",
        &format!(
            "source:\n  type: file\n  path: data/clicks.jsonl\n  name: clicks\n{CLICK_COLUMNS}\
             sql: SELECT id, user_name, amount * 0.5 AS half FROM clicks WHERE amount >= 150\n\
             sink:\n  table: agg.clicks\n  kafka:\n    topic: {out}\n    brokers: {broker}\n    key: [id]\n    format: avro\n    registry: {registry}\n    delivery: at_least_once\n\
             flush:\n  rows: 64\n"
        ),
    );
    let s = weir_json(dir.path(), &["stream", "run", "clicks"]);
    assert_eq!(s["published"], 50, "{s}");
    let mut seen = std::collections::BTreeMap::new();
    for (key, value) in read_committed(&broker, &out) {
        assert_eq!(value[0], 0, "Confluent magic byte");
        let id = u32::from_be_bytes(value[1..5].try_into().unwrap());
        let schema = registered_schema(&registry, id);
        let mut body = &value[5..];
        let row = avro_decode(&schema, &mut body);
        assert!(body.is_empty(), "bytes left after the record");
        let n = row["id"].as_i64().unwrap();
        assert_eq!(key.unwrap(), n.to_string().into_bytes());
        assert_eq!(row["user_name"], format!("u{}", n % 7));
        assert_eq!(row["half"].as_f64().unwrap(), n as f64 * 0.5);
        seen.insert(n, ());
    }
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (150..200).collect::<Vec<_>>()
    );
}

/// Avro's binary encoding of a long (zigzag, then base-128 varint).
fn avro_long(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    loop {
        let b = (z & 0x7f) as u8;
        z >>= 7;
        if z == 0 {
            out.push(b);
            break;
        }
        out.push(b | 0x80);
    }
}

fn avro_string(out: &mut Vec<u8>, s: &str) {
    avro_long(out, s.len() as i64);
    out.extend_from_slice(s.as_bytes());
}

/// A click in the Confluent wire format: 0, the schema id (big-endian), the body
/// (`id`, `user`, `amount`, and with schema 2 `country`, a union of null and string).
fn avro_click(schema_id: u32, id: i64, user: &str, amount: f64, country: Option<&str>) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend(schema_id.to_be_bytes());
    avro_long(&mut out, id);
    avro_string(&mut out, user);
    out.extend(amount.to_le_bytes());
    if schema_id == 2 {
        match country {
            None => avro_long(&mut out, 0),
            Some(c) => {
                avro_long(&mut out, 1);
                avro_string(&mut out, c);
            }
        }
    }
    out
}

#[test]
fn avro_records_are_decoded_with_registry_schemas_and_bad_ones_set_aside() {
    let broker = weir_test::KafkaBroker::shared().bootstrap();
    let name = format!("avro-{}", uuid::Uuid::new_v4().simple());
    topic(&broker, &name, 1);
    let v1 = r#"{"type":"record","name":"Click","fields":[{"name":"id","type":"long"},{"name":"user","type":"string"},{"name":"amount","type":"double"}]}"#;
    let v2 = r#"{"type":"record","name":"Click","fields":[{"name":"id","type":"long"},{"name":"user","type":"string"},{"name":"amount","type":"double"},{"name":"country","type":["null","string"],"default":null}]}"#;
    let registry = schema_registry(vec![(1, v1.into()), (2, v2.into())]);
    let mut values: Vec<Vec<u8>> = Vec::new();
    for i in 0..50 {
        values.push(avro_click(
            1,
            i,
            &format!("u{}", i % 3),
            i as f64 + 0.5,
            None,
        ));
    }
    for i in 50..100 {
        let country = (i % 2 == 0).then_some("NO");
        values.push(avro_click(
            2,
            i,
            &format!("u{}", i % 3),
            i as f64 + 0.5,
            country,
        ));
    }
    values.push(avro_click(99, 100, "x", 1.0, None)); // an id the registry does not have
    values.push(br#"{"id": 101}"#.to_vec()); // JSON, not Avro
    let mut cut = avro_click(1, 102, "a-long-user-name", 1.0, None);
    cut.truncate(cut.len() - 4); // a body cut short
    values.push(cut);
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker)
        .set("batch.num.messages", "1")
        .create()
        .unwrap();
    for v in &values {
        producer
            .send(BaseRecord::<(), _>::to(&name).partition(0).payload(v))
            .unwrap();
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    crate::write(dir.path(), "weir.yaml", "name: streams\n");
    crate::write(
        dir.path(),
        "streams/clicks.yaml",
        &format!(
            "source:\n  type: kafka\n  brokers: {broker}\n  topic: {name}\n  format: avro\n  avro:\n    registry: {registry}\n\
             sink:\n  table: raw.clicks\nflush:\n  rows: 40\n  interval: 300ms\n"
        ),
    );
    let s = weir_json(
        dir.path(),
        &["stream", "run", "clicks", "--until-idle", "2s"],
    );
    assert_eq!(s["records"], 103, "{s}");
    assert_eq!(s["rows"], 100, "{s}");
    assert_eq!(s["quarantined"], 3, "{s}");
    assert_eq!(
        scalar(dir.path(), "select sum(id) from raw.clicks"),
        (0..100).sum::<u64>()
    );
    assert_eq!(
        scalar(dir.path(), "select sum(amount) from raw.clicks"),
        (0..100).map(|i| i as f64 + 0.5).sum::<f64>()
    );
    // Schema 2's new field is a column: null for schema 1's records.
    assert_eq!(
        scalar(
            dir.path(),
            "select count(*) from raw.clicks where country = 'NO'"
        ),
        25
    );
    assert_eq!(
        scalar(
            dir.path(),
            "select count(*) from raw.clicks where id < 50 and country is null"
        ),
        50
    );
    let reasons = query(
        dir.path(),
        "select line, reason from raw.clicks__quarantine order by line",
    );
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons[0]["reason"]
            .as_str()
            .unwrap()
            .contains("schema id 99 is not in the registry"),
        "{reasons:?}"
    );
    assert!(
        reasons[1]["reason"]
            .as_str()
            .unwrap()
            .contains("magic byte"),
        "{reasons:?}"
    );
    assert!(
        reasons[2]["reason"]
            .as_str()
            .unwrap()
            .contains("not valid Avro"),
        "{reasons:?}"
    );
}

#[test]
fn a_file_replays_through_a_windowed_query_and_a_rerun_reads_only_new_lines() {
    let dir = tempfile::tempdir().unwrap();
    crate::write(dir.path(), "weir.yaml", "name: streams\n");
    crate::write(
        dir.path(),
        "streams/clicks.yaml",
        &format!(
            "source:\n  type: file\n  path: data/clicks.jsonl\n  name: clicks\n{CLICK_COLUMNS}\
             event_time:\n  column: ts\n  allowed_delay: 3s\n\
             sql: |\n  SELECT window_start, user_name, count(*) AS n, sum(amount) AS total\n  \
             FROM TUMBLE(clicks, ts, INTERVAL '10' SECOND)\n  GROUP BY window_start, user_name\n\
             sink:\n  table: agg.clicks\n  on_incompatible: quarantine\nflush:\n  rows: 500\n"
        ),
    );
    let mut rng = Lcg(7);
    // One partition: the file's lines, in order.
    let mut events: Vec<_> = clicks(&mut rng, 3_000)
        .into_iter()
        .map(|mut c| {
            c.0 = 0;
            c
        })
        .collect();
    let lines = |events: &[(i32, i64, String, i64, i64)]| {
        events
            .iter()
            .map(|c| click_json(c).1 + "\n")
            .collect::<String>()
    };
    let first = lines(&events[..2_000]) + "not json\n";
    crate::write(dir.path(), "data/clicks.jsonl", &first);
    let run = || weir_json(dir.path(), &["stream", "run", "clicks"]);
    let s = run();
    assert_eq!(s["records"], 2_001, "{s}");
    assert_eq!(s["positions"]["0"], 2_001, "{s}");
    // More lines arrive; a rerun reads only those, and the state carries the open windows.
    let end = events.iter().map(|e| e.4).max().unwrap() + 3_600_000;
    events.push((0, 3_000, "zz".into(), 0, end));
    let rest = lines(&events[2_000..]);
    crate::write(dir.path(), "data/clicks.jsonl", &(first + &rest));
    let s = run();
    assert_eq!(s["records"], 1_001, "{s}");
    let status = weir_json(dir.path(), &["stream", "status", "clicks"]);
    assert_eq!(status["lag"], 0, "{status}");
    // One partition in file order: the reference applies as it is.
    let (late, want) = expected_windows(&events);
    let rows = query(
        dir.path(),
        "select cast(window_start as bigint) as s, user_name, n, total from agg.clicks",
    );
    let got: std::collections::BTreeMap<(i64, String), (u64, i64)> = rows
        .iter()
        .map(|r| {
            (
                (
                    r["s"].as_i64().unwrap(),
                    r["user_name"].as_str().unwrap().to_string(),
                ),
                (r["n"].as_u64().unwrap(), r["total"].as_i64().unwrap()),
            )
        })
        .collect();
    assert_eq!(rows.len(), got.len(), "a window twice");
    assert_eq!(got, want);
    assert_eq!(
        scalar(dir.path(), "select count(*) from agg.clicks__quarantine"),
        late.len() as u64 + 1
    );
}

#[test]
fn a_join_whose_state_outgrows_its_bound_stops_the_stream_before_committing() {
    let dir = tempfile::tempdir().unwrap();
    crate::write(dir.path(), "weir.yaml", "name: streams\n");
    let stream = |max: &str| {
        format!(
            "source:\n  type: file\n  path: data/clicks.jsonl\n  name: clicks\n{CLICK_COLUMNS}\
             event_time:\n  column: ts\n  allowed_delay: 3s\n\
             sql: |\n  SELECT a.id AS a_id, b.id AS b_id FROM clicks a JOIN clicks b\n  \
             ON a.amount = b.amount WHERE a.user_name = 'ann' AND b.user_name = 'bob'\n\
             sink:\n  table: agg.pairs\nflush:\n  rows: 500\nstate:\n  max_bytes: {max}\n"
        )
    };
    crate::write(dir.path(), "streams/pairs.yaml", &stream("40KiB"));
    let mut rng = Lcg(11);
    let lines: String = clicks(&mut rng, 3_000)
        .iter()
        .map(|c| click_json(&(0, c.1, c.2.clone(), c.3, c.4)).1 + "\n")
        .collect();
    crate::write(dir.path(), "data/clicks.jsonl", &lines);
    // Without a time bound the join keeps every row of ann and bob: past 40 KiB after
    // some commits, the stream stops and says why.
    let out = weir(dir.path(), &["stream", "run", "pairs"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("past `state.max_bytes` (40.0 KiB)"), "{err}");
    assert!(err.contains("nothing of them was committed"), "{err}");
    assert!(err.contains("BETWEEN a.ts AND"), "{err}");
    assert!(err.contains("streams/pairs.yaml"), "{err}");
    let committed = scalar(dir.path(), "select count(*) from agg.pairs")
        .as_u64()
        .unwrap();
    assert!(committed > 0, "the commits before it stay");
    // With room for it, a rerun goes on from the last commit and every pair is there
    // once.
    crate::write(dir.path(), "streams/pairs.yaml", &stream("64MiB"));
    ok(&weir(dir.path(), &["stream", "run", "pairs"]));
    let rows = query(dir.path(), "select a_id, b_id from agg.pairs");
    let pairs: std::collections::BTreeSet<(i64, i64)> = rows
        .iter()
        .map(|r| (r["a_id"].as_i64().unwrap(), r["b_id"].as_i64().unwrap()))
        .collect();
    assert_eq!(pairs.len(), rows.len(), "a pair twice");
    assert!(rows.len() as u64 > committed);
    // The status shows the state's size: every row of ann and bob, kept.
    let status = weir_json(dir.path(), &["stream", "status", "pairs"]);
    let held = status["state_bytes"].as_u64().unwrap();
    assert!(held > 10_000, "{status}");
    let text = ok(&weir(dir.path(), &["stream", "status", "pairs"]));
    assert!(text.contains(", state "), "{text}");
}

#[test]
fn a_running_aggregate_keeps_one_current_row_per_key_in_the_table() {
    let dir = tempfile::tempdir().unwrap();
    crate::write(dir.path(), "weir.yaml", "name: streams\n");
    let stream = |key: &str| {
        format!(
            "source:\n  type: file\n  path: data/clicks.jsonl\n  name: clicks\n{CLICK_COLUMNS}\
             sql: |\n  SELECT user_name, count(*) AS n, sum(amount) AS total, max(ts) AS last_ts\n  \
             FROM clicks GROUP BY user_name\n\
             sink:\n  table: agg.users\n  key: [{key}]\nflush:\n  rows: 400\n"
        )
    };
    let mut rng = Lcg(3);
    let events: Vec<_> = clicks(&mut rng, 3_000);
    let lines = |events: &[(i32, i64, String, i64, i64)]| {
        events
            .iter()
            .map(|c| click_json(&(0, c.1, c.2.clone(), c.3, c.4)).1 + "\n")
            .collect::<String>()
    };
    crate::write(dir.path(), "data/clicks.jsonl", &lines(&events[..2_000]));
    // A key without a query is refused when the project loads.
    crate::write(
        dir.path(),
        "streams/raw.yaml",
        &format!(
            "source:\n  type: file\n  path: data/clicks.jsonl\n{CLICK_COLUMNS}\
             sink:\n  table: raw.clicks\n  key: [id]\n"
        ),
    );
    let out = weir(dir.path(), &["stream", "run", "raw"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("streams/raw.yaml: `sink.key` updates the rows a query returns"),
        "{err}"
    );
    std::fs::remove_file(dir.path().join("streams/raw.yaml")).unwrap();
    // A key the query does not return is refused, naming the file.
    crate::write(dir.path(), "streams/users.yaml", &stream("user"));
    let out = weir(dir.path(), &["stream", "run", "users"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("`sink.key` names `user`"), "{err}");
    assert!(err.contains("streams/users.yaml"), "{err}");
    crate::write(dir.path(), "streams/users.yaml", &stream("user_name"));
    let want = |events: &[(i32, i64, String, i64, i64)]| {
        let mut m = std::collections::BTreeMap::new();
        for (_, _, user, amount, ts) in events {
            let e = m.entry(user.clone()).or_insert((0u64, 0i64, i64::MIN));
            e.0 += 1;
            e.1 += amount;
            e.2 = e.2.max(*ts);
        }
        m
    };
    let table = || {
        query(
            dir.path(),
            "select user_name, n, total, last_ts from agg.users",
        )
        .iter()
        .map(|r| {
            (
                r["user_name"].as_str().unwrap().to_string(),
                (
                    r["n"].as_u64().unwrap(),
                    r["total"].as_i64().unwrap(),
                    r["last_ts"].as_i64().unwrap(),
                ),
            )
        })
        .collect::<Vec<_>>()
    };
    // 2,000 lines in 5 commits: one row per user, with the totals of all of them.
    let s = weir_json(dir.path(), &["stream", "run", "users"]);
    assert_eq!(s["commits"], 5, "{s}");
    let rows = table();
    assert_eq!(rows.len(), 4, "one row per user: {rows:?}");
    assert_eq!(
        rows.into_iter()
            .collect::<std::collections::BTreeMap<_, _>>(),
        want(&events[..2_000])
    );
    // More lines: a rerun takes up the checkpointed groups and updates the rows.
    crate::write(dir.path(), "data/clicks.jsonl", &lines(&events));
    weir_json(dir.path(), &["stream", "run", "users"]);
    let rows = table();
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert_eq!(
        rows.into_iter()
            .collect::<std::collections::BTreeMap<_, _>>(),
        want(&events)
    );
}

#[test]
fn a_stream_reads_and_publishes_through_tls_and_refuses_an_untrusted_broker() {
    // A broker that clients reach only through TLS (a certificate for 127.0.0.1).
    let (_broker, proxy) = weir_test::KafkaBroker::behind_tls().unwrap();
    let ca = proxy.ca_file().display().to_string();
    let tls = || {
        let mut c = client(&proxy.address());
        c.set("security.protocol", "ssl")
            .set("ssl.ca.location", &ca);
        c
    };
    topic_on(tls(), "clicks", 2);
    topic_on(tls(), "clicks-out", 1);
    let records: Vec<(i32, String)> = (0..200)
        .map(|i| {
            (
                i % 2,
                format!(
                    r#"{{"id": {i}, "user_name": "u{}", "amount": {i}, "ts": 1}}"#,
                    i % 5
                ),
            )
        })
        .collect();
    produce_on(tls(), "clicks", &records);
    let dir = tempfile::tempdir().unwrap();
    crate::write(dir.path(), "weir.yaml", "name: streams\n");
    let stream = |ca: &str| {
        format!(
            "source:\n  type: kafka\n  brokers: {addr}\n  topic: clicks\n  name: clicks\n\
             {CLICK_COLUMNS}  options:\n    security.protocol: ssl\n    ssl.ca.location: {ca}\n\
             sql: SELECT id, user_name, amount FROM clicks WHERE amount >= 150\n\
             sink:\n  table: agg.clicks\n  kafka:\n    topic: clicks-out\n    key: [id]\n\
             \x20   delivery: at_least_once\n    options:\n      security.protocol: ssl\n\
             \x20     ssl.ca.location: {ca}\n\
             flush:\n  rows: 64\n",
            addr = proxy.address(),
        )
    };
    // A broker whose certificate the stream does not trust: refused, with the reason.
    let (other, _unused) = weir_test::TlsProxy::bind().unwrap();
    crate::write(
        dir.path(),
        "streams/clicks.yaml",
        &stream(&other.ca_file().display().to_string()),
    );
    let started = Instant::now();
    let out = weir(
        dir.path(),
        &["stream", "run", "clicks", "--until-idle", "2s"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(err.contains("certificate verify failed"), "{err}");
    assert!(
        err.contains("ssl.ca.location) in streams/clicks.yaml"),
        "{err}"
    );
    // One warning for the failing connection, not one per retry.
    assert!(
        err.matches("certificate verify failed").count() < 5,
        "{err}"
    );
    // Trusted: the records are read through TLS and the rows published back through it.
    crate::write(dir.path(), "streams/clicks.yaml", &stream(&ca));
    let s = weir_json(
        dir.path(),
        &["stream", "run", "clicks", "--until-idle", "2s"],
    );
    assert_eq!(s["records"], 200, "{s}");
    assert_eq!(s["published"], 50, "{s}");
    let published = read_on(tls(), "clicks-out");
    let mut ids: Vec<i64> = published
        .iter()
        .map(|(_, v)| {
            serde_json::from_slice::<serde_json::Value>(v).unwrap()["id"]
                .as_i64()
                .unwrap()
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids, (150..200).collect::<Vec<_>>());
}

#[test]
fn a_stream_authenticates_with_sasl_scram_and_a_wrong_password_is_refused() {
    // A broker that lets in only clients that authenticate (SCRAM-SHA-512) as `weir`.
    let broker = weir_test::KafkaBroker::with_scram_user("weir", "s3cret-pw").unwrap();
    let sasl = || {
        let mut c = client(&broker.bootstrap());
        c.set("security.protocol", "sasl_plaintext")
            .set("sasl.mechanism", "SCRAM-SHA-512")
            .set("sasl.username", "weir")
            .set("sasl.password", "s3cret-pw");
        c
    };
    topic_on(sasl(), "events", 1);
    let records: Vec<(i32, String)> = (0..100)
        .map(|i| (0, format!(r#"{{"id": {i}, "kind": "k{}"}}"#, i % 3)))
        .collect();
    produce_on(sasl(), "events", &records);
    let dir = tempfile::tempdir().unwrap();
    crate::write(dir.path(), "weir.yaml", "name: streams\n");
    // The password comes from the environment, as a deployment would keep it.
    crate::write(
        dir.path(),
        "streams/events.yaml",
        &format!(
            "source:\n  type: kafka\n  brokers: {}\n  topic: events\n  options:\n\
             \x20   security.protocol: sasl_plaintext\n    sasl.mechanism: SCRAM-SHA-512\n\
             \x20   sasl.username: weir\n    sasl.password: ${{env:WEIR_TEST_KAFKA_PASSWORD}}\n\
             sink:\n  table: raw.events\n",
            broker.bootstrap()
        ),
    );
    let weir_with = |password: &str, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_weir"))
            .arg("--project")
            .arg(dir.path())
            .args(args)
            .env("WEIR_TEST_KAFKA_PASSWORD", password)
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    };
    let run = [
        "stream",
        "run",
        "events",
        "--until-idle",
        "2s",
        "--format",
        "json",
    ];
    let started = Instant::now();
    let out = weir_with("not-the-password", &run);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(err.contains("reading the topic's metadata"), "{err}");
    assert!(err.contains("SASL"), "{err}");
    assert!(
        err.contains("check the SASL settings in `source.options`"),
        "{err}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(ok(&weir_with("s3cret-pw", &run)).trim()).unwrap();
    assert_eq!(summary["records"], 100, "{summary}");
    let count = ok(&weir_with(
        "s3cret-pw",
        &[
            "query",
            "select count(distinct id) from raw.events",
            "--format",
            "csv",
        ],
    ));
    assert_eq!(count.lines().last(), Some("100"), "{count}");
}
