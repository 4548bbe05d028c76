//! Test support: real servers started for the tests that need them.
//!
//! [`PgServer`] is a throwaway PostgreSQL cluster made from the installed server binaries
//! (`initdb`, `pg_ctl`): its own temporary directory, a free loopback port, logical WAL on.
//! [`PgServer::shared`] gives every test in a test binary the same cluster; a watchdog
//! stops it when the test process ends, however it ends.
//!
//! [`S3Server`] is an S3-compatible server on loopback (moto's server mode, in memory),
//! with one bucket, for the tests that run the lake on object storage.
//!
//! [`KafkaBroker`] is a Kafka-protocol broker on loopback (tansu, in memory);
//! [`KafkaBroker::behind_tls`] puts one behind a [`TlsProxy`], and
//! [`KafkaBroker::with_scram_user`] starts one that requires SASL SCRAM.
//!
//! [`SlowLink`] forwards to one of them at a rate the test sets (a slow sink on purpose).

mod kafka;
mod pg;
mod s3;
mod slow;
mod tls;

pub use kafka::KafkaBroker;
pub use pg::PgServer;
pub use s3::S3Server;
pub use slow::SlowLink;
pub use tls::TlsProxy;

/// Serves `listener` (non-blocking, on loopback) from a thread of its own until the test
/// process ends: each connection is handed to `handle`, concurrently.
pub(crate) fn serve_connections<F, Fut>(listener: std::net::TcpListener, handle: F)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(handle(client));
            }
        });
    });
}
