//! DataFusion sessions over the lake.

use std::sync::Arc;

use datafusion::catalog::MemorySchemaProvider;
use datafusion::common::TableReference;
use datafusion::prelude::SessionContext;
use weir_common::Error;
use weir_lake::Lake;

/// A session with every lake table registered as `schema.table`.
pub async fn lake_session(lake: &Lake) -> Result<SessionContext, Error> {
    let ctx = weir_lake::new_session();
    for name in lake.list().await? {
        register_table(&ctx, lake, &name).await?;
    }
    // weir's own tables (`_weir.*`) are left out of listings but can be queried.
    if lake.exists("_weir.metrics").await {
        register_table(&ctx, lake, "_weir.metrics").await?;
    }
    Ok(ctx)
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
    table
        .update_datafusion_session(&ctx.state())
        .map_err(|e| weir_lake::delta_error(name, e))?;
    // With the session, the scan takes its Parquet settings: no row-level filter pushdown
    // (DataFusion's default), which reads TPC-H's selective scans faster than decoding
    // with the filter, and file skipping by the log's statistics stays.
    let provider = table
        .table_provider()
        .with_session(Arc::new(ctx.state()))
        .await
        .map_err(|e| Error::internal(format!("table provider for `{name}`: {e}")))?;
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
