//! One SQL surface over the two state databases: an embedded SQLite file and a shared
//! PostgreSQL server. Statements are written once with `$1`-style parameters, BIGINT and
//! TEXT columns only; the few places where the dialects differ ask [`Db::is_postgres`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use weir_common::Error;

/// A parameter or a column value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(Option<i64>),
    Text(Option<String>),
}

impl Value {
    pub fn int(&self) -> Option<i64> {
        match self {
            Value::Int(v) => *v,
            Value::Text(t) => t.as_deref().and_then(|t| t.parse().ok()),
        }
    }
    pub fn text(&self) -> Option<String> {
        match self {
            Value::Text(v) => v.clone(),
            Value::Int(i) => i.map(|i| i.to_string()),
        }
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(Some(v))
    }
}
impl From<Option<i64>> for Value {
    fn from(v: Option<i64>) -> Self {
        Value::Int(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(Some(v.to_string()))
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(Some(v))
    }
}
impl From<Option<String>> for Value {
    fn from(v: Option<String>) -> Self {
        Value::Text(v)
    }
}
impl From<Option<&str>> for Value {
    fn from(v: Option<&str>) -> Self {
        Value::Text(v.map(str::to_string))
    }
}

pub type Row = Vec<Value>;

#[derive(Clone)]
pub(crate) enum Db {
    Sqlite {
        conn: Arc<Mutex<rusqlite::Connection>>,
        path: PathBuf,
    },
    Postgres(Arc<tokio_postgres::Client>),
}

fn sqlite_error(path: &Path, e: rusqlite::Error) -> Error {
    let busy = matches!(
        &e,
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    );
    let err = Error::external(format!("state store {}: {e}", path.display()));
    if busy {
        err
    } else {
        err.not_retryable()
    }
}

fn pg_error(e: tokio_postgres::Error) -> Error {
    let text = weir_common::redact(&e.to_string());
    let detail = e
        .as_db_error()
        .map(|d| format!(": {}", d.message()))
        .unwrap_or_default();
    Error::external(format!("state store (postgres): {text}{detail}"))
}

/// `$1` -> `?1`: SQLite's numbered parameters.
fn sqlite_sql(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(|n| n.is_ascii_digit()) {
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out
}

impl Db {
    pub fn open_sqlite(path: &Path) -> Result<Db, Error> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display(), e))?;
        }
        let conn = rusqlite::Connection::open(path).map_err(|e| sqlite_error(path, e))?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(|e| sqlite_error(path, e))?;
        // WAL lets readers (`weir runs`) look while a run writes; NORMAL sync keeps the
        // database consistent on power loss, losing at most the last commits.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| sqlite_error(path, e))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| sqlite_error(path, e))?;
        Ok(Db::Sqlite {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_path_buf(),
        })
    }

    pub fn from_postgres(client: tokio_postgres::Client) -> Db {
        Db::Postgres(Arc::new(client))
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Db::Postgres(_))
    }

    pub fn describe(&self) -> String {
        match self {
            Db::Sqlite { path, .. } => format!("sqlite {}", path.display()),
            Db::Postgres(_) => "postgres".into(),
        }
    }

    /// Runs several statements (no parameters) as one transaction.
    pub async fn batch(&self, sql: &str) -> Result<(), Error> {
        match self {
            Db::Sqlite { conn, path } => {
                let (conn, path, sql) = (conn.clone(), path.clone(), sql.to_string());
                weir_common::blocking("state store", move || {
                    let c = conn
                        .lock()
                        .map_err(|_| Error::internal("state store lock"))?;
                    c.execute_batch(&format!("BEGIN IMMEDIATE;\n{sql}\nCOMMIT;"))
                        .map_err(|e| {
                            let _ = c.execute_batch("ROLLBACK");
                            sqlite_error(&path, e)
                        })
                })
                .await
            }
            Db::Postgres(client) => client
                .batch_execute(&format!("BEGIN;\n{sql}\nCOMMIT;"))
                .await
                .map_err(pg_error),
        }
    }

    /// Runs one statement; returns the rows affected.
    pub async fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, Error> {
        match self {
            Db::Sqlite { conn, path } => {
                with_statement(conn, path, sql, params, |stmt, params, path| {
                    stmt.execute(rusqlite::params_from_iter(params.iter()))
                        .map(|n| n as u64)
                        .map_err(|e| sqlite_error(path, e))
                })
                .await
            }
            Db::Postgres(client) => {
                let refs = pg_params(params);
                client.execute(sql, &refs).await.map_err(pg_error)
            }
        }
    }

    /// Runs one statement and returns its rows.
    pub async fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, Error> {
        match self {
            Db::Sqlite { conn, path } => {
                with_statement(conn, path, sql, params, |stmt, params, path| {
                    let n = stmt.column_count();
                    let mut rows = stmt
                        .query(rusqlite::params_from_iter(params.iter()))
                        .map_err(|e| sqlite_error(path, e))?;
                    let mut out = Vec::new();
                    while let Some(r) = rows.next().map_err(|e| sqlite_error(path, e))? {
                        let mut row = Vec::with_capacity(n);
                        for i in 0..n {
                            row.push(match r.get_ref(i).map_err(|e| sqlite_error(path, e))? {
                                rusqlite::types::ValueRef::Null => Value::Int(None),
                                rusqlite::types::ValueRef::Integer(v) => Value::Int(Some(v)),
                                rusqlite::types::ValueRef::Real(v) => Value::Int(Some(v as i64)),
                                rusqlite::types::ValueRef::Text(t)
                                | rusqlite::types::ValueRef::Blob(t) => {
                                    Value::Text(Some(String::from_utf8_lossy(t).into_owned()))
                                }
                            });
                        }
                        out.push(row);
                    }
                    Ok(out)
                })
                .await
            }
            Db::Postgres(client) => {
                let refs = pg_params(params);
                let rows = client.query(sql, &refs).await.map_err(pg_error)?;
                let mut out = Vec::with_capacity(rows.len());
                for r in rows {
                    let mut row = Vec::with_capacity(r.len());
                    for (i, col) in r.columns().iter().enumerate() {
                        let t = col.type_();
                        row.push(if *t == tokio_postgres::types::Type::INT8 {
                            Value::Int(r.try_get::<_, Option<i64>>(i).map_err(pg_error)?)
                        } else if *t == tokio_postgres::types::Type::INT4 {
                            Value::Int(
                                r.try_get::<_, Option<i32>>(i)
                                    .map_err(pg_error)?
                                    .map(i64::from),
                            )
                        } else {
                            Value::Text(r.try_get::<_, Option<String>>(i).map_err(pg_error)?)
                        });
                    }
                    out.push(row);
                }
                Ok(out)
            }
        }
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match self {
            Value::Int(Some(v)) => ToSqlOutput::Borrowed(ValueRef::Integer(*v)),
            Value::Text(Some(t)) => ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes())),
            Value::Int(None) | Value::Text(None) => ToSqlOutput::Borrowed(ValueRef::Null),
        })
    }
}

fn pg_params(params: &[Value]) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    params
        .iter()
        .map(|p| match p {
            Value::Int(v) => v as &(dyn tokio_postgres::types::ToSql + Sync),
            Value::Text(v) => v as &(dyn tokio_postgres::types::ToSql + Sync),
        })
        .collect()
}

/// Runs `f` on a prepared (cached) SQLite statement on the blocking pool.
async fn with_statement<T: Send + 'static>(
    conn: &Arc<Mutex<rusqlite::Connection>>,
    path: &Path,
    sql: &str,
    params: &[Value],
    f: impl FnOnce(&mut rusqlite::CachedStatement<'_>, &[Value], &Path) -> Result<T, Error>
        + Send
        + 'static,
) -> Result<T, Error> {
    let (conn, path, sql, params) = (
        conn.clone(),
        path.to_path_buf(),
        sqlite_sql(sql),
        params.to_vec(),
    );
    weir_common::blocking("state store", move || {
        let c = conn
            .lock()
            .map_err(|_| Error::internal("state store lock"))?;
        let mut stmt = c.prepare_cached(&sql).map_err(|e| sqlite_error(&path, e))?;
        f(&mut stmt, &params, &path)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_parameters_for_sqlite() {
        assert_eq!(
            sqlite_sql("UPDATE t SET a = $1 WHERE b = $12 AND c = '$'"),
            "UPDATE t SET a = ?1 WHERE b = ?12 AND c = '$'"
        );
    }
}
