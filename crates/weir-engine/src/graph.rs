//! The asset graph: pipelines and models, edges from `ref()`/`source()` and sink tables.
//! It orders runs and resolves selectors (`name`, `+name`, `name+`, `tag:x`).

use std::collections::{BTreeMap, BTreeSet};

use weir_common::Error;
use weir_config::Project;

use crate::model::{render_model, table_name, CompiledModel, RenderMode};

#[derive(Debug, Clone)]
pub enum AssetKind {
    /// Index into `project.pipelines`.
    Pipeline(usize),
    Model(Box<CompiledModel>),
}

#[derive(Debug, Clone)]
pub struct Asset {
    /// Pipeline or model name.
    pub name: String,
    /// The table it writes (`schema.table`).
    pub table: String,
    pub kind: AssetKind,
    pub tags: Vec<String>,
    /// Indices of the assets this one reads.
    pub deps: Vec<usize>,
}

/// Assets in dependency order: every asset comes after all of its dependencies.
#[derive(Debug, Clone)]
pub struct Graph {
    pub assets: Vec<Asset>,
}

impl Graph {
    /// Compiles the project's models and orders all assets.
    pub fn build(project: &Project) -> Result<Graph, Error> {
        let mut tables = BTreeMap::new();
        for m in &project.models {
            let cfg = m
                .properties
                .as_ref()
                .map(|p| p.config())
                .unwrap_or_default();
            tables.insert(m.name.clone(), table_name(project, m, &cfg));
        }
        let mut assets = Vec::new();
        for (i, p) in project.pipelines.iter().enumerate() {
            assets.push(Asset {
                name: p.name.clone(),
                table: p.config.sink.table.clone(),
                kind: AssetKind::Pipeline(i),
                tags: p.config.tags.clone(),
                deps: vec![],
            });
        }
        for m in &project.models {
            let compiled = render_model(project, m, &tables, RenderMode::default())?;
            tables.insert(m.name.clone(), compiled.table.clone());
            assets.push(Asset {
                name: m.name.clone(),
                table: compiled.table.clone(),
                tags: compiled.tags.clone(),
                kind: AssetKind::Model(Box::new(compiled)),
                deps: vec![],
            });
        }
        // A ref resolved with the properties-file schema may change when config() sets one:
        // re-render once with the final table names.
        for a in assets.iter_mut() {
            if let AssetKind::Model(m) = &mut a.kind {
                let file = project
                    .models
                    .iter()
                    .find(|f| f.name == m.name)
                    .ok_or_else(|| Error::internal("model vanished"))?;
                let again = render_model(project, file, &tables, RenderMode::default())?;
                **m = again;
            }
        }
        let mut by_table: BTreeMap<String, usize> = BTreeMap::new();
        for (i, a) in assets.iter().enumerate() {
            if let Some(j) = by_table.insert(a.table.clone(), i) {
                return Err(Error::user(format!(
                    "`{}` and `{}` both write table `{}`",
                    assets[j].name, a.name, a.table
                ))
                .with_hint("each table has one writer; change a sink table or a model's schema"));
            }
        }
        let by_name: BTreeMap<String, usize> = assets
            .iter()
            .enumerate()
            .map(|(i, a)| (a.name.clone(), i))
            .collect();
        #[allow(clippy::needless_range_loop)] // the body reads one asset and writes another
        for i in 0..assets.len() {
            let mut deps = BTreeSet::new();
            if let AssetKind::Model(m) = &assets[i].kind {
                for r in &m.refs {
                    if let Some(&j) = by_name.get(r) {
                        deps.insert(j);
                    }
                }
                for s in &m.sources {
                    if let Some(&j) = by_table.get(s) {
                        deps.insert(j);
                    }
                }
                // A dimension's inferred members come from a model or a table.
                if let Some(x) = &m.config.inferred_members {
                    if let Some(&j) = by_name.get(x).or_else(|| by_table.get(x)) {
                        deps.insert(j);
                    }
                }
            }
            if let AssetKind::Pipeline(p) = &assets[i].kind {
                if let Some(x) = &project.pipelines[*p].config.sink.inferred_members {
                    if let Some(&j) = by_name.get(x).or_else(|| by_table.get(x)) {
                        deps.insert(j);
                    }
                }
                let src = &project.pipelines[*p].config.source;
                if src.kind == weir_config::SourceKind::Lake {
                    if let Some(j) = src.table.as_ref().and_then(|t| by_table.get(t)) {
                        deps.insert(*j);
                    }
                }
            }
            deps.remove(&i);
            assets[i].deps = deps.into_iter().collect();
            if let AssetKind::Model(m) = &assets[i].kind {
                if m.refs.contains(&m.name) {
                    return Err(cycle_error(&[m.name.clone(), m.name.clone()]));
                }
            }
        }
        let order = topo_order(&assets)?;
        // Reindex in topological order.
        let mut pos = vec![0; assets.len()];
        for (new, &old) in order.iter().enumerate() {
            pos[old] = new;
        }
        let mut sorted: Vec<Asset> = order.iter().map(|&i| assets[i].clone()).collect();
        for a in sorted.iter_mut() {
            a.deps = a.deps.iter().map(|&d| pos[d]).collect();
        }
        Ok(Graph { assets: sorted })
    }

    pub fn find(&self, name: &str) -> Option<usize> {
        self.assets
            .iter()
            .position(|a| a.name == name || a.table == name)
    }

    fn closure(&self, start: usize, up: bool) -> BTreeSet<usize> {
        let mut out = BTreeSet::new();
        let mut stack = vec![start];
        while let Some(i) = stack.pop() {
            if !out.insert(i) {
                continue;
            }
            if up {
                stack.extend(self.assets[i].deps.iter().copied());
            } else {
                stack.extend((0..self.assets.len()).filter(|&j| self.assets[j].deps.contains(&i)));
            }
        }
        out
    }

    /// Asset indices chosen by a selector, in run order. `None` selects everything.
    /// Terms are separated by spaces or commas and united: `name`, `+name` (with
    /// upstream), `name+` (with downstream), `tag:x`.
    pub fn select(&self, selector: Option<&str>) -> Result<Vec<usize>, Error> {
        let Some(sel) = selector.map(str::trim).filter(|s| !s.is_empty()) else {
            return Ok((0..self.assets.len()).collect());
        };
        let mut chosen = BTreeSet::new();
        for term in sel.split([',', ' ']).filter(|t| !t.is_empty()) {
            if let Some(tag) = term.strip_prefix("tag:") {
                let hits: Vec<usize> = (0..self.assets.len())
                    .filter(|&i| self.assets[i].tags.iter().any(|t| t == tag))
                    .collect();
                if hits.is_empty() {
                    return Err(Error::user(format!("no asset has tag `{tag}`")));
                }
                chosen.extend(hits);
                continue;
            }
            let up = term.starts_with('+');
            let down = term.ends_with('+') && term.len() > 1;
            let name = term.trim_start_matches('+').trim_end_matches('+');
            let Some(i) = self.find(name) else {
                let names: Vec<String> = self.assets.iter().map(|a| a.name.clone()).collect();
                let hint = match weir_config::closest(name, &names) {
                    Some(b) => format!("did you mean `{b}`?"),
                    None => format!("known assets: {}", names.join(", ")),
                };
                return Err(
                    Error::user(format!("no pipeline or model named `{name}`")).with_hint(hint)
                );
            };
            chosen.insert(i);
            if up {
                chosen.extend(self.closure(i, true));
            }
            if down {
                chosen.extend(self.closure(i, false));
            }
        }
        Ok(chosen.into_iter().collect())
    }
}

fn topo_order(assets: &[Asset]) -> Result<Vec<usize>, Error> {
    let n = assets.len();
    let mut indeg: Vec<usize> = assets.iter().map(|a| a.deps.len()).collect();
    let mut order = Vec::with_capacity(n);
    let mut ready: BTreeSet<usize> = (0..n).filter(|&i| indeg[i] == 0).collect();
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for j in 0..n {
            if assets[j].deps.contains(&i) {
                indeg[j] -= 1;
                if indeg[j] == 0 {
                    ready.insert(j);
                }
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    // Walk dependencies from a stuck node until one repeats: that loop is a cycle.
    let stuck: BTreeSet<usize> = (0..n).filter(|i| !order.contains(i)).collect();
    let mut path = vec![*stuck.iter().next().unwrap_or(&0)];
    loop {
        let last = *path.last().unwrap_or(&0);
        let Some(&next) = assets[last].deps.iter().find(|d| stuck.contains(d)) else {
            break;
        };
        if let Some(p) = path.iter().position(|&x| x == next) {
            let mut cycle: Vec<String> =
                path[p..].iter().map(|&i| assets[i].name.clone()).collect();
            cycle.push(assets[next].name.clone());
            return Err(cycle_error(&cycle));
        }
        path.push(next);
    }
    Err(cycle_error(
        &stuck
            .iter()
            .map(|&i| assets[i].name.clone())
            .collect::<Vec<_>>(),
    ))
}

fn cycle_error(names: &[String]) -> Error {
    let chain = names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(" -> ");
    Error::user(format!("models form a cycle: {chain}"))
        .with_hint("a model cannot depend on itself, directly or through others; remove one ref()")
}
