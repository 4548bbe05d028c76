//! A slow network link on loopback: a TCP forwarder in front of a real server whose
//! client-to-server direction can be held to a rate, and set free again, while it serves.
//! Tests put it in front of the object store to make weir's sink slow on purpose.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A running link; it serves until the test process ends.
pub struct SlowLink {
    port: u16,
    /// Bytes per second from clients to the server; 0 for no limit.
    rate: Arc<AtomicU64>,
}

impl SlowLink {
    /// Forwards a free loopback port to 127.0.0.1:`upstream`, with no limit yet.
    pub fn start(upstream: u16) -> Result<SlowLink, String> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let rate = Arc::new(AtomicU64::new(0));
        let shared = rate.clone();
        crate::serve_connections(listener, move |client| {
            let rate = shared.clone();
            async move {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    return;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let down = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                    let _ = client_write.shutdown().await;
                });
                let _ = up(&mut client_read, &mut server_write, &rate).await;
                let _ = server_write.shutdown().await;
                let _ = down.await;
            }
        });
        Ok(SlowLink { port, rate })
    }

    /// Holds what clients send to `bytes_per_second` from now on; 0 lifts the limit.
    pub fn set_rate(&self, bytes_per_second: u64) {
        self.rate.store(bytes_per_second, Ordering::SeqCst);
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

/// Copies `from` to `to` in chunks of at most 16 KiB, pausing after each for as long as
/// the current rate asks.
async fn up(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    rate: &AtomicU64,
) -> std::io::Result<()> {
    let mut chunk = vec![0u8; 16 << 10];
    loop {
        let n = from.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&chunk[..n]).await?;
        let limit = rate.load(Ordering::SeqCst);
        if limit > 0 {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / limit as f64)).await;
        }
    }
}
