//! A throwaway PostgreSQL cluster on loopback.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The superuser of test clusters, and its password.
const USER: &str = "weir";
const PASSWORD: &str = PgServer::PASSWORD;

/// A running PostgreSQL cluster, stopped and deleted on drop.
pub struct PgServer {
    dir: tempfile::TempDir,
    port: u16,
    bin: PathBuf,
    /// Server commands run as this account when the tests run as root (PostgreSQL refuses
    /// to run as root).
    run_as: Option<String>,
}

impl PgServer {
    /// The superuser's password of every test cluster.
    pub const PASSWORD: &'static str = "weir-test-password";

    /// One cluster for the whole test process, started on first use.
    pub fn shared() -> &'static PgServer {
        static SHARED: OnceLock<PgServer> = OnceLock::new();
        SHARED.get_or_init(|| {
            let s = PgServer::start().unwrap_or_else(|e| panic!("starting PostgreSQL: {e}"));
            s.watch(std::process::id());
            s
        })
    }

    /// Starts a new cluster.
    pub fn start() -> Result<PgServer, String> {
        let bin = server_bin_dir()?;
        let run_as = if is_root() {
            Some("postgres".to_string())
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("weir-pg-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let data = dir.path().join("data");
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, PASSWORD).map_err(|e| format!("password file: {e}"))?;
        if let Some(user) = &run_as {
            chown_tree(dir.path(), user)?;
        }
        let port = free_port()?;
        let server = PgServer {
            dir,
            port,
            bin,
            run_as,
        };
        server.run(
            "initdb",
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                USER,
                "--pwfile",
                &pwfile.to_string_lossy(),
                "-A",
                "scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_wal_senders = 10\nmax_replication_slots = 20\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             max_connections = 100\nshared_buffers = 128MB\n",
            server.dir.path().display()
        );
        append(&data.join("postgresql.conf"), &conf)?;
        // TLS with a throwaway self-signed certificate, when openssl is there.
        if server.make_certificate(&data) {
            append(&data.join("postgresql.conf"), "ssl = on\n")?;
        }
        append(
            &data.join("pg_hba.conf"),
            "host replication all 127.0.0.1/32 scram-sha-256\n",
        )?;
        server.run(
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-l",
                &server.dir.path().join("log").to_string_lossy(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(format!(
                    "PostgreSQL did not listen on 127.0.0.1:{port}; log:\n{}",
                    server.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
    }

    /// Whether the server accepts TLS.
    pub fn has_tls(&self) -> bool {
        self.dir.path().join("data/server.crt").exists()
    }

    fn make_certificate(&self, data: &Path) -> bool {
        let (key, cert) = (data.join("server.key"), data.join("server.crt"));
        if crate::tls::self_signed(&key, &cert, "localhost", "DNS:localhost").is_err() {
            return false;
        }
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(
            data.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        );
        match &self.run_as {
            Some(user) => chown_tree(data, user).is_ok(),
            None => true,
        }
    }

    /// The server's bin directory (psql, pgbench, pg_recvlogical).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn user(&self) -> &str {
        USER
    }

    pub fn password(&self) -> &str {
        PASSWORD
    }

    /// A connection URL for `database`.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgresql://{USER}:{PASSWORD}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    /// Creates a database with a unique name and returns the name: tests sharing the
    /// cluster keep out of each other's way.
    pub fn fresh_database(&self, prefix: &str) -> Result<String, String> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{prefix}_{}_{n}", std::process::id());
        self.psql("postgres", &format!("create database \"{name}\""))?;
        Ok(name)
    }

    /// Runs SQL through `psql` (unaligned, tuples only) and returns its output.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.url(database))
            .args(["-c", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "psql failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// Stops the cluster when process `pid` is gone, even if it was killed.
    fn watch(&self, pid: u32) {
        let data = self.dir.path().join("data");
        let stop = self.command_line(
            "pg_ctl",
            &["-D", &data.to_string_lossy(), "-m", "immediate", "stop"],
        );
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf '{}'",
            self.dir.path().display()
        );
        let _ = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }

    fn command_line(&self, program: &str, args: &[&str]) -> String {
        let mut words = vec![shell_quote(&self.bin.join(program).to_string_lossy())];
        words.extend(args.iter().map(|a| shell_quote(a)));
        let line = words.join(" ");
        match &self.run_as {
            Some(user) => format!("runuser -u {user} -- {line}"),
            None => line,
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<(), String> {
        let out = Command::new("sh")
            .args(["-c", &self.command_line(program, args)])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{program}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{program} failed: {}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            ))
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = self.run(
            "pg_ctl",
            &["-D", &data.to_string_lossy(), "-m", "immediate", "stop"],
        );
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn append(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("free port: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("free port: {e}"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn chown_tree(dir: &Path, user: &str) -> Result<(), String> {
    let ok = Command::new("chown")
        .args(["-R", user])
        .arg(dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(format!("chown -R {user} {} failed", dir.display()))
    }
}

/// Where `initdb` and `pg_ctl` live: `$WEIR_PG_BIN`, the PATH, or Debian's versioned
/// directories (newest first).
fn server_bin_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("WEIR_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                // Follow a symlink to the server's own directory, where psql also lives.
                let real = std::fs::canonicalize(dir.join("initdb")).unwrap_or(dir.join("initdb"));
                return Ok(real.parent().map(Path::to_path_buf).unwrap_or(dir));
            }
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    versions.sort();
    versions
        .into_iter()
        .rev()
        .map(|v| v.join("bin"))
        .find(|b| b.join("initdb").is_file())
        .ok_or_else(|| {
            "PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's \
             postgresql-15 (scripts/test does) or set WEIR_PG_BIN"
                .to_string()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_starts_answers_and_has_logical_wal() {
        let pg = PgServer::shared();
        assert_eq!(pg.psql("postgres", "select 1 + 1").unwrap(), "2");
        assert_eq!(pg.psql("postgres", "show wal_level").unwrap(), "logical");
        assert_eq!(
            pg.psql("postgres", "show listen_addresses").unwrap(),
            "127.0.0.1"
        );
        let db = pg.fresh_database("harness").unwrap();
        pg.psql(
            &db,
            "create table t (id int); insert into t values (1), (2)",
        )
        .unwrap();
        assert_eq!(pg.psql(&db, "select count(*) from t").unwrap(), "2");
    }
}
