//! An S3-compatible server on loopback: the server mode of `moto` (from PyPI), in memory.
//!
//! It answers one request at a time, so a conditional put (`If-None-Match: *`, which
//! Delta commits use on S3) is checked and applied atomically, as on S3 itself.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The server, serving until the test process ends.
const SERVER: &str = r#"
import os, sys, threading, time
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

port, parent = int(sys.argv[1]), int(sys.argv[2])

def watch():
    # Stop with the test process, however it ends.
    while True:
        try:
            os.kill(parent, 0)
        except OSError:
            os._exit(0)
        time.sleep(1)

threading.Thread(target=watch, daemon=True).start()
app = DomainDispatcherApplication(create_backend_app)
run_simple("127.0.0.1", port, app, threaded=False)
"#;

/// A running S3-compatible server with one bucket.
pub struct S3Server {
    port: u16,
    child: std::sync::Mutex<Child>,
}

impl S3Server {
    /// The bucket every server has.
    pub const BUCKET: &'static str = "weir-test";
    pub const ACCESS_KEY: &'static str = "weir";
    pub const SECRET_KEY: &'static str = "weir-test-secret";

    /// One server for the whole test process, started on first use.
    pub fn shared() -> &'static S3Server {
        static SHARED: OnceLock<S3Server> = OnceLock::new();
        SHARED.get_or_init(|| {
            S3Server::start().unwrap_or_else(|e| panic!("starting the S3 server: {e}"))
        })
    }

    /// Starts a server on a free loopback port and creates the bucket.
    pub fn start() -> Result<S3Server, String> {
        let port = free_port()?;
        let child = Command::new("python3")
            .args([
                "-c",
                SERVER,
                &port.to_string(),
                &std::process::id().to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("python3: {e} (the S3 server is `moto`, from PyPI)"))?;
        let server = S3Server {
            port,
            child: std::sync::Mutex::new(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = server.child.lock().map_err(|e| e.to_string())?.try_wait() {
                return Err(format!(
                    "the server exited ({status}); is moto installed? \
                     `python3 -m pip install 'moto[server]'`"
                ));
            }
            if Instant::now() > deadline {
                return Err("the server did not listen within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        server.request("PUT", &format!("/{}", Self::BUCKET))?;
        Ok(server)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The storage options a client of this server needs.
    pub fn options(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_DEFAULT_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", Self::ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", Self::SECRET_KEY.into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// An unsigned request (the server does not check signatures); the status line.
    fn request(&self, method: &str, path: &str) -> Result<String, String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .map_err(|e| e.to_string())?;
        let mut response = String::new();
        let _ = s.read_to_string(&mut response);
        let status = response.lines().next().unwrap_or_default().to_string();
        if !status.contains(" 200") {
            return Err(format!("{method} {path}: {status}"));
        }
        Ok(status)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Ok(mut c) = self.child.lock() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A free loopback port.
pub(crate) fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("free port: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("free port: {e}"))
}
