//! A Kafka-protocol broker on loopback: tansu (from crates.io), with its in-memory storage
//! (or a SQLite file, for the SASL test).
//!
//! `scripts/kafka-broker` installs it once under `~/.cache/weir-tools` and prints its
//! path; `scripts/test` runs it and passes the path in `WEIR_KAFKA_BROKER`.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A running broker.
pub struct KafkaBroker {
    port: u16,
    child: Mutex<Child>,
    /// The directory of its SQLite store, when it has one.
    dir: Option<tempfile::TempDir>,
}

/// How a broker runs.
#[derive(Clone, Default)]
struct Launch {
    /// The port it tells clients to connect to (default: its own).
    advertised: Option<u16>,
    /// A SQLite store in this directory (default: in memory).
    dir: Option<std::path::PathBuf>,
    /// Clients must authenticate (SASL SCRAM).
    authentication: bool,
}

impl KafkaBroker {
    /// One broker for the whole test process, started on first use.
    pub fn shared() -> &'static KafkaBroker {
        static SHARED: OnceLock<KafkaBroker> = OnceLock::new();
        SHARED.get_or_init(|| {
            KafkaBroker::start().unwrap_or_else(|e| panic!("starting the Kafka broker: {e}"))
        })
    }

    /// The broker binary: `WEIR_KAFKA_BROKER`, else where `scripts/kafka-broker` puts it.
    pub fn binary() -> Result<PathBuf, String> {
        let path = match std::env::var_os("WEIR_KAFKA_BROKER") {
            Some(p) => PathBuf::from(p),
            None => {
                let home = std::env::var_os("HOME").ok_or("HOME is not set")?;
                PathBuf::from(home).join(".cache/weir-tools/tansu-0.6.0-weir/bin/tansu")
            }
        };
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "no broker at {}: run scripts/kafka-broker (it installs tansu once)",
                path.display()
            ))
        }
    }

    /// Starts a broker on a free loopback port; it stops with the test process.
    pub fn start() -> Result<KafkaBroker, String> {
        Self::launch(Launch::default())
    }

    /// A broker of its own that requires SASL SCRAM-SHA-512 from every client and knows
    /// one user. tansu creates users only through a running broker (`tansu user create`)
    /// and keeps them in its store, and an authenticating broker lets no one in to create
    /// the first: so a first broker, without authentication, creates the user in a SQLite
    /// store, and a second one serves that store with `--authentication`.
    pub fn with_scram_user(user: &str, password: &str) -> Result<KafkaBroker, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let store = Launch {
            dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        };
        let setup = Self::launch(store.clone())?;
        let out = Command::new(Self::binary()?)
            .args(["user", "create", user, password, "--mechanism", "scram512"])
            .arg("--broker")
            .arg(format!("tcp://{}", setup.bootstrap()))
            .output()
            .map_err(|e| format!("tansu user create: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "tansu user create: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let first = setup.port;
        drop(setup);
        // The store is the first broker's until it has exited.
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", first)).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut broker = Self::launch(Launch {
            authentication: true,
            ..store
        })?;
        broker.dir = Some(dir);
        Ok(broker)
    }

    /// A broker of its own that clients reach through TLS only: it advertises the
    /// proxy's port, so every connection a client makes goes through the proxy.
    pub fn behind_tls() -> Result<(KafkaBroker, crate::TlsProxy), String> {
        let (proxy, listener) = crate::TlsProxy::bind()?;
        let broker = Self::launch(Launch {
            advertised: Some(proxy.port()),
            ..Default::default()
        })?;
        proxy.forward(listener, broker.port)?;
        Ok((broker, proxy))
    }

    fn launch(how: Launch) -> Result<KafkaBroker, String> {
        let bin = Self::binary()?;
        let port = crate::s3::free_port()?;
        let url = format!("tcp://127.0.0.1:{port}");
        let shown = format!("tcp://127.0.0.1:{}", how.advertised.unwrap_or(port));
        let storage = match &how.dir {
            Some(_) => "sqlite://tansu.db",
            None => "memory://tansu/",
        };
        // A shell that stops the broker when this process is gone, however it ends.
        let script = r#"
"$0" broker --listener-url "$1" --advertised-listener-url "$3" \
  --storage-engine "$4" $5 --silent >/dev/null 2>&1 &
broker=$!
trap 'kill "$broker" 2>/dev/null; exit 0' TERM
while kill -0 "$2" 2>/dev/null && kill -0 "$broker" 2>/dev/null; do sleep 1; done
kill "$broker" 2>/dev/null
"#;
        let child = Command::new("sh")
            .args(["-c", script])
            .arg(&bin)
            .arg(&url)
            .arg(std::process::id().to_string())
            .arg(&shown)
            .arg(storage)
            .arg(match how.authentication {
                true => "--authentication",
                false => "",
            })
            .current_dir(how.dir.unwrap_or_else(std::env::temp_dir))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("sh: {e}"))?;
        let broker = KafkaBroker {
            port,
            child: Mutex::new(child),
            dir: None,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = broker.child.lock().map_err(|e| e.to_string())?.try_wait() {
                return Err(format!("the broker exited ({status})"));
            }
            if Instant::now() > deadline {
                return Err("the broker did not listen within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(broker)
    }

    /// `127.0.0.1:PORT`, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        if let Ok(mut c) = self.child.lock() {
            // TERM, which the shell passes on to the broker (a KILL would orphan it).
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }
}
