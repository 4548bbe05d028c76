//! The `weir` command line: argument parsing, output formatting and exit codes
//! (0 ok, 1 checks or runs failed, 2 usage or configuration error).

mod demo;
mod ops;
mod output;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use weir_common::{Domain, Error};
use weir_orchestrator::{RunOptions, RunSummary, Store};

/// mimalloc: DataFusion's hash tables and batches allocate and free at a high rate; with
/// it TPC-H SF1 went from 2.12x to 1.90x DuckDB's time (geometric mean, bench/tpch.py).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "A data platform in one binary: ingest, transform, load, query."
)]
struct Cli {
    /// Project directory (holding weir.yaml).
    #[arg(long, global = true, env = "WEIR_PROJECT", default_value = ".")]
    project: PathBuf,
    /// No progress output.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Format {
    Table,
    Csv,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new project in DIR.
    Init { dir: PathBuf },
    /// Check the project's configuration, models and graph.
    Validate,
    /// Run pipelines and models in dependency order.
    Run {
        /// `name`, `+name` (with upstream), `name+` (with downstream), `tag:x`; several
        /// separated by spaces or commas.
        selector: Vec<String>,
        /// Reload every file and rebuild incremental models from scratch.
        #[arg(long)]
        full_refresh: bool,
        /// Rerun the assets that failed in run ID and those skipped because of them.
        #[arg(long, value_name = "ID", conflicts_with = "selector")]
        retry_failed: Option<String>,
        /// Put the run in the queue for a worker (`weir worker`, `weir serve`) instead of
        /// running it here.
        #[arg(long)]
        queue: bool,
        /// With --queue: a key that makes enqueueing idempotent (a second run with the
        /// same key is not added).
        #[arg(long, requires = "queue")]
        run_key: Option<String>,
        /// The partition partitioned assets build (`2024-01-31`, `2024-01`,
        /// `2024-01-31T05`, or a value); default: each one's last complete partition.
        #[arg(long, value_name = "KEY", conflicts_with = "retry_failed")]
        partition: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Run history from the state store, newest first.
    Runs {
        #[command(subcommand)]
        command: Option<RunsCommand>,
        /// How many runs to list.
        #[arg(long, default_value = "20")]
        limit: usize,
        /// Only runs with this status (queued, running, succeeded, failed).
        #[arg(long)]
        status: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Each asset's last run, last success and freshness SLA (exit 1 when one is late).
    Status {
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Take queued runs from the state store and execute them.
    Worker {
        /// Exit when the queue is empty instead of waiting for more runs.
        #[arg(long)]
        drain: bool,
        /// Exit after this many runs.
        #[arg(long)]
        max_runs: Option<usize>,
        /// How often to look at an empty queue.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        poll: std::time::Duration,
    },
    /// Build the missing partitions of a partitioned pipeline or model, resumably: a second
    /// call with the same range continues where an interrupted one stopped.
    Backfill {
        /// The partitioned pipeline or model.
        asset: String,
        /// First partition (`2024-01-01`, `2024-01`, `2024-01-01T05`, or a value).
        #[arg(long)]
        from: Option<String>,
        /// Last partition, included.
        #[arg(long)]
        to: Option<String>,
        /// Rebuild partitions that were built before too.
        #[arg(long)]
        all: bool,
        /// Partitions built at once.
        #[arg(long, default_value = "2")]
        parallel: usize,
        /// Only queue the partition runs, for `weir serve` or `weir worker`.
        #[arg(long)]
        queue: bool,
    },
    /// Run the scheduler, workers for queued runs and the HTTP API until stopped.
    Serve {
        /// Port of the HTTP API on 127.0.0.1 (0 picks a free one).
        #[arg(long, default_value = "8686")]
        port: u16,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        bind: std::net::IpAddr,
        /// Runs executed at once.
        #[arg(long, default_value = "1")]
        workers: usize,
        /// Only the API and workers: no schedules or sensors.
        #[arg(long)]
        no_schedules: bool,
    },
    /// Run the declared data quality checks over the published tables.
    Test {
        /// Which assets' checks: as for `run`.
        selector: Vec<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Run SQL over the lake's tables (`schema.table`) and print the result. A table as it
    /// was at a version or a time: `raw.events@v3`, `raw.events@'2026-11-29 10:00:00'`.
    Query {
        sql: String,
        /// Read every table the query names as it was at this version (`3`) or time
        /// (`2026-11-29T10:00:00Z`, UTC unless an offset is given).
        #[arg(long, value_name = "VERSION|TIME")]
        as_of: Option<String>,
        /// Print the plan and how many files of each table it reads instead of the rows.
        #[arg(long)]
        explain: bool,
        /// With --explain: run the query and add each step's metrics (rows, time, row
        /// groups and pages pruned) to the plan.
        #[arg(long, requires = "explain")]
        analyze: bool,
        /// A query engine setting for this query: `--set datafusion.execution.batch_size=4096`.
        #[arg(long, value_name = "KEY=VALUE")]
        set: Vec<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// List the lake's tables with rows, files, bytes and version.
    Tables {
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Inspect one table.
    Table {
        #[command(subcommand)]
        command: TableCommand,
    },
    /// Run the streams of `streams/*.yaml`.
    Stream {
        #[command(subcommand)]
        command: StreamCommand,
    },
    /// Mirror PostgreSQL tables into the lake from logical replication (`cdc/*.yaml`).
    Cdc {
        #[command(subcommand)]
        command: CdcCommand,
    },
    /// Check the connections in weir.yaml.
    Connections {
        #[command(subcommand)]
        command: ConnectionsCommand,
    },
    /// Write the retail demo project into DIR (default `weir-demo`) and run it.
    Demo {
        dir: Option<PathBuf>,
        /// Also publish the daily revenue mart to this PostgreSQL database
        /// (`postgresql://user:password@host/db`).
        #[arg(long, value_name = "URL")]
        postgres: Option<String>,
        /// Where the new project's lake goes: a directory or an `s3://bucket/path` URL
        /// (credentials and endpoint from the `AWS_*` environment variables).
        #[arg(long, value_name = "DIR|URL")]
        lake: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
}

#[derive(Subcommand)]
enum RunsCommand {
    /// One run with its assets: status, attempts, rows, errors.
    Show {
        /// The run id or a unique prefix of it.
        id: String,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
}

#[derive(Subcommand)]
enum ConnectionsCommand {
    /// Connect with each connection (or only NAME) and report the server and latency.
    Test { name: Option<String> },
}

#[derive(Subcommand)]
enum StreamCommand {
    /// Land a stream's Kafka topic in its table, exactly once, until stopped (Ctrl-C or
    /// SIGTERM commit what is buffered first).
    Run {
        name: String,
        /// Stop once no record has arrived for this long (`5s`), after committing.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        until_idle: Option<std::time::Duration>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Per partition: the table's position, the broker's offsets and the lag between them.
    Status {
        name: String,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
}

#[derive(Subcommand)]
enum CdcCommand {
    /// Snapshot the tables (first run), then apply their changes exactly once until
    /// stopped (Ctrl-C or SIGTERM stop after the batch being applied).
    Run {
        name: String,
        /// Stop once the slot has had nothing new for this long (`5s`).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        until_idle: Option<std::time::Duration>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// The slot, its lag in bytes and time, and each mirror's position; exits 1 when the
    /// slot is gone or invalidated or the lag is past `lag_limit`.
    Status {
        name: String,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Copy tables again (all of the job's without TABLE): a running job does it between
    /// batches, a stopped one when it starts.
    Resnapshot { name: String, tables: Vec<String> },
}

#[derive(Subcommand)]
enum TableCommand {
    /// Commits of a table, newest first.
    History {
        name: String,
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Compact small files into files of the target size, in one commit; rows unchanged.
    Optimize {
        name: String,
        /// Also cluster the rows by these columns (z-order), so filters on them skip
        /// more files: `--zorder customer_id,order_date`.
        #[arg(long, value_delimiter = ',')]
        zorder: Vec<String>,
        /// The file size to aim for: `128MiB`, `512KiB`, `1GiB` (default 100MiB).
        #[arg(long, value_name = "SIZE", value_parser = weir_config::parse_size)]
        target_size: Option<u64>,
        /// Only this partition: `--partition day=2024-01-31` (repeat for several columns).
        #[arg(long, value_name = "COLUMN=VALUE", value_parser = parse_partition)]
        partition: Vec<(String, String)>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Delete the files a table no longer references, once removed longer than --retain
    /// ago. Versions older than the retention can no longer be read or restored.
    Vacuum {
        name: String,
        /// How long removed files are kept: `7d`, `36h`.
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        retain: std::time::Duration,
        /// List the files that would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Allow a retention under 7 days (only when no reader or writer can be running).
        #[arg(long)]
        force: bool,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Files, sizes, small-file share, partitions, rows, compression, versions and the
    /// bytes a vacuum would free, with suggested maintenance; every table without NAME.
    Stats {
        name: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Apply the tables' maintenance policies (`maintenance:` in weir.yaml) now: retention,
    /// compaction when enough files are small, vacuum when due. Every table with a policy
    /// without NAME.
    Maintain {
        name: Option<String>,
        /// Say what each policy would do; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Write a checkpoint of the Delta log at the current version, so readers start from
    /// it instead of replaying every commit (weir writes one every 100 commits anyway).
    Checkpoint {
        name: String,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Make a table hold what it held at an earlier version, in a new commit.
    Restore {
        name: String,
        #[arg(long)]
        version: u64,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
}

/// `day=2024-01-31` as `("day", "2024-01-31")`.
fn parse_partition(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((c, v)) if !c.trim().is_empty() => Ok((c.trim().to_string(), v.to_string())),
        _ => Err(format!("`{text}`: write COLUMN=VALUE, e.g. day=2024-01-31")),
    }
}

fn open_lake(project: &std::path::Path) -> Result<weir_lake::Lake, weir_common::Error> {
    let project = weir_config::load_project(project)?;
    Ok(weir_lake::Lake::for_project(&project))
}

/// A long-running stream returns freed memory to the system after each commit: mimalloc's defaults
/// (memory committed with its arena, freed pages kept for a while) suit short queries but
/// let a stream's resident memory grow with every commit: 886 MB for a 240 MB backlog
/// read in 2 MB commits, against 189 MB with these settings (and 156 MB with the system
/// allocator; TPC-H is 10% faster with mimalloc's defaults). mimalloc reads them from the
/// environment when it starts, before `main`, so `weir stream run` sets them and runs
/// itself again (same process id, so supervisors and signals are unaffected).
#[cfg(all(feature = "mimalloc", unix))]
fn stream_memory_settings() {
    use std::os::unix::process::CommandExt;
    // Memory committed as it is used, freed pages purged after 10 ms, and what is left
    // given back after each commit (weir_common::memory). Purging at once (0) made the
    // kernel zero the same pages again and again: Nexmark q0 spent more CPU in the kernel
    // than in weir, 3.9-4.0 s in all against 3.1-3.3 s with 10 ms. The 10 ms cost 6-12 MB of
    // anonymous memory with a 4 MiB buffer (72 against 78-84 MB, the backlog test).
    const SETTINGS: [(&str, &str); 2] = [
        ("MIMALLOC_ARENA_EAGER_COMMIT", "0"),
        ("MIMALLOC_PURGE_DELAY", "10"),
    ];
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let words: Vec<&str> = args.iter().skip(1).filter_map(|a| a.to_str()).collect();
    let streaming = words.windows(2).any(|w| w == ["stream", "run"]);
    if !streaming || SETTINGS.iter().all(|(k, _)| std::env::var_os(k).is_some()) {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.args(&args[1..]);
    for (k, v) in SETTINGS {
        if std::env::var_os(k).is_none() {
            cmd.env(k, v);
        }
    }
    // Only returns if the exec failed; the stream then runs with the defaults.
    let err = cmd.exec();
    tracing::debug!("re-running with stream memory settings failed: {err}");
}

/// Transparent huge pages for the heap, off while a query starts and on once it runs.
///
/// mimalloc asks for huge pages, and each thread takes fresh pages of its own, so the kernel
/// zeroes a whole 2 MiB page for every thread's first small allocation of each size: opening
/// a table's Delta log on a few pool threads spent more than half its time there. Small
/// pages suit that start (project, log replay, planning); huge pages suit the execution
/// (TPC-H 15% slower without them). The setting holds for memory touched after the call.
fn huge_pages(on: bool) {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE sets a flag of this process's memory map and reads no
    // pointer; a kernel without it returns an error, which changes nothing.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, libc::c_ulong::from(!on), 0, 0, 0);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = on;
}

fn main() -> ExitCode {
    #[cfg(all(feature = "mimalloc", unix))]
    stream_memory_settings();
    #[cfg(feature = "mimalloc")]
    weir_common::memory::set_release(|| {
        // SAFETY: mi_collect only walks mimalloc's own free lists; any thread may call it.
        unsafe { libmimalloc_sys::mi_collect(true) }
    });
    let cli = Cli::parse();
    if matches!(cli.command, Command::Query { .. }) {
        huge_pages(false);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
                .unwrap_or_else(|_| "warn,deltalake_core=error".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::env::var_os("NO_COLOR").is_none() && std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("{}", e.render());
            ExitCode::from(if e.domain == Domain::User { 2 } else { 1 })
        }
    }
}

async fn dispatch(cli: Cli) -> Result<u8, Error> {
    let progress = !cli.quiet && std::io::stderr().is_terminal();
    match cli.command {
        Command::Init { dir } => {
            demo::write_init(&dir)?;
            eprintln!(
                "created project in {}\n  next: cd {} && weir run",
                dir.display(),
                dir.display()
            );
            Ok(0)
        }
        Command::Validate => {
            let project = weir_config::load_project(&cli.project)?;
            let graph = weir_engine::Graph::build(&project)?;
            for p in &project.pipelines {
                if p.config.source.kind != weir_config::SourceKind::Lake {
                    weir_connectors::source_for(&project, &p.config.source, None, false)?;
                }
            }
            eprintln!(
                "ok: {} pipelines, {} models, {} assets in dependency order",
                project.pipelines.len(),
                project.models.len(),
                graph.assets.len()
            );
            Ok(0)
        }
        Command::Run {
            selector,
            full_refresh,
            retry_failed,
            queue,
            run_key,
            partition,
            format,
        } => {
            let project = weir_config::load_project(&cli.project)?;
            let sel = (!selector.is_empty()).then(|| selector.join(" "));
            if queue {
                let graph = weir_engine::Graph::build(&project)?;
                let selected = graph.select(sel.as_deref())?;
                if let Some(key) = &partition {
                    weir_orchestrator::check_partition(&project, &graph, &selected, key)?;
                }
                let store = Store::open(&project).await?;
                let mut record =
                    weir_orchestrator::store::RunRecord::new(&project.config.name, "manual");
                record.selector = sel;
                record.full_refresh = full_refresh;
                record.partition = partition;
                record.run_key = run_key;
                if weir_orchestrator::enqueue(&store, &record).await? {
                    println!("{}", record.id);
                    eprintln!("queued run {}", record.id);
                } else {
                    eprintln!("a run with this run key is queued or done already; nothing added");
                }
                return Ok(0);
            }
            let opts = RunOptions {
                selector: sel,
                full_refresh,
                progress: None,
                retry_failed,
                partition,
            };
            let summary = run_project(&project, opts, progress).await?;
            Ok(report(&summary, format))
        }
        Command::Runs {
            command,
            limit,
            status,
            format,
        } => {
            let (_, store) = project_and_store(&cli.project).await?;
            match command {
                None => {
                    let runs = store.list_runs(limit, status.as_deref()).await?;
                    if format == Format::Json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&runs).unwrap_or_default()
                        );
                    } else if runs.is_empty() {
                        eprintln!("no runs yet: `weir run` starts one");
                    } else {
                        print!("{}", ops::runs_table(&runs));
                    }
                }
                Some(RunsCommand::Show { id, format }) => {
                    let run = store.find_run(&id).await?;
                    let assets = store.assets(&run.id).await?;
                    if format == Format::Json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(
                                &serde_json::json!({"run": run, "assets": assets})
                            )
                            .unwrap_or_default()
                        );
                    } else {
                        print!("{}", ops::run_detail(&run, &assets));
                    }
                }
            }
            Ok(0)
        }
        Command::Status { format } => {
            let (project, store) = project_and_store(&cli.project).await?;
            let now = weir_orchestrator::store::now_ms();
            let states = weir_orchestrator::alert::status(&project, &store, now).await?;
            if format == Format::Json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&states).unwrap_or_default()
                );
            } else {
                print!("{}", ops::status_table(&states, now));
            }
            Ok(if states.iter().any(|s| s.state == "late") {
                1
            } else {
                0
            })
        }
        Command::Backfill {
            asset,
            from,
            to,
            all,
            parallel,
            queue,
        } => {
            let (project, store) = project_and_store(&cli.project).await?;
            ops::backfill(
                &project,
                &store,
                ops::Backfill {
                    asset,
                    from,
                    to,
                    all,
                    parallel,
                    queue,
                },
            )
            .await
        }
        Command::Serve {
            port,
            bind,
            workers,
            no_schedules,
        } => {
            let (project, store) = project_and_store(&cli.project).await?;
            let schedules = weir_orchestrator::schedule::schedules(&project);
            let now = chrono::Utc::now();
            for (name, next) in weir_orchestrator::schedule::upcoming(&schedules, now) {
                eprintln!(
                    "schedule {name}: next run {}",
                    next.map(|t| ops::when(t.timestamp_millis()))
                        .unwrap_or_else(|| "never".into())
                );
            }
            let shutdown = async {
                let _ = tokio::signal::ctrl_c().await;
                eprintln!("stopping: waiting for running runs to finish");
            };
            weir_server::serve(
                project,
                store,
                weir_server::ServeOptions {
                    bind: std::net::SocketAddr::new(bind, port),
                    workers,
                    no_schedules,
                },
                |addr| {
                    eprintln!(
                        "weir serve: listening on http://{addr} (health: /health, runs: /api/runs)"
                    )
                },
                shutdown,
                Arc::new(ops::print_outcome),
            )
            .await?;
            Ok(0)
        }
        Command::Worker {
            drain,
            max_runs,
            poll,
        } => {
            let (project, store) = project_and_store(&cli.project).await?;
            let (tx, rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!("stopping after the current run (Ctrl-C again to abort)");
                    let _ = tx.send(true);
                    if tokio::signal::ctrl_c().await.is_ok() {
                        std::process::exit(130);
                    }
                }
            });
            let (done, failed) = weir_orchestrator::worker::work(
                &project,
                &store,
                weir_orchestrator::worker::WorkerOptions {
                    drain,
                    max_runs,
                    poll,
                    only: None,
                },
                &rx,
                &ops::print_outcome,
            )
            .await?;
            eprintln!("worker stopped: {done} runs executed, {failed} failed");
            Ok(if failed > 0 { 1 } else { 0 })
        }
        Command::Query {
            sql,
            as_of,
            explain,
            analyze,
            set,
            format,
        } => {
            let started = std::time::Instant::now();
            let phase = |name: &str| {
                tracing::debug!(
                    elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                    "query: {name}"
                )
            };
            let project = weir_config::load_project(&cli.project)?;
            let lake = weir_lake::Lake::for_project(&project);
            let graph = weir_engine::Graph::build(&project)?;
            let ctx = weir_orchestrator::project_session(&project, &lake, &graph).await?;
            phase("session");
            for kv in &set {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| Error::user(format!("--set `{kv}`: write KEY=VALUE")))?;
                let state = ctx.state_ref();
                let mut state = state.write();
                state
                    .config_mut().options_mut().set(k.trim(), v.trim()).map_err(|e| {
                    Error::user(format!("--set `{kv}`: {e}"))
                        .with_hint("the keys are DataFusion's settings, e.g. datafusion.execution.batch_size")
                })?;
            }
            let as_of = as_of.as_deref().map(weir_lake::AsOf::parse).transpose()?;
            let (sql, scanned) =
                weir_engine::travel::prepare(&ctx, &lake, &sql, as_of, explain).await?;
            if explain {
                huge_pages(true);
                let e = weir_engine::explain::explain(&ctx, &sql, &scanned, analyze).await?;
                output::print_record(
                    serde_json::to_value(&e).unwrap_or_default(),
                    format == Format::Json,
                    weir_engine::explain::render(&e).trim_end(),
                );
                return Ok(0);
            }
            weir_engine::session::open_named_tables(&ctx, &sql).await;
            phase("tables open");
            huge_pages(true);
            let shared = weir_engine::cte::materialize(&ctx, &sql).await;
            let df = match ctx.sql(&shared.sql).await {
                Ok(df) => df,
                Err(e) => return Err(query_error(&lake, e).await),
            };
            phase("planned");
            let batches = match df.collect().await {
                Ok(b) => b,
                Err(e) => return Err(query_error(&lake, e).await),
            };
            phase("executed");
            shared.release(&ctx);
            output::print_batches(&batches, format == Format::Csv, format == Format::Json)?;
            phase("printed");
            Ok(0)
        }
        Command::Connections {
            command: ConnectionsCommand::Test { name },
        } => {
            let project = weir_config::load_project(&cli.project)?;
            let conns = &project.config.connections;
            if let Some(n) = &name {
                if !conns.contains_key(n) {
                    let names: Vec<String> = conns.keys().cloned().collect();
                    return Err(
                        weir_common::Error::user(format!("unknown connection `{n}`")).with_hint(
                            match weir_config::closest(n, &names) {
                                Some(best) => format!("did you mean `{best}`?"),
                                None => format!("connections in weir.yaml: {}", names.join(", ")),
                            },
                        ),
                    );
                }
            }
            if conns.is_empty() {
                eprintln!("no connections in weir.yaml");
                return Ok(0);
            }
            let mut failed = 0;
            for (n, c) in conns {
                if name.as_ref().is_some_and(|want| want != n) {
                    continue;
                }
                let started = std::time::Instant::now();
                match weir_connectors::postgres::conn::check(n, c).await {
                    Ok(server) => eprintln!(
                        "ok      {n}: {server} ({} ms)",
                        started.elapsed().as_millis()
                    ),
                    Err(e) => {
                        failed += 1;
                        eprintln!(
                            "FAILED  {n}: {}",
                            e.render().trim_end().replace('\n', "\n        ")
                        );
                    }
                }
            }
            Ok(if failed > 0 { 1 } else { 0 })
        }
        Command::Test { selector, format } => {
            let project = weir_config::load_project(&cli.project)?;
            let sel = (!selector.is_empty()).then(|| selector.join(" "));
            let results = weir_orchestrator::test(&project, sel.as_deref()).await?;
            let failed = results
                .iter()
                .filter(|r| r.status == weir_engine::checks::CheckStatus::Fail)
                .count();
            if format == Format::Json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&results).unwrap_or_default()
                );
            } else {
                eprint!("{}", output::check_report(&results));
            }
            Ok(if failed > 0 { 1 } else { 0 })
        }
        Command::Stream {
            command:
                StreamCommand::Run {
                    name,
                    until_idle,
                    format,
                },
        } => {
            let project = weir_config::load_project(&cli.project)?;
            let lake = weir_lake::Lake::for_project(&project);
            let opts = weir_orchestrator::stream::StreamOptions { until_idle };
            let s = weir_orchestrator::stream::run_stream(&project, &lake, &name, &opts).await?;
            let text = format!(
                "stream {}: {} records -> {} rows in {} commits to {}, {} quarantined; next offsets {:?}",
                s.stream, s.records, s.rows, s.commits, s.table, s.quarantined, s.positions
            );
            output::print_record(
                serde_json::to_value(&s).unwrap_or_default(),
                format == Format::Json,
                &text,
            );
            Ok(0)
        }
        Command::Stream {
            command: StreamCommand::Status { name, format },
        } => {
            let project = weir_config::load_project(&cli.project)?;
            let lake = weir_lake::Lake::for_project(&project);
            let s = weir_orchestrator::stream::status(&project, &lake, &name).await?;
            let rate = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.0}/s"));
            let mut text = format!(
                "stream {} ({} -> {}): {} commits, {} rows, last commit {}, lag {}, {}{}{}\n\
                 partition  position  low  high  lag  rate  watermark",
                s.stream,
                s.topic,
                s.table,
                s.epoch,
                s.rows,
                s.last_commit.as_deref().unwrap_or("never"),
                s.lag,
                rate(s.records_per_second),
                s.watermark
                    .as_deref()
                    .map_or(String::new(), |w| format!(", watermark {w}")),
                s.state_bytes.map_or(String::new(), |b| format!(
                    ", state {}",
                    weir_common::memory::human_bytes(b)
                )),
            );
            for p in &s.partitions {
                text.push_str(&format!(
                    "\n{:<9}  {:<8}  {:<3}  {:<4}  {}  {}  {}",
                    p.partition,
                    p.position.map_or("-".to_string(), |v| v.to_string()),
                    p.low_watermark,
                    p.high_watermark,
                    p.lag,
                    rate(p.records_per_second),
                    p.watermark.as_deref().unwrap_or("-"),
                ));
            }
            output::print_record(
                serde_json::to_value(&s).unwrap_or_default(),
                format == Format::Json,
                &text,
            );
            Ok(0)
        }
        Command::Cdc {
            command:
                CdcCommand::Run {
                    name,
                    until_idle,
                    format,
                },
        } => {
            let project = weir_config::load_project(&cli.project)?;
            let lake = weir_lake::Lake::for_project(&project);
            let opts = weir_orchestrator::cdc::CdcOptions { until_idle };
            let s = weir_orchestrator::cdc::run_cdc(&project, &lake, &name, &opts).await?;
            let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0} ms"));
            let text = format!(
                "cdc {}: {} snapshot rows, {} changes in {} transactions applied ({} already held), \
                 {} commits; slot at {}; latency p50 {}, p99 {}",
                s.job,
                s.snapshot_rows,
                s.changes,
                s.transactions,
                s.skipped,
                s.commits,
                s.lsn,
                ms(s.latency_p50_ms),
                ms(s.latency_p99_ms)
            );
            output::print_record(
                serde_json::to_value(&s).unwrap_or_default(),
                format == Format::Json,
                &text,
            );
            Ok(0)
        }
        Command::Cdc {
            command: CdcCommand::Status { name, format },
        } => {
            let project = weir_config::load_project(&cli.project)?;
            let lake = weir_lake::Lake::for_project(&project);
            let s = weir_orchestrator::cdc::status(&project, &lake, &name).await?;
            let mut text = format!(
                "cdc {}: slot {} {}, confirmed {}, server at {}, lag {}{}{}\n\
                 source  mirror  lsn  rows  snapshot",
                s.job,
                s.slot,
                match (s.slot_exists, s.slot_active) {
                    (false, _) => "MISSING",
                    (true, true) => "(active)",
                    (true, false) => "(idle)",
                },
                s.confirmed_lsn.as_deref().unwrap_or("-"),
                s.server_lsn,
                s.lag_bytes
                    .map_or("-".to_string(), |b| format!("{b} bytes")),
                s.lag_seconds.map_or(String::new(), |t| format!(
                    ", oldest unapplied change {t:.1}s old"
                )),
                s.problem
                    .as_deref()
                    .map_or(String::new(), |p| format!("\nPROBLEM: {p}")),
            );
            for t in &s.tables {
                text.push_str(&format!(
                    "\n{}  {}  {}  {}  {}{}",
                    t.source,
                    t.mirror,
                    t.lsn.as_deref().unwrap_or("-"),
                    t.rows.map_or("-".to_string(), |r| r.to_string()),
                    t.snapshot,
                    if t.resnapshot_requested {
                        " (re-snapshot requested)"
                    } else {
                        ""
                    }
                ));
            }
            output::print_record(
                serde_json::to_value(&s).unwrap_or_default(),
                format == Format::Json,
                &text,
            );
            Ok(if s.problem.is_some() { 1 } else { 0 })
        }
        Command::Cdc {
            command: CdcCommand::Resnapshot { name, tables },
        } => {
            let project = weir_config::load_project(&cli.project)?;
            let lake = weir_lake::Lake::for_project(&project);
            let done =
                weir_orchestrator::cdc::request_resnapshot(&project, &lake, &name, &tables).await?;
            if done.is_empty() {
                println!("nothing to copy again: no table of `{name}` has been copied yet");
            } else {
                println!("re-snapshot requested for {}", done.join(", "));
            }
            Ok(0)
        }
        Command::Tables { format } => {
            let lake = open_lake(&cli.project)?;
            let mut stats = Vec::new();
            for t in lake.list().await? {
                stats.push(lake.stats(&t).await?);
            }
            output::print_tables(&stats, format == Format::Json);
            Ok(0)
        }
        Command::Table {
            command:
                TableCommand::History {
                    name,
                    limit,
                    format,
                },
        } => {
            let lake = open_lake(&cli.project)?;
            let history = lake.history(&name, limit).await?;
            output::print_history(&history, format == Format::Json);
            Ok(0)
        }
        Command::Table {
            command:
                TableCommand::Optimize {
                    name,
                    zorder,
                    target_size,
                    partition,
                    format,
                },
        } => {
            let lake = open_lake(&cli.project)?;
            let spec = weir_lake::OptimizeSpec {
                zorder,
                target_size,
                partitions: partition,
            };
            let m = lake.optimize(&name, &spec).await?;
            output::print_record(
                serde_json::to_value(&m).unwrap_or_default(),
                format == Format::Json,
                &format!(
                    "{name}: {} files -> {} ({} removed, {} added; {} -> {}), version {}",
                    m.files_before,
                    m.files_after,
                    m.files_removed,
                    m.files_added,
                    output::human_bytes(m.bytes_removed),
                    output::human_bytes(m.bytes_added),
                    m.version
                ),
            );
            Ok(0)
        }
        Command::Table {
            command:
                TableCommand::Vacuum {
                    name,
                    retain,
                    dry_run,
                    force,
                    format,
                },
        } => {
            let lake = open_lake(&cli.project)?;
            let m = lake.vacuum(&name, retain, dry_run, force).await?;
            let verb = if m.dry_run { "would delete" } else { "deleted" };
            let mut text = format!("{name}: {verb} {} file(s)", m.files.len());
            for f in &m.files {
                text.push_str(&format!("\n  {f}"));
            }
            output::print_record(
                serde_json::to_value(&m).unwrap_or_default(),
                format == Format::Json,
                &text,
            );
            Ok(0)
        }
        Command::Table {
            command: TableCommand::Stats { name, format },
        } => {
            let lake = open_lake(&cli.project)?;
            let names = match name {
                Some(n) => vec![n],
                None => lake.list().await?,
            };
            let mut report = Vec::new();
            for n in &names {
                report.push(lake.health(n).await?);
            }
            output::print_health(&report, format == Format::Json);
            Ok(0)
        }
        Command::Table {
            command:
                TableCommand::Maintain {
                    name,
                    dry_run,
                    format,
                },
        } => {
            let project = weir_config::load_project(&cli.project)?;
            let lake = weir_lake::Lake::for_project(&project);
            let named = name.is_some();
            let names = match name {
                Some(n) => vec![n],
                None => lake.list().await?,
            };
            let mut reports = Vec::new();
            for n in &names {
                let Some(policy) = project.maintenance_for(n) else {
                    if named {
                        return Err(Error::user(format!("`{n}` has no maintenance policy"))
                            .with_hint(
                                "add one under `maintenance:` in weir.yaml (docs/lake.md)",
                            ));
                    }
                    continue;
                };
                reports.push(lake.maintain(n, policy, dry_run).await?);
            }
            if format == Format::Json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&reports).unwrap_or_default()
                );
            } else if reports.is_empty() {
                eprintln!("no table has a maintenance policy: see `maintenance:` in docs/lake.md");
            } else {
                for r in &reports {
                    println!("{}: {}", r.table, output::maintenance_summary(r));
                }
            }
            Ok(0)
        }
        Command::Table {
            command: TableCommand::Checkpoint { name, format },
        } => {
            let lake = open_lake(&cli.project)?;
            let version = lake.checkpoint(&name).await?;
            output::print_record(
                serde_json::json!({ "table": name, "version": version }),
                format == Format::Json,
                &format!("{name}: checkpoint written at version {version}"),
            );
            Ok(0)
        }
        Command::Table {
            command:
                TableCommand::Restore {
                    name,
                    version,
                    format,
                },
        } => {
            let lake = open_lake(&cli.project)?;
            let m = lake.restore(&name, version).await?;
            output::print_record(
                serde_json::to_value(&m).unwrap_or_default(),
                format == Format::Json,
                &format!(
                    "{name}: restored version {} as version {} ({} files restored, {} removed)",
                    m.restored_version, m.version, m.files_restored, m.files_removed
                ),
            );
            Ok(0)
        }
        Command::Demo {
            dir,
            format,
            postgres,
            lake,
        } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from("weir-demo"));
            let created = demo::write_demo(&dir, lake.as_deref())?;
            if let Some(url) = &postgres {
                if let Ok(u) = url::Url::parse(url) {
                    if let Some(pw) = u.password() {
                        weir_common::register_secret(pw);
                    }
                }
                std::env::set_var("WEIR_DEMO_PG_URL", url);
                demo::add_postgres(&dir)?;
            }
            if created {
                eprintln!("wrote the retail demo project to {}", dir.display());
            } else if demo::write_day_two(&dir)? {
                eprintln!(
                    "running the existing demo project in {}: a second day of changes arrived (data/*2024-01-03*)",
                    dir.display()
                );
            } else {
                eprintln!("running the existing demo project in {}", dir.display());
            }
            let project = weir_config::load_project(&dir)?;
            let summary = run_project(&project, RunOptions::default(), progress).await?;
            let code = report(&summary, format);
            if format == Format::Table && code == 0 {
                demo::print_tour(&project, &dir).await?;
            }
            Ok(code)
        }
    }
}

async fn query_error(lake: &weir_lake::Lake, e: datafusion::error::DataFusionError) -> Error {
    let text = e.to_string();
    let mut err = Error::user(format!("query failed: {text}"));
    if text.contains("not found") {
        let tables = lake.list().await.unwrap_or_default();
        err = err.with_hint(format!(
            "tables are named `schema.table`; this lake has: {}",
            tables.join(", ")
        ));
    }
    err
}

/// The project and its state store.
async fn project_and_store(dir: &std::path::Path) -> Result<(weir_config::Project, Store), Error> {
    let project = weir_config::load_project(dir)?;
    let store = Store::open(&project).await?;
    Ok((project, store))
}

async fn run_project(
    project: &weir_config::Project,
    mut opts: RunOptions,
    progress: bool,
) -> Result<RunSummary, Error> {
    let bar = progress.then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.enable_steady_tick(std::time::Duration::from_millis(120));
        b
    });
    let progress_fn: Option<weir_orchestrator::ProgressFn> = bar.clone().map(|b| {
        // Rates are per asset: from the first report of each.
        let starts = std::sync::Mutex::new(std::collections::HashMap::new());
        Arc::new(move |name: &str, p: &weir_core::Progress| {
            let rows = p.rows.load(std::sync::atomic::Ordering::Relaxed);
            let bytes = p.bytes.load(std::sync::atomic::Ordering::Relaxed);
            let secs = match starts.lock() {
                Ok(mut s) => s
                    .entry(name.to_string())
                    .or_insert_with(std::time::Instant::now)
                    .elapsed()
                    .as_secs_f64(),
                Err(_) => 0.0,
            };
            b.set_message(output::progress_line(name, rows, bytes, secs));
        }) as weir_orchestrator::ProgressFn
    });
    opts.progress = progress_fn;
    let summary = weir_orchestrator::run(project, opts).await;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    summary
}

fn report(summary: &RunSummary, format: Format) -> u8 {
    if format == Format::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(summary).unwrap_or_default()
        );
    } else {
        eprint!("{}", output::run_table(summary));
    }
    if summary.ok {
        0
    } else {
        1
    }
}
