//! DataFusion sessions over the lake.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use datafusion::catalog::{MemorySchemaProvider, SchemaProvider, TableProvider};
use datafusion::common::TableReference;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::SessionStateBuilder;
use datafusion::prelude::SessionContext;
use weir_common::Error;
use weir_lake::Lake;

/// A session in which every lake table is `schema.table`. Tables open on first use, so a
/// query over a lake of hundreds of tables reads the logs of the ones it names only.
pub async fn lake_session(lake: &Lake) -> Result<SessionContext, Error> {
    session_over(lake, false).await
}

/// [`lake_session`] for a long-running query (a stream's): each lake table follows the
/// table's new commits, checked at most once a second when a plan scans it, so records
/// are joined with the table as it is when they arrive, not as it was at the start.
pub async fn live_lake_session(lake: &Lake) -> Result<SessionContext, Error> {
    session_over(lake, true).await
}

async fn session_over(lake: &Lake, live: bool) -> Result<SessionContext, Error> {
    let ctx = crate::joinmode::install(weir_lake::new_session());
    ctx.add_optimizer_rule(Arc::new(crate::semijoin::SubqueryJoins));
    if !live {
        // A stream keeps DataFusion's defaults for both, whose memory its state bound
        // counts on.
        let settings = [
            // Batches of 16,384 rows instead of 8,192: each operator's per-batch work is
            // spread over twice the rows (TPC-H 1.5-3% faster).
            ("datafusion.execution.batch_size", "16384"),
            // A hash join on one integer key whose build side's keys span fewer than 8M
            // values finds matches by indexing an array (at most 32 MiB) instead of
            // hashing, however sparse the keys: 3 months of orders join lineitem by an
            // array over all 6M order keys. DataFusion's defaults ask for 15% of the span
            // to be used. TPC-H 5% faster; q4, q5, q17 and q21 20-26%.
            (
                "datafusion.execution.perfect_hash_join_small_build_threshold",
                "8388608",
            ),
        ];
        let state = ctx.state_ref();
        let mut state = state.write();
        for (key, value) in settings {
            state
                .config_mut()
                .options_mut()
                .set(key, value)
                .map_err(|e| Error::internal(format!("{key}: {e}")))?;
        }
    }
    let mut names = lake.list().await?;
    // weir's own tables (`_weir.*`) are left out of listings but can be queried.
    if lake.exists("_weir.metrics").await {
        names.push("_weir.metrics".into());
    }
    let mut schemas: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for name in names {
        if let Some((schema, table)) = name.split_once('.') {
            schemas
                .entry(schema.to_string())
                .or_default()
                .push(table.to_string());
        }
    }
    let catalog = ctx
        .catalog("weir")
        .ok_or_else(|| Error::internal("catalog missing"))?;
    let state = ctx.state();
    for (schema, known) in schemas {
        let provider = LakeSchema {
            lake: lake.clone(),
            schema: schema.clone(),
            known,
            config: state.config().clone(),
            runtime: state.runtime_env().clone(),
            tables: Default::default(),
            live,
        };
        catalog
            .register_schema(&schema, Arc::new(provider))
            .map_err(|e| Error::internal(format!("schema `{schema}`: {e}")))?;
    }
    Ok(ctx)
}

/// Opens the lake tables `sql` names at once, on the runtime's threads, before planning
/// asks for them one by one: reading a table's log is a few milliseconds of work each.
/// Anything `sql` does not resolve to (a typo, a view) is left for planning to report.
pub async fn open_named_tables(ctx: &SessionContext, sql: &str) {
    let state = ctx.state();
    let dialect = state.config().options().sql_parser.dialect;
    let Ok(statement) = state.sql_to_statement(sql, &dialect) else {
        return;
    };
    let Ok(references) = state.resolve_table_references(&statement) else {
        return;
    };
    let Some(catalog) = ctx.catalog("weir") else {
        return;
    };
    let tables: Vec<_> = references
        .into_iter()
        .filter_map(|r| Some((catalog.schema(r.schema()?)?, r.table().to_string())))
        .collect();
    // A few at a time: each opening holds a blocking thread of the runtime while it
    // waits for file reads that need another, so hundreds at once could take every
    // blocking thread and wait forever (seen with the pool bounded to 4 threads).
    use futures::StreamExt;
    futures::stream::iter(tables)
        .map(|(provider, table)| {
            tokio::spawn(async move {
                let _ = provider.table(&table).await;
            })
        })
        .buffer_unordered(OPENING_AT_ONCE)
        .collect::<Vec<_>>()
        .await;
}

/// How many lake tables [`open_named_tables`] opens at once.
const OPENING_AT_ONCE: usize = 8;

/// Registers lake table `table` in `ctx` as `name` (replacing what had that name), at its
/// current version.
pub async fn register_lake_table(
    ctx: &SessionContext,
    lake: &Lake,
    table: &str,
    name: &str,
) -> Result<(), Error> {
    let t = lake.open_existing(table).await?;
    t.update_datafusion_session(&ctx.state())
        .map_err(|e| weir_lake::delta_error(table, e))?;
    let provider = t
        .table_provider()
        .await
        .map_err(|e| Error::internal(format!("table provider for `{table}`: {e}")))?;
    let _ = ctx.deregister_table(name);
    ctx.register_table(name, provider)
        .map(|_| ())
        .map_err(|e| Error::internal(format!("registering `{table}`: {e}")))
}

/// A schema of the lake: its tables open when a query first names them; tables
/// registered in the session (re-registered after a write, views) take precedence.
struct LakeSchema {
    lake: Lake,
    schema: String,
    /// The lake's tables in this schema when the session started.
    known: Vec<String>,
    /// What a scan needs from the session (kept apart from it: the session holds this).
    config: datafusion::prelude::SessionConfig,
    runtime: Arc<datafusion::execution::runtime_env::RuntimeEnv>,
    tables: RwLock<HashMap<String, Arc<dyn TableProvider>>>,
    /// Tables follow new commits ([`Live`]).
    live: bool,
}

impl std::fmt::Debug for LakeSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LakeSchema")
            .field("schema", &self.schema)
            .field("known", &self.known)
            .finish()
    }
}

#[async_trait::async_trait]
impl SchemaProvider for LakeSchema {
    fn table_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.known.clone();
        if let Ok(t) = self.tables.read() {
            names.extend(t.keys().filter(|k| !self.known.contains(k)).cloned());
        }
        names
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        if let Some(t) = self.tables.read().ok().and_then(|t| t.get(name).cloned()) {
            return Ok(Some(t));
        }
        if !self.known.iter().any(|k| k == name) {
            return Ok(None);
        }
        let full = format!("{}.{name}", self.schema);
        let external = |e: Error| DataFusionError::External(Box::new(e));
        let started = std::time::Instant::now();
        let table = self.lake.open_existing(&full).await.map_err(external)?;
        let opened = started.elapsed();
        let mut provider = provider_for(&self.config, &self.runtime, &table, &full)
            .await
            .map_err(external)?;
        tracing::debug!(
            log_ms = opened.as_secs_f64() * 1e3,
            scan_ms = (started.elapsed() - opened).as_secs_f64() * 1e3,
            "opened `{full}`"
        );
        if self.live {
            provider = Arc::new(Live {
                lake: self.lake.clone(),
                name: full.clone(),
                config: self.config.clone(),
                runtime: self.runtime.clone(),
                schema: provider.schema(),
                current: std::sync::Mutex::new(LiveState {
                    version: table.version(),
                    provider,
                    checked: std::time::Instant::now(),
                }),
            });
        }
        if let Ok(mut t) = self.tables.write() {
            t.entry(name.to_string())
                .or_insert_with(|| provider.clone());
        }
        Ok(Some(provider))
    }

    fn register_table(
        &self,
        name: String,
        table: Arc<dyn TableProvider>,
    ) -> DfResult<Option<Arc<dyn TableProvider>>> {
        let mut t = self
            .tables
            .write()
            .map_err(|_| DataFusionError::Internal("lake schema lock poisoned".into()))?;
        Ok(t.insert(name, table))
    }

    fn deregister_table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        let mut t = self
            .tables
            .write()
            .map_err(|_| DataFusionError::Internal("lake schema lock poisoned".into()))?;
        Ok(t.remove(name))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.known.iter().any(|k| k == name)
            || self.tables.read().is_ok_and(|t| t.contains_key(name))
    }
}

/// A lake table that follows its new commits: a scan first checks (at most once a
/// second) whether the table has a newer version, and scans that one. A version whose
/// columns differ from the planned ones is not taken (the plan was made for those
/// columns); the stream keeps the last version that fits and says so once.
struct Live {
    lake: Lake,
    name: String,
    config: datafusion::prelude::SessionConfig,
    runtime: Arc<datafusion::execution::runtime_env::RuntimeEnv>,
    schema: arrow::datatypes::SchemaRef,
    current: std::sync::Mutex<LiveState>,
}

struct LiveState {
    version: Option<u64>,
    provider: Arc<dyn TableProvider>,
    checked: std::time::Instant,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").field("name", &self.name).finish()
    }
}

impl Live {
    fn inner(&self) -> Arc<dyn TableProvider> {
        match self.current.lock() {
            Ok(c) => c.provider.clone(),
            Err(p) => p.into_inner().provider.clone(),
        }
    }

    /// The provider of the table's newest version that fits the plan.
    async fn latest(&self) -> DfResult<Arc<dyn TableProvider>> {
        let (version, stale) = match self.current.lock() {
            Ok(c) => (
                c.version,
                c.checked.elapsed() >= std::time::Duration::from_secs(1),
            ),
            Err(_) => return Ok(self.inner()),
        };
        if !stale {
            return Ok(self.inner());
        }
        let external = |e: Error| DataFusionError::External(Box::new(e));
        let table = self
            .lake
            .open_existing(&self.name)
            .await
            .map_err(external)?;
        let mut fresh = None;
        if table.version() != version {
            let provider = provider_for(&self.config, &self.runtime, &table, &self.name)
                .await
                .map_err(external)?;
            if provider.schema().fields() == self.schema.fields() {
                tracing::info!(table = %self.name, version = ?table.version(), "reading the table's new version");
                fresh = Some(provider);
            } else {
                tracing::warn!(table = %self.name, version = ?table.version(), "the table's columns changed; the running query keeps reading the version it was planned with");
            }
        }
        if let Ok(mut c) = self.current.lock() {
            c.checked = std::time::Instant::now();
            c.version = table.version();
            if let Some(p) = fresh {
                c.provider = p;
            }
            return Ok(c.provider.clone());
        }
        Ok(self.inner())
    }
}

#[async_trait::async_trait]
impl TableProvider for Live {
    fn schema(&self) -> arrow::datatypes::SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> datafusion::datasource::TableType {
        datafusion::datasource::TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&datafusion::prelude::Expr],
    ) -> DfResult<Vec<datafusion::logical_expr::TableProviderFilterPushDown>> {
        self.inner().supports_filters_pushdown(filters)
    }

    async fn scan(
        &self,
        state: &dyn datafusion::catalog::Session,
        projection: Option<&Vec<usize>>,
        filters: &[datafusion::prelude::Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        self.latest()
            .await?
            .scan(state, projection, filters, limit)
            .await
    }
}

/// A provider for the loaded `table` that scans with the session's settings (given apart
/// from the session, which will hold the provider).
async fn provider_for(
    config: &datafusion::prelude::SessionConfig,
    runtime: &Arc<datafusion::execution::runtime_env::RuntimeEnv>,
    table: &deltalake::DeltaTable,
    name: &str,
) -> Result<Arc<dyn TableProvider>, Error> {
    let session = SessionStateBuilder::new()
        .with_config(config.clone())
        .with_runtime_env(runtime.clone())
        .build();
    table
        .update_datafusion_session(&session)
        .map_err(|e| weir_lake::delta_error(name, e))?;
    let views = config.options().execution.parquet.schema_force_view_types;
    if let Some(scan) = crate::scan::LakeScan::try_new(table, views) {
        return Ok(Arc::new(scan));
    }
    // With the session, the scan takes its Parquet settings: no row-level filter pushdown
    // (DataFusion's default), which reads TPC-H's selective scans faster than decoding
    // with the filter, and file skipping by the log's statistics stays.
    let inner = table
        .table_provider()
        .with_session(Arc::new(session))
        .await
        .map_err(|e| Error::internal(format!("table provider for `{name}`: {e}")))?;
    Ok(Arc::new(WithColumnStats { inner }))
}

/// A lake table whose scans report every column's min, max and null count from the Delta
/// log. delta-rs reports them only for the columns a query filters on, and without them
/// DataFusion takes each join key's distinct count to be the row count: it then misjudges
/// join sizes and builds hash tables on the larger side (TPC-H q18: 6M rows instead of 57).
/// A condition that holds for every row (`c IS NULL OR c IS NOT NULL`) on each column
/// makes the scan carry them; it removes no file and no row.
#[derive(Debug)]
struct WithColumnStats {
    inner: Arc<dyn TableProvider>,
}

#[async_trait::async_trait]
impl TableProvider for WithColumnStats {
    fn schema(&self) -> arrow::datatypes::SchemaRef {
        self.inner.schema()
    }

    fn table_type(&self) -> datafusion::datasource::TableType {
        self.inner.table_type()
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&datafusion::prelude::Expr],
    ) -> DfResult<Vec<datafusion::logical_expr::TableProviderFilterPushDown>> {
        self.inner.supports_filters_pushdown(filters)
    }

    async fn scan(
        &self,
        state: &dyn datafusion::catalog::Session,
        projection: Option<&Vec<usize>>,
        filters: &[datafusion::prelude::Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        use datafusion::prelude::{col, Expr};
        let mut all: Vec<Expr> = filters.to_vec();
        let schema = self.inner.schema();
        let fields = projection
            .map(|p| p.iter().map(|i| schema.field(*i)).collect::<Vec<_>>())
            .unwrap_or_else(|| schema.fields().iter().map(|f| f.as_ref()).collect());
        for f in fields {
            if f.data_type().is_nested() {
                continue;
            }
            let c = col(datafusion::common::Column::from_name(f.name()));
            all.push(c.clone().is_null().or(c.is_not_null()));
        }
        self.inner.scan(state, projection, &all, limit).await
    }
}

/// Registers (or re-registers) one lake table in `ctx`.
pub async fn register_table(ctx: &SessionContext, lake: &Lake, name: &str) -> Result<(), Error> {
    let (schema, _) = name
        .split_once('.')
        .ok_or_else(|| Error::internal(format!("bad table name {name}")))?;
    ensure_schema(ctx, schema)?;
    let table = lake.open_existing(name).await?;
    register_provider(ctx, &table, name, TableReference::from(name)).await
}

/// Registers the loaded `table` (lake table `name`, at whatever version it was loaded)
/// as `target`, replacing what was registered there.
pub(crate) async fn register_provider(
    ctx: &SessionContext,
    table: &deltalake::DeltaTable,
    name: &str,
    target: TableReference,
) -> Result<(), Error> {
    let state = ctx.state();
    let provider = provider_for(state.config(), state.runtime_env(), table, name).await?;
    let _ = ctx.deregister_table(target.clone());
    ctx.register_table(target, provider)
        .map_err(|e| Error::internal(format!("registering `{name}`: {e}")))?;
    Ok(())
}

/// Makes sure schema `name` exists in the session's catalog.
pub fn ensure_schema(ctx: &SessionContext, name: &str) -> Result<(), Error> {
    let catalog = ctx
        .catalog("weir")
        .ok_or_else(|| Error::internal("catalog missing"))?;
    if catalog.schema(name).is_none() {
        catalog
            .register_schema(name, Arc::new(MemorySchemaProvider::new()))
            .map_err(|e| Error::internal(format!("schema `{name}`: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_lake::{WriteOptions, WriteSpec};

    async fn write(lake: &Lake, table: &str, sql: &str) {
        let ctx = weir_lake::new_session();
        let df = ctx.sql(sql).await.unwrap();
        lake.write(
            table,
            &ctx,
            df,
            &WriteSpec::default(),
            &WriteOptions::default(),
        )
        .await
        .unwrap();
    }

    /// The rows of `sql`, as a table.
    async fn text(ctx: &SessionContext, sql: &str) -> String {
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string()
    }

    #[tokio::test]
    async fn a_join_on_sparse_integer_keys_indexes_an_array_and_answers_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path().to_str().unwrap());
        // 2,000 keys spread over 6M values (a use of 0.03%), some null; 300,000 facts.
        let keys = "SELECT CASE WHEN value % 100 = 0 THEN NULL ELSE value * 2999 END AS k \
                    FROM generate_series(1, 2000)";
        let facts = "SELECT (value * 7919) % 6000000 AS k, value AS v \
                     FROM generate_series(1, 300000)";
        write(&lake, "raw.keys", keys).await;
        write(&lake, "raw.facts", facts).await;
        let query =
            "SELECT count(*) AS n, sum(f.v) AS s FROM raw.keys k JOIN raw.facts f ON k.k = f.k";
        let ctx = lake_session(&lake).await.unwrap();
        let plan = text(&ctx, &format!("EXPLAIN ANALYZE {query}")).await;
        assert!(plan.contains("array_map_created_count=1"), "{plan}");

        // The same rows in memory, in a session with DataFusion's defaults, which hash.
        let plain = SessionContext::new();
        text(&plain, &format!("CREATE TABLE keys AS {keys}")).await;
        text(&plain, &format!("CREATE TABLE facts AS {facts}")).await;
        let plain_query = query.replace("raw.", "");
        let plain_plan = text(&plain, &format!("EXPLAIN ANALYZE {plain_query}")).await;
        assert!(
            plain_plan.contains("array_map_created_count=0"),
            "{plain_plan}"
        );
        let expected = text(&plain, &plain_query).await;
        assert_eq!(text(&ctx, query).await, expected);
        assert!(
            !expected.contains("| 0 "),
            "the join matches rows:\n{expected}"
        );
    }
}
