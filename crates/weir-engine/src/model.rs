//! Rendering model SQL with minijinja: `ref()`, `source()`, `config()`, `is_incremental()`,
//! `this`, `var()`, `surrogate_key()`, and for star schemas `as_of()`, `unknown_key()` and
//! `date_dimension()`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind, UndefinedBehavior};
use weir_common::Error;
use weir_config::{ModelConfig, ModelFile, Project};

/// A model after rendering.
#[derive(Debug, Clone)]
pub struct CompiledModel {
    pub name: String,
    /// `schema.table` the model materializes to.
    pub table: String,
    pub sql: String,
    pub config: ModelConfig,
    /// Models named by `ref()`.
    pub refs: Vec<String>,
    /// Tables named by `source()`, as `schema.table`.
    pub sources: Vec<String>,
    pub tags: Vec<String>,
    pub description: Option<String>,
}

/// How to render: while building the graph (`is_incremental()` false), or for a run.
#[derive(Debug, Clone, Default)]
pub struct RenderMode {
    pub is_incremental: bool,
    /// The partition being built; for a partitioned model without one, the last complete
    /// partition (what a plain `weir run` builds).
    pub partition: Option<weir_config::PartitionWindow>,
}

/// The partition a run of `model` builds: `key`, or the last complete one.
pub fn partition_window(
    model: &ModelFile,
    key: Option<&str>,
) -> Result<Option<weir_config::PartitionWindow>, Error> {
    let Some(parts) = model
        .properties
        .as_ref()
        .and_then(|p| p.partitions.as_ref())
    else {
        return Ok(None);
    };
    parts
        .resolve(key, chrono::Utc::now().naive_utc())
        .map(Some)
        .map_err(|e| e.context(format!("model `{}`", model.name)))
}

#[derive(Default)]
struct Collected {
    refs: Vec<String>,
    sources: Vec<String>,
    config: Option<BTreeMap<String, serde_json::Value>>,
}

/// Renders one model. `tables` maps every model name to its `schema.table`.
pub fn render_model(
    project: &Project,
    model: &ModelFile,
    tables: &BTreeMap<String, String>,
    mode: RenderMode,
) -> Result<CompiledModel, Error> {
    let collected = Arc::new(Mutex::new(Collected::default()));
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);

    let c = collected.clone();
    let known = tables.clone();
    let file = model.file.display().to_string();
    let this_model = model.name.clone();
    env.add_function("ref", move |name: String| -> Result<String, minijinja::Error> {
        match known.get(&name) {
            Some(t) => {
                lock(&c).refs.push(name);
                Ok(t.clone())
            }
            None => {
                let names: Vec<String> = known.keys().cloned().collect();
                let hint = match weir_config::closest(&name, &names) {
                    Some(best) => format!("did you mean `{best}`?"),
                    None => "models are named after their .sql files under models/".to_string(),
                };
                Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("model `{this_model}` ({file}) refers to unknown model `{name}`; hint: {hint}"),
                ))
            }
        }
    });
    let c = collected.clone();
    env.add_function(
        "source",
        move |schema: String, table: String| -> Result<String, minijinja::Error> {
            let t = format!("{schema}.{table}");
            lock(&c).sources.push(t.clone());
            Ok(t)
        },
    );
    let c = collected.clone();
    env.add_function(
        "config",
        move |kwargs: Kwargs| -> Result<String, minijinja::Error> {
            let mut map = BTreeMap::new();
            for key in kwargs.args() {
                let v: Value = kwargs.get(key)?;
                let json = serde_json::to_value(&v).map_err(|e| {
                    minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string())
                })?;
                map.insert(key.to_string(), json);
            }
            lock(&c).config = Some(map);
            Ok(String::new())
        },
    );
    let incremental = mode.is_incremental;
    env.add_function("is_incremental", move || incremental);
    // A stable key from columns: `{{ surrogate_key('customer_id', 'valid_from') }}` or a list.
    env.add_function(
        "surrogate_key",
        |cols: minijinja::value::Rest<Value>| -> Result<String, minijinja::Error> {
            let mut names = Vec::new();
            for v in cols.iter() {
                match v.as_str() {
                    Some(s) => names.push(s.to_string()),
                    None => {
                        for item in v.try_iter()? {
                            names.push(item.as_str().map(str::to_string).ok_or_else(|| {
                                minijinja::Error::new(
                                    ErrorKind::InvalidOperation,
                                    "surrogate_key() takes column names",
                                )
                            })?);
                        }
                    }
                }
            }
            if names.is_empty() {
                return Err(minijinja::Error::new(
                    ErrorKind::MissingArgument,
                    "surrogate_key() needs at least one column, e.g. surrogate_key('customer_id')",
                ));
            }
            Ok(crate::scd::hash_expr(&names))
        },
    );
    env.add_function("as_of", as_of);
    env.add_function("unknown_key", || {
        format!("'{}'", weir_config::UNKNOWN_MEMBER)
    });
    env.add_function("date_dimension", date_dimension);
    let vars = project.config.vars.clone();
    env.add_function("var", move |name: String, default: Option<Value>| -> Result<Value, minijinja::Error> {
        match vars.get(&name) {
            Some(v) => Ok(Value::from_serialize(v)),
            None => default.ok_or_else(|| {
                minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("var `{name}` is not set; hint: add it under `vars:` in weir.yaml or pass a default: var('{name}', 'x')"),
                )
            }),
        }
    });

    let props = model.properties.as_ref();
    let base = props.map(|p| p.config()).unwrap_or_default();
    // `this` needs the schema, which `config(schema=...)` may change: render twice when so.
    let mut table = table_name(project, model, &base);
    let partition = match mode.partition {
        Some(p) => Some(p),
        None => partition_window(model, None)?,
    };
    let mut sql = render(&env, model, &table, partition.as_ref())?;
    let inline = lock(&collected).config.take();
    let mut config = base;
    if let Some(map) = inline {
        let text = serde_json::Value::Object(map.into_iter().collect());
        let inline: ModelConfig = serde_json::from_value(text).map_err(|e| {
            Error::user(format!(
                "invalid config(...) in {}: {e}",
                model.file.display()
            ))
            .with_hint(
                "valid keys: materialized, unique_key, partition_by, incremental_strategy, schema, tracked, change_ts, deletes, delete_flag, surrogate_key, unknown_member, inferred_members",
            )
        })?;
        config = merge(config, inline);
        let t2 = table_name(project, model, &config);
        if t2 != table {
            table = t2;
            *lock(&collected) = Collected::default();
            sql = render(&env, model, &table, partition.as_ref())?;
        }
    }
    let got = std::mem::take(&mut *lock(&collected));
    weir_config::validate_table_name(&table, &model.file)?;
    Ok(CompiledModel {
        name: model.name.clone(),
        table,
        sql,
        config,
        refs: dedup(got.refs),
        sources: dedup(got.sources),
        tags: props.map(|p| p.tags.clone()).unwrap_or_default(),
        description: props.and_then(|p| p.description.clone()),
    })
}

/// `as_of('c', 'o.ordered_at')`: the join condition that picks the version of type 2
/// dimension `c` valid at the time `o.ordered_at` (valid_from inclusive, valid_to
/// exclusive, an open version valid until further notice).
fn as_of(alias: String, time: String) -> Result<String, minijinja::Error> {
    if alias.is_empty() || !alias.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("as_of() takes the dimension's alias first, e.g. as_of('c', 'o.ordered_at'), not `{alias}`"),
        ));
    }
    Ok(format!(
        "({time} >= {alias}.valid_from and ({alias}.valid_to is null or {time} < {alias}.valid_to))"
    ))
}

/// `date_dimension('2024-01-01', '2026-12-31')`: a query with one row per day.
fn date_dimension(start: String, end: String) -> Result<String, minijinja::Error> {
    let parse = |s: &str| {
        chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").map_err(|_| {
            minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("date_dimension() takes dates as 'YYYY-MM-DD', not `{s}`"),
            )
        })
    };
    let (a, b) = (parse(&start)?, parse(&end)?);
    if b < a {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("date_dimension(): the end {b} is before the start {a}"),
        ));
    }
    Ok(format!(
        "select cast(to_char(d, '%Y%m%d') as int) as date_key, d as date, \
           cast(date_part('year', d) as int) as year, \
           cast(date_part('quarter', d) as int) as quarter, \
           cast(date_part('month', d) as int) as month, \
           to_char(d, '%B') as month_name, \
           cast(date_part('day', d) as int) as day_of_month, \
           cast(date_part('doy', d) as int) as day_of_year, \
           cast(case when date_part('dow', d) = 0 then 7 else date_part('dow', d) end as int) as day_of_week, \
           to_char(d, '%A') as day_name, \
           cast(date_part('week', d) as int) as week_of_year, \
           date_part('dow', d) in (0, 6) as is_weekend, \
           cast(date_trunc('month', d) as date) as first_day_of_month, \
           cast(date_trunc('month', d) + interval '1 month' - interval '1 day' as date) as last_day_of_month \
         from unnest(generate_series(date '{a}', date '{b}', interval '1 day')) as t(d)"
    ))
}

fn lock(c: &Mutex<Collected>) -> std::sync::MutexGuard<'_, Collected> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

fn dedup(mut v: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    v.retain(|x| seen.insert(x.clone()));
    v
}

fn merge(base: ModelConfig, over: ModelConfig) -> ModelConfig {
    ModelConfig {
        materialized: over.materialized.or(base.materialized),
        unique_key: if over.unique_key.is_empty() {
            base.unique_key
        } else {
            over.unique_key
        },
        partition_by: if over.partition_by.is_empty() {
            base.partition_by
        } else {
            over.partition_by
        },
        incremental_strategy: over.incremental_strategy.or(base.incremental_strategy),
        schema: over.schema.or(base.schema),
        delete_flag: over.delete_flag.or(base.delete_flag),
        tracked: if over.tracked.is_empty() {
            base.tracked
        } else {
            over.tracked
        },
        change_ts: over.change_ts.or(base.change_ts),
        deletes: over.deletes.or(base.deletes),
        surrogate_key: over.surrogate_key.or(base.surrogate_key),
        unknown_member: over.unknown_member.or(base.unknown_member),
        inferred_members: over.inferred_members.or(base.inferred_members),
    }
}

/// `schema.table` of a model: config schema, else its folder, else the project default.
pub fn table_name(project: &Project, model: &ModelFile, config: &ModelConfig) -> String {
    let schema = config
        .schema
        .clone()
        .or_else(|| model.folder_schema.clone())
        .unwrap_or_else(|| project.config.models.schema.clone());
    format!("{schema}.{}", model.name)
}

fn render(
    env: &Environment<'_>,
    model: &ModelFile,
    this: &str,
    partition: Option<&weir_config::PartitionWindow>,
) -> Result<String, Error> {
    let ctx = match partition {
        Some(p) => minijinja::context! {
            this => this,
            partition_key => p.key,
            partition_start => p.start.clone().unwrap_or_else(|| p.key.clone()),
            partition_end => p.end.clone().unwrap_or_else(|| p.key.clone()),
        },
        None => minijinja::context! { this => this },
    };
    env.render_str(&model.sql, ctx).map_err(|e| {
        let detail = e
            .detail()
            .map(|d| d.to_string())
            .unwrap_or_else(|| e.to_string());
        // Errors raised by our functions carry their own hint.
        let (msg, hint) = match detail.split_once("; hint: ") {
            Some((m, h)) => (m.to_string(), Some(h.to_string())),
            None => (detail, None),
        };
        let place = match e.line() {
            Some(l) => format!("{}:{l}", model.file.display()),
            None => model.file.display().to_string(),
        };
        let mut err = if msg.contains(&model.file.display().to_string()) {
            Error::user(msg)
        } else {
            Error::user(format!("{place}: {msg}"))
        };
        if let Some(h) = hint {
            err = err.with_hint(h);
        }
        err
    })
}
