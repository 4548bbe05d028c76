//! Running blocking work (file decoding, SQLite) off the async runtime.

use crate::Error;

/// Runs `f` on tokio's blocking pool; `what` names it if the task itself dies.
pub async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(format!("{what} task failed: {e}")))?
}
