//! Connecting to PostgreSQL from a named connection, with errors sorted into the user's
//! mistakes (wrong password, unknown database: fail at once) and the network's (refused,
//! dropped: retried).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, NoTls};
use weir_common::Error;
use weir_config::{ConnectionConfig, SslMode};

/// The driver config of connection `name`. Passwords are registered as secrets, so they
/// are redacted from anything weir prints.
pub fn config(name: &str, c: &ConnectionConfig) -> Result<Config, Error> {
    // Values whose environment variable was unset when the project loaded.
    for v in [&c.url, &c.host, &c.database, &c.user, &c.password]
        .into_iter()
        .flatten()
    {
        if let Some(start) = v.find("${env:") {
            let var = v[start + 6..].split('}').next().unwrap_or_default().trim();
            return Err(Error::user(format!(
                "environment variable `{var}` is not set (used by connection `{name}` in weir.yaml)"
            ))
            .with_hint(format!("export {var}=... before running weir")));
        }
    }
    let mut cfg = match &c.url {
        Some(url) => {
            if let Ok(u) = url::Url::parse(url) {
                if let Some(pw) = u.password() {
                    weir_common::register_secret(pw);
                }
            }
            Config::from_str(url).map_err(|e| {
                Error::user(format!(
                    "connection `{name}`: invalid url: {}",
                    weir_common::redact(&e.to_string())
                ))
                .with_hint("write postgresql://user:password@host:5432/database")
            })?
        }
        None => Config::new(),
    };
    if let Some(h) = &c.host {
        cfg.host(h);
    }
    if let Some(p) = c.port {
        cfg.port(p);
    }
    if let Some(d) = &c.database {
        cfg.dbname(d);
    }
    if let Some(u) = &c.user {
        cfg.user(u);
    }
    if let Some(p) = &c.password {
        weir_common::register_secret(p);
        cfg.password(p);
    }
    if cfg.get_hosts().is_empty() {
        cfg.host("localhost");
    }
    if cfg.get_user().is_none() {
        return Err(Error::user(format!("connection `{name}` has no user"))
            .with_hint("set `user:` or put it in the url"));
    }
    cfg.ssl_mode(match c.sslmode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        SslMode::Require => tokio_postgres::config::SslMode::Require,
    });
    cfg.connect_timeout(c.connect_timeout.unwrap_or(Duration::from_secs(10)));
    cfg.application_name("weir");
    Ok(cfg)
}

/// Opens a client; the connection runs on its own task until the client is dropped.
pub async fn connect(name: &str, c: &ConnectionConfig) -> Result<Client, Error> {
    let cfg = config(name, c)?;
    let client = if c.sslmode == SslMode::Disable {
        let (client, connection) = cfg
            .connect(NoTls)
            .await
            .map_err(|e| classify(name, "connecting", e))?;
        tokio::spawn(watch(connection));
        client
    } else {
        let (client, connection) = cfg
            .connect(tls())
            .await
            .map_err(|e| classify(name, "connecting", e))?;
        tokio::spawn(watch(connection));
        client
    };
    Ok(client)
}

async fn watch<F: std::future::Future<Output = Result<(), tokio_postgres::Error>>>(connection: F) {
    if let Err(e) = connection.await {
        tracing::debug!(error = %weir_common::redact(&e.to_string()), "postgres connection ended");
    }
}

/// TLS as libpq's `prefer` and `require` do it: the session is encrypted, the server's
/// certificate is not verified (that is what `verify-full` is for).
fn tls() -> tokio_postgres_rustls::MakeRustlsConnect {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
                .with_no_client_auth()
        })
        .unwrap_or_else(|_| {
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        });
    tokio_postgres_rustls::MakeRustlsConnect::new(config)
}

/// Accepts any server certificate, checking only that its signatures are well formed.
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Sorts a driver error into user (no retry) and external (retry) failures.
pub fn classify(name: &str, doing: &str, e: tokio_postgres::Error) -> Error {
    let text = weir_common::redact(&e.to_string());
    let detail = e
        .as_db_error()
        .map(|d| weir_common::redact(d.message()))
        .unwrap_or_else(|| {
            let mut s = text.clone();
            let mut src = std::error::Error::source(&e);
            while let Some(inner) = src {
                s = format!("{s}: {}", weir_common::redact(&inner.to_string()));
                src = inner.source();
            }
            s
        });
    let msg = format!("postgres `{name}`: {doing}: {detail}");
    match e.code() {
        Some(c)
            if *c == SqlState::INVALID_PASSWORD
                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
        {
            Error::user(msg).with_hint("check the user and password of the connection in weir.yaml")
        }
        Some(c) if *c == SqlState::INVALID_CATALOG_NAME => {
            Error::user(msg).with_hint("check `database:` of the connection")
        }
        Some(c)
            if *c == SqlState::UNDEFINED_TABLE
                || *c == SqlState::UNDEFINED_COLUMN
                || *c == SqlState::SYNTAX_ERROR
                || *c == SqlState::INSUFFICIENT_PRIVILEGE
                || *c == SqlState::UNDEFINED_FUNCTION
                || *c == SqlState::DATATYPE_MISMATCH =>
        {
            Error::user(msg).with_hint("check the table, query and columns named in the pipeline")
        }
        // Server shutting down, backend terminated, too many connections, serialization
        // failures: worth another try.
        Some(_) => Error::external(msg),
        None => Error::external(msg),
    }
}

/// Quotes an identifier, or a dotted `schema.table`, for SQL.
pub fn quote_ident(name: &str) -> String {
    name.split('.')
        .map(|p| format!("\"{}\"", p.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".")
}

/// Quotes a string literal for SQL.
pub fn quote_literal(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

/// Connects and returns the server's version line, for `weir connections test`.
pub async fn check(name: &str, c: &ConnectionConfig) -> Result<String, Error> {
    let client = connect(name, c).await?;
    let row = client
        .query_one(
            "select current_setting('server_version'), current_database(), current_user",
            &[],
        )
        .await
        .map_err(|e| classify(name, "querying", e))?;
    let (version, db, user): (String, String, String) = (row.get(0), row.get(1), row.get(2));
    Ok(format!("PostgreSQL {version}, database {db} as {user}"))
}
