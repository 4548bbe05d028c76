//! `weir serve`: the scheduler, workers that execute queued runs, and a small HTTP API
//! (health, runs, assets, schedules) on one port.
//!
//! ```text
//!  schedules, sensors ──tick every second──► queue (state store) ──claim──► workers
//!                                              ▲                              │
//!  POST /api/runs ─────────────────────────────┘        runs, assets ◄────────┘
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use weir_common::{Domain, Error};
use weir_config::Project;
use weir_engine::{AssetKind, Graph};
use weir_orchestrator::schedule::{self, Schedule, Sensors};
use weir_orchestrator::store::{RunRecord, Store};
use weir_orchestrator::worker::{self, OnRunDone, WorkerOptions};

/// How `weir serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address of the HTTP API (port 0 picks a free one).
    pub bind: SocketAddr,
    /// Runs executed at once.
    pub workers: usize,
    /// Run no schedules or sensors (an API and workers only).
    pub no_schedules: bool,
}

struct App {
    project: Project,
    store: Store,
    graph: Graph,
    schedules: Vec<Schedule>,
}

/// Serves until `shutdown` completes; workers finish their current run first. Calls
/// `ready` with the bound address once the API listens.
pub async fn serve(
    project: Project,
    store: Store,
    opts: ServeOptions,
    ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_done: Arc<OnRunDone>,
) -> Result<(), Error> {
    let graph = Graph::build(&project)?;
    let schedules = schedule::schedules(&project);
    for s in &schedules {
        graph
            .select(s.select.as_deref())
            .map_err(|e| e.context(format!("schedule `{}`", s.name)))?;
    }
    for s in &project.config.sensors {
        graph
            .select(s.select.as_deref())
            .map_err(|e| e.context(format!("sensor `{}`", s.name)))?;
    }
    let app = Arc::new(App {
        project,
        store,
        graph,
        schedules,
    });
    let listener = tokio::net::TcpListener::bind(opts.bind)
        .await
        .map_err(|e| Error::user(format!("cannot listen on {}: {e}", opts.bind)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("the server socket", e))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    let mut tasks = Vec::new();
    if !opts.no_schedules {
        let (app, mut stop) = (app.clone(), stop_rx.clone());
        tasks.push(tokio::spawn(async move {
            let mut sensors = Sensors::new();
            let mut pass: u64 = 0;
            loop {
                // Freshness SLAs every ten seconds.
                if pass.is_multiple_of(10) {
                    if let Err(e) =
                        weir_orchestrator::alert::check_freshness(&app.project, &app.store).await
                    {
                        tracing::error!(error = %e, "freshness check failed");
                    }
                }
                pass += 1;
                let now = chrono::Utc::now();
                if let Err(e) = schedule::tick(&app.project, &app.store, &app.schedules, now).await
                {
                    tracing::error!(error = %e, "scheduler pass failed");
                }
                if let Err(e) = sensors.tick(&app.project, &app.store, now).await {
                    tracing::error!(error = %e, "sensor pass failed");
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => return,
                }
            }
        }));
    }
    for _ in 0..opts.workers.max(1) {
        let (app, stop, on_done) = (app.clone(), stop_rx.clone(), on_done.clone());
        tasks.push(tokio::spawn(async move {
            let opts = WorkerOptions {
                drain: false,
                max_runs: None,
                poll: Duration::from_millis(500),
                only: None,
            };
            if let Err(e) = worker::work(&app.project, &app.store, opts, &stop, &*on_done).await {
                tracing::error!(error = %e, "worker stopped");
            }
        }));
    }

    let router = Router::new()
        .route("/health", get(health))
        .route("/api/runs", get(list_runs).post(create_run))
        .route("/api/runs/{id}", get(show_run))
        .route("/api/assets", get(assets))
        .route("/api/schedules", get(list_schedules))
        .route("/api/status", get(asset_status))
        .with_state(app.clone());
    ready(addr);
    let server = axum::serve(listener, router).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    server
        .await
        .map_err(|e| Error::external(format!("http server: {e}")))?;
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

/// Errors as JSON with a status that says whose fault it was.
struct ApiError(StatusCode, String);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match e.domain {
            Domain::User if e.message.starts_with("no run") => StatusCode::NOT_FOUND,
            Domain::User => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.render())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1.trim_end() }))).into_response()
    }
}

async fn health(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    let version = app.store.schema_version().await?;
    Ok(Json(json!({
        "status": "ok",
        "project": app.project.config.name,
        "store": app.store.describe(),
        "schema_version": version,
        "assets": app.graph.assets.len(),
        "schedules": app.schedules.len(),
    })))
}

#[derive(Deserialize)]
struct RunsQuery {
    limit: Option<usize>,
    status: Option<String>,
}

async fn list_runs(
    State(app): State<Arc<App>>,
    Query(q): Query<RunsQuery>,
) -> Result<Json<Value>, ApiError> {
    let runs = app
        .store
        .list_runs(q.limit.unwrap_or(50).min(1000), q.status.as_deref())
        .await?;
    Ok(Json(json!(runs)))
}

async fn show_run(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let run = app.store.find_run(&id).await?;
    let assets = app.store.assets(&run.id).await?;
    Ok(Json(json!({ "run": run, "assets": assets })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NewRun {
    select: Option<String>,
    #[serde(default)]
    full_refresh: bool,
    run_key: Option<String>,
    /// The partition partitioned assets build.
    partition: Option<String>,
}

async fn create_run(
    State(app): State<Arc<App>>,
    body: Option<Json<NewRun>>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req = body.map(|b| b.0).unwrap_or_default();
    let selected = app.graph.select(req.select.as_deref())?;
    if let Some(key) = &req.partition {
        weir_orchestrator::check_partition(&app.project, &app.graph, &selected, key)?;
    }
    let mut run = RunRecord::new(&app.project.config.name, "api");
    run.partition = req.partition;
    run.selector = req.select;
    run.full_refresh = req.full_refresh;
    run.run_key = req.run_key;
    if weir_orchestrator::enqueue(&app.store, &run).await? {
        Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "id": run.id, "status": "queued" })),
        ))
    } else {
        Ok((
            StatusCode::CONFLICT,
            Json(json!({ "error": "a run with this run_key exists already" })),
        ))
    }
}

async fn assets(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    let latest = app.store.latest_assets().await?;
    let success: std::collections::HashMap<String, i64> =
        app.store.last_success().await?.into_iter().collect();
    let out: Vec<Value> = app
        .graph
        .assets
        .iter()
        .map(|a| {
            let last = latest.iter().find(|r| r.asset == a.name);
            json!({
                "name": a.name,
                "table": a.table,
                "kind": match a.kind { AssetKind::Pipeline(_) => "pipeline", AssetKind::Model(_) => "model" },
                "deps": a.deps.iter().map(|d| app.graph.assets[*d].name.clone()).collect::<Vec<_>>(),
                "last_status": last.map(|r| r.status.clone()),
                "last_run": last.map(|r| r.run_id.clone()),
                "last_success_at": success.get(&a.name).copied(),
            })
        })
        .collect();
    Ok(Json(json!(out)))
}

async fn list_schedules(State(app): State<Arc<App>>) -> Json<Value> {
    let now = chrono::Utc::now();
    let out: Vec<Value> = app
        .schedules
        .iter()
        .map(|s| {
            json!({
                "name": s.name,
                "cron": s.cron.text,
                "timezone": s.tz.name(),
                "select": s.select,
                "next": s.next_after(now).map(|t| t.to_rfc3339()),
            })
        })
        .collect();
    Json(json!(out))
}

async fn asset_status(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    let states = weir_orchestrator::alert::status(
        &app.project,
        &app.store,
        weir_orchestrator::store::now_ms(),
    )
    .await?;
    Ok(Json(json!(states)))
}
