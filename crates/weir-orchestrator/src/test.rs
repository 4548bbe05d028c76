//! `weir test`: the declared checks over published tables.

use weir_common::Error;
use weir_config::{CheckKind, CheckSpec, Project, SinkKind};
use weir_engine::checks::{last_load_freshness, run_checks, CheckResult};
use weir_engine::graph::{AssetKind, Graph};
use weir_engine::session::lake_session;
use weir_lake::Lake;

/// Runs the checks of the selected assets over their tables, in dependency order.
pub async fn test(project: &Project, selector: Option<&str>) -> Result<Vec<CheckResult>, Error> {
    let graph = Graph::build(project)?;
    let selected = graph.select(selector)?;
    let lake = Lake::for_project(project);
    let ctx = lake_session(&lake).await?;
    let mut out = Vec::new();
    for i in selected {
        let asset = &graph.assets[i];
        let checks: &[CheckSpec] = match &asset.kind {
            AssetKind::Pipeline(p) => {
                let cfg = &project.pipelines[*p].config;
                if cfg.sink.kind != SinkKind::Delta {
                    continue;
                }
                &cfg.checks
            }
            AssetKind::Model(m) => project
                .models
                .iter()
                .find(|f| f.name == m.name)
                .and_then(|f| f.properties.as_ref())
                .map(|p| p.checks.as_slice())
                .unwrap_or(&[]),
        };
        if checks.is_empty() {
            continue;
        }
        if !lake.exists(&asset.table).await {
            return Err(Error::user(format!(
                "`{}` has checks but its table `{}` has not been built",
                asset.name, asset.table
            ))
            .with_hint(format!("run `weir run +{}` first", asset.name)));
        }
        out.extend(run_checks(&ctx, &asset.name, &asset.table, checks).await?);
        for c in checks
            .iter()
            .filter(|c| c.check == CheckKind::Freshness && c.column.is_none())
        {
            let last = lake.last_commit_time(&asset.table).await?;
            out.push(last_load_freshness(&asset.name, &asset.table, c, last));
        }
    }
    Ok(out)
}
