//! The `postgres` sink: rows are copied (binary COPY) into a temporary staging table, then
//! moved into the target by one statement per mode, all in one transaction together with
//! the pipeline's position in `weir.positions`. A failure anywhere leaves the target and
//! the position as they were; a replay of a committed load is recognised and skipped.

use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use futures::stream::BoxStream;
use futures::{SinkExt, StreamExt};
use weir_common::Error;
use weir_config::{ConnectionConfig, SchemaEvolution, WriteMode};

use super::conn::{classify, connect, quote_ident};
use super::encode;

/// What a write into PostgreSQL did.
#[derive(Debug, Clone, Default)]
pub struct PgMetrics {
    pub inserted: u64,
    pub updated: u64,
    pub deleted: u64,
    /// The load had already been committed: nothing was written.
    pub skipped: bool,
}

/// How rows are written.
#[derive(Debug, Clone)]
pub struct PgWrite {
    pub mode: WriteMode,
    pub key: Vec<String>,
    pub delete_flag: Option<String>,
    pub evolution: SchemaEvolution,
    /// With `Overwrite`: replace only the rows matching this SQL predicate.
    pub replace_where: Option<String>,
}

pub struct PgSink {
    conn_name: String,
    conn: ConnectionConfig,
    table: String,
}

const POSITIONS_DDL: &str = "create schema if not exists weir; \
    create table if not exists weir.positions (pipeline text primary key, version bigint not null, \
    position jsonb, committed_at timestamptz not null default now())";

/// Bytes of COPY data sent at a time.
const COPY_CHUNK: usize = 1 << 20;

impl PgSink {
    pub fn new(conn_name: &str, conn: ConnectionConfig, table: &str) -> Self {
        Self {
            conn_name: conn_name.to_string(),
            conn,
            table: table.to_string(),
        }
    }

    fn err<'a>(&'a self, doing: &'a str) -> impl Fn(tokio_postgres::Error) -> Error + 'a {
        move |e| classify(&self.conn_name, doing, e)
    }

    /// The last committed load of `app`: its version and position.
    pub async fn committed(&self, app: &str) -> Result<(i64, Option<serde_json::Value>), Error> {
        let client = connect(&self.conn_name, &self.conn).await?;
        let exists: bool = client
            .query_one("select to_regclass('weir.positions') is not null", &[])
            .await
            .map_err(self.err("reading the committed position"))?
            .get(0);
        if !exists {
            return Ok((0, None));
        }
        let row = client
            .query_opt(
                "select version, position::text from weir.positions where pipeline = $1",
                &[&app],
            )
            .await
            .map_err(self.err("reading the committed position"))?;
        Ok(match row {
            None => (0, None),
            Some(r) => {
                let text: Option<String> = r.get(1);
                (r.get(0), text.and_then(|t| serde_json::from_str(&t).ok()))
            }
        })
    }

    /// Loads `rows` (of `schema`) as load `n` of `app`, with `position`, in one transaction.
    pub async fn write(
        &self,
        schema: SchemaRef,
        mut rows: BoxStream<'_, Result<RecordBatch, Error>>,
        w: &PgWrite,
        app: &str,
        n: i64,
        position: &serde_json::Value,
    ) -> Result<PgMetrics, Error> {
        let mut client = connect(&self.conn_name, &self.conn).await?;
        client
            .batch_execute(POSITIONS_DDL)
            .await
            .map_err(self.err("creating weir.positions"))?;
        let tx = client
            .transaction()
            .await
            .map_err(self.err("starting a transaction"))?;
        // Lock this pipeline's position row; a committed replay is skipped.
        tx.execute(
            "insert into weir.positions (pipeline, version) values ($1, 0) on conflict do nothing",
            &[&app],
        )
        .await
        .map_err(self.err("locking the position"))?;
        let done: i64 = tx
            .query_one(
                "select version from weir.positions where pipeline = $1 for update",
                &[&app],
            )
            .await
            .map_err(self.err("locking the position"))?
            .get(0);
        if done >= n {
            return Ok(PgMetrics {
                skipped: true,
                ..Default::default()
            });
        }

        let flag = w.delete_flag.as_deref();
        let data_cols: Vec<&arrow::datatypes::Field> = schema
            .fields()
            .iter()
            .map(|f| f.as_ref())
            .filter(|f| Some(f.name().as_str()) != flag)
            .collect();
        let target = quote_ident(&self.table);
        let existing = self.target_columns(&tx).await?;
        if existing.is_empty() {
            self.create_target(&tx, &data_cols, w).await?;
        } else {
            self.evolve_target(&tx, &data_cols, &existing, w.evolution)
                .await?;
        }
        let types = self.target_columns(&tx).await?;

        // Stage.
        let mut stage_cols = Vec::new();
        for f in schema.fields() {
            let t = encode::wire_type(f.data_type()).ok_or_else(|| {
                Error::user(format!(
                    "column `{}` ({}) cannot be written to PostgreSQL",
                    f.name(),
                    f.data_type()
                ))
                .with_hint("cast it in the transform, e.g. to text")
            })?;
            stage_cols.push(format!("{} {t}", quote_ident(f.name())));
        }
        tx.batch_execute(&format!(
            "create temp table weir_stage ({}) on commit drop",
            stage_cols.join(", ")
        ))
        .await
        .map_err(self.err("creating the staging table"))?;
        let copy = tx
            .copy_in("copy weir_stage from stdin (format binary)")
            .await
            .map_err(self.err("starting COPY"))?;
        futures::pin_mut!(copy);
        let mut buf = encode::header();
        while let Some(batch) = rows.next().await {
            let batch = batch?;
            encode::encode_batch(&batch, &mut buf)
                .map_err(|e| Error::user(format!("loading into {}: {e}", self.table)))?;
            if buf.len() >= COPY_CHUNK {
                copy.send(bytes::Bytes::from(std::mem::take(&mut buf)))
                    .await
                    .map_err(self.err("copying rows"))?;
            }
        }
        buf.extend(encode::trailer());
        copy.send(bytes::Bytes::from(buf))
            .await
            .map_err(self.err("copying rows"))?;
        copy.as_mut()
            .finish()
            .await
            .map_err(self.err("copying rows"))?;

        // Move into the target.
        let names: Vec<String> = data_cols.iter().map(|f| quote_ident(f.name())).collect();
        let select: Vec<String> = data_cols
            .iter()
            .map(|f| {
                let t = types
                    .iter()
                    .find(|(n, _)| n == f.name())
                    .map(|(_, t)| t.clone())
                    .unwrap_or_else(|| "text".into());
                format!("s.{}::{t}", quote_ident(f.name()))
            })
            .collect();
        let live = match flag {
            Some(f) => format!("where s.{} is not true", quote_ident(f)),
            None => String::new(),
        };
        let mut m = PgMetrics::default();
        let insert = format!(
            "insert into {target} ({}) select {} from weir_stage s {live}",
            names.join(", "),
            select.join(", ")
        );
        match w.mode {
            WriteMode::Append => {
                m.inserted = tx
                    .execute(&insert, &[])
                    .await
                    .map_err(self.err("inserting"))?;
            }
            WriteMode::Overwrite => {
                let only = match &w.replace_where {
                    Some(p) => format!(" where {p}"),
                    None => String::new(),
                };
                m.deleted = tx
                    .execute(&format!("delete from {target}{only}"), &[])
                    .await
                    .map_err(self.err("replacing the table"))?;
                m.inserted = tx
                    .execute(&insert, &[])
                    .await
                    .map_err(self.err("inserting"))?;
            }
            WriteMode::Merge => {
                let keys: Vec<String> = w.key.iter().map(|k| quote_ident(k)).collect();
                if let Some(f) = flag {
                    let on: Vec<String> = keys.iter().map(|k| format!("t.{k} = s.{k}")).collect();
                    m.deleted = tx
                        .execute(
                            &format!(
                                "delete from {target} t using weir_stage s where {} and s.{} is true",
                                on.join(" and "),
                                quote_ident(f)
                            ),
                            &[],
                        )
                        .await
                        .map_err(self.err("deleting flagged keys"))?;
                }
                let updates: Vec<String> = names
                    .iter()
                    .filter(|n| !keys.contains(n))
                    .map(|n| format!("{n} = excluded.{n}"))
                    .collect();
                let action = if updates.is_empty() {
                    "do nothing".to_string()
                } else {
                    format!("do update set {}", updates.join(", "))
                };
                let row = tx
                    .query_one(
                        &format!(
                            "with w as ({insert} on conflict ({}) {action} returning (xmax = 0) as fresh) \
                             select count(*) filter (where fresh), count(*) filter (where not fresh) from w",
                            keys.join(", ")
                        ),
                        &[],
                    )
                    .await
                    .map_err(|e| {
                        let err = self.err("upserting")(e);
                        if err.message.contains("no unique or exclusion constraint") {
                            err.with_hint(format!(
                                "merge needs a primary key or unique index on ({}) in {}",
                                w.key.join(", "),
                                self.table
                            ))
                        } else {
                            err
                        }
                    })?;
                m.inserted = row.get::<_, i64>(0) as u64;
                m.updated = row.get::<_, i64>(1) as u64;
            }
            WriteMode::ReplacePartitions
            | WriteMode::Scd1
            | WriteMode::Scd2
            | WriteMode::Scd3
            | WriteMode::Snapshot => {
                return Err(
                    Error::user(format!("a postgres sink does not support `{}`", w.mode))
                        .with_hint("use append, overwrite or merge"),
                );
            }
        }
        tx.execute(
            "update weir.positions set version = $2, position = $3::text::jsonb, committed_at = now() where pipeline = $1",
            &[&app, &n, &position.to_string()],
        )
        .await
        .map_err(self.err("recording the position"))?;
        tx.commit().await.map_err(self.err("committing"))?;
        Ok(m)
    }

    /// The target's columns and their types, empty when it does not exist.
    async fn target_columns(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
    ) -> Result<Vec<(String, String)>, Error> {
        let rows = tx
            .query(
                "select a.attname::text, format_type(a.atttypid, a.atttypmod) from pg_attribute a \
                 where a.attrelid = to_regclass($1) and a.attnum > 0 and not a.attisdropped order by a.attnum",
                &[&quote_ident(&self.table)],
            )
            .await
            .map_err(self.err("describing the target"))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn create_target(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        cols: &[&arrow::datatypes::Field],
        w: &PgWrite,
    ) -> Result<(), Error> {
        let mut defs = Vec::new();
        for f in cols {
            let t = encode::column_type(f).ok_or_else(|| {
                Error::user(format!(
                    "column `{}` ({}) has no PostgreSQL type",
                    f.name(),
                    f.data_type()
                ))
            })?;
            let not_null = if f.is_nullable() || f.data_type() == &DataType::Null {
                ""
            } else {
                " not null"
            };
            defs.push(format!("{} {t}{not_null}", quote_ident(f.name())));
        }
        if w.mode == WriteMode::Merge && !w.key.is_empty() {
            let keys: Vec<String> = w.key.iter().map(|k| quote_ident(k)).collect();
            defs.push(format!("primary key ({})", keys.join(", ")));
        }
        if let Some((schema, _)) = self.table.split_once('.') {
            tx.batch_execute(&format!(
                "create schema if not exists {}",
                quote_ident(schema)
            ))
            .await
            .map_err(self.err("creating the schema"))?;
        }
        tx.batch_execute(&format!(
            "create table {} ({})",
            quote_ident(&self.table),
            defs.join(", ")
        ))
        .await
        .map_err(self.err("creating the target table"))
    }

    async fn evolve_target(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        cols: &[&arrow::datatypes::Field],
        existing: &[(String, String)],
        evolution: SchemaEvolution,
    ) -> Result<(), Error> {
        let new: Vec<&&arrow::datatypes::Field> = cols
            .iter()
            .filter(|f| !existing.iter().any(|(n, _)| n == f.name()))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        if evolution == SchemaEvolution::Strict {
            return Err(Error::user(format!(
                "new column(s) {} are not in {} and schema_evolution is `strict`",
                new.iter()
                    .map(|f| format!("`{}`", f.name()))
                    .collect::<Vec<_>>()
                    .join(", "),
                self.table
            ))
            .with_hint("set `schema_evolution: add_columns` on the sink"));
        }
        for f in new {
            let t = encode::column_type(f).unwrap_or_else(|| "text".into());
            tx.batch_execute(&format!(
                "alter table {} add column {} {t}",
                quote_ident(&self.table),
                quote_ident(f.name())
            ))
            .await
            .map_err(self.err("adding a column"))?;
        }
        Ok(())
    }
}
