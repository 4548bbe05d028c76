//! Freshness SLAs and alerts: which assets are late, and a JSON POST to the project's
//! webhook for every failed run and every missed SLA.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;
use serde_json::json;
use weir_common::Error;
use weir_config::Project;
use weir_engine::{AssetKind, Graph};

use crate::store::{now_ms, Store};
use crate::{AssetStatus, RunSummary};

/// One asset's state for `weir status`.
#[derive(Debug, Clone, Serialize)]
pub struct AssetState {
    pub name: String,
    pub kind: String,
    pub table: String,
    /// The last finished attempt's status (`succeeded`, `failed`), if any.
    pub last_status: Option<String>,
    pub last_run: Option<String>,
    /// Milliseconds since the epoch.
    pub last_success_at: Option<i64>,
    pub freshness_sla_secs: Option<u64>,
    /// `ok`, `late` (SLA missed), `failing` (last attempt failed), `never` (never built).
    pub state: String,
}

/// The freshness SLA an asset declares.
pub fn sla(project: &Project, kind: &AssetKind) -> Option<Duration> {
    match kind {
        AssetKind::Pipeline(p) => project.pipelines[*p].config.freshness_sla,
        AssetKind::Model(m) => {
            project
                .models
                .iter()
                .find(|f| f.name == m.name)?
                .properties
                .as_ref()?
                .freshness_sla
        }
    }
}

/// Every asset's last status, last success and SLA state at `now_ms`.
pub async fn status(project: &Project, store: &Store, now: i64) -> Result<Vec<AssetState>, Error> {
    let graph = Graph::build(project)?;
    let latest = store.latest_assets().await?;
    let success: HashMap<String, i64> = store.last_success().await?.into_iter().collect();
    Ok(graph
        .assets
        .iter()
        .map(|a| {
            let last = latest.iter().find(|r| r.asset == a.name);
            let ok_at = success.get(&a.name).copied();
            let sla = sla(project, &a.kind);
            let late = match (sla, ok_at) {
                (Some(s), Some(t)) => now - t > s.as_millis() as i64,
                (Some(_), None) => true,
                _ => false,
            };
            let state = if late {
                "late"
            } else if last.is_some_and(|l| l.status == "failed") {
                "failing"
            } else if ok_at.is_none() {
                "never"
            } else {
                "ok"
            };
            AssetState {
                name: a.name.clone(),
                kind: match a.kind {
                    AssetKind::Pipeline(_) => "pipeline",
                    AssetKind::Model(_) => "model",
                }
                .into(),
                table: a.table.clone(),
                last_status: last.map(|l| l.status.clone()),
                last_run: last.map(|l| l.run_id.clone()),
                last_success_at: ok_at,
                freshness_sla_secs: sla.map(|s| s.as_secs()),
                state: state.into(),
            }
        })
        .collect())
}

/// POSTs `body` to the project's webhook, if one is configured. Delivery problems are
/// logged, never raised: an alert must not fail the run it reports.
pub async fn send(project: &Project, body: serde_json::Value) {
    let Some(url) = &project.config.alerts.webhook else {
        return;
    };
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "alert client");
            return;
        }
    };
    let res = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await;
    match res {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => {
            tracing::warn!(status = %r.status(), url = %weir_common::redact(url), "the alert webhook refused an alert")
        }
        Err(e) => {
            tracing::warn!(error = %weir_common::redact(&e.to_string()), "the alert webhook is unreachable")
        }
    }
}

/// The alert for a failed run.
pub async fn run_failed(project: &Project, summary: &RunSummary) {
    if summary.ok || project.config.alerts.webhook.is_none() {
        return;
    }
    let failed: Vec<serde_json::Value> = summary
        .assets
        .iter()
        .filter(|a| a.status == AssetStatus::Failed)
        .map(|a| json!({"asset": a.name, "error": a.error, "domain": a.error_domain, "attempts": a.attempts}))
        .collect();
    send(
        project,
        json!({
            "event": "run_failed",
            "project": project.config.name,
            "run_id": summary.run_id,
            "trigger": summary.trigger,
            "failed": failed,
            "skipped": summary.assets.iter().filter(|a| a.status == AssetStatus::Skipped).map(|a| a.name.clone()).collect::<Vec<_>>(),
        }),
    )
    .await;
}

/// Alerts for assets whose SLA is missed, once per miss (a new success re-arms it).
pub async fn check_freshness(project: &Project, store: &Store) -> Result<usize, Error> {
    let now = now_ms();
    let mut sent = 0;
    for a in status(project, store, now).await? {
        if a.state != "late" {
            continue;
        }
        let key = format!("alert:freshness:{}", a.name);
        let marker = a.last_success_at.unwrap_or(0).to_string();
        if store.get_state(&key).await?.as_deref() == Some(marker.as_str()) {
            continue;
        }
        send(
            project,
            json!({
                "event": "freshness_missed",
                "project": project.config.name,
                "asset": a.name,
                "table": a.table,
                "last_success_at": a.last_success_at,
                "freshness_sla_secs": a.freshness_sla_secs,
            }),
        )
        .await;
        store.set_state(&key, &marker).await?;
        sent += 1;
    }
    Ok(sent)
}
