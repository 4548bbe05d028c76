//! A TLS endpoint on loopback in front of a plain TCP server (the test broker): it ends
//! TLS with a certificate for 127.0.0.1 that the `openssl` command makes for it, and
//! forwards the bytes both ways. Clients trust [`TlsProxy::ca_file`].

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Makes a self-signed certificate for `name` (`alt`: its subjectAltName, such as
/// `IP:127.0.0.1`) and its key, with the `openssl` command.
pub(crate) fn self_signed(key: &Path, cert: &Path, name: &str, alt: &str) -> Result<(), String> {
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .arg("-subj")
        .arg(format!("/CN={name}"))
        .arg("-addext")
        .arg(format!("subjectAltName={alt}"))
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(cert)
        .output()
        .map_err(|e| format!("openssl: {e}"))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(format!(
            "openssl req: {}",
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

/// A running TLS endpoint; it serves until the test process ends.
pub struct TlsProxy {
    port: u16,
    dir: tempfile::TempDir,
}

impl TlsProxy {
    /// Binds a free loopback port (known before the server behind it starts, so that
    /// server can advertise it); [`TlsProxy::forward`] starts serving.
    pub fn bind() -> Result<(TlsProxy, TcpListener), String> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        self_signed(
            &dir.path().join("key.pem"),
            &dir.path().join("cert.pem"),
            "127.0.0.1",
            "IP:127.0.0.1",
        )?;
        Ok((TlsProxy { port, dir }, listener))
    }

    /// Serves TLS on `listener`, forwarding each connection to 127.0.0.1:`upstream`.
    pub fn forward(&self, listener: TcpListener, upstream: u16) -> Result<(), String> {
        let certs = CertificateDer::pem_file_iter(self.ca_file())
            .and_then(|c| c.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("certificate: {e}"))?;
        let key = PrivateKeyDer::from_pem_file(self.dir.path().join("key.pem"))
            .map_err(|e| format!("key: {e}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| e.to_string())?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        crate::serve_connections(listener, move |client| {
            let acceptor = acceptor.clone();
            async move {
                // A client that fails the handshake (it does not trust the certificate)
                // is dropped.
                let Ok(mut tls) = acceptor.accept(client).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            }
        });
        Ok(())
    }

    /// `127.0.0.1:PORT`, for `bootstrap.servers` with `security.protocol: ssl`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The certificate to trust (self-signed, for IP 127.0.0.1).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }
}
