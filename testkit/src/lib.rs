//! Test tools for edge-ota's network tests, its QEMU tests and `bench/link.sh`: a
//! fault-injecting HTTP proxy ([`proxy`]), a real origin server ([`Nginx`]), a throwaway
//! TLS PKI ([`pki`]) and a fake Kubernetes API server ([`kube_api`]).
//!
//! The origin is Debian's nginx on purpose: single and multiple ranges, `If-Range` and
//! `ETag` as a real server implements them, not as a test author imagines them.

pub mod kube_api;
pub mod pki;
pub mod proxy;

pub use kube_api::FakeApiServer;
pub use proxy::{Faults, Proxy, ProxyStats};

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long nginx may take to accept connections after its start.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS settings of an [`Nginx`] (PEM files).
#[derive(Debug, Clone)]
pub struct NginxTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Require client certificates signed by this CA.
    pub client_ca: Option<PathBuf>,
}

/// nginx serving a directory on 127.0.0.1, from a temporary prefix; stopped on drop.
pub struct Nginx {
    bin: PathBuf,
    prefix: tempfile::TempDir,
    root: PathBuf,
    tls: Option<NginxTls>,
    port: u16,
    child: Option<Child>,
}

impl Nginx {
    /// The nginx binary, if installed (`/usr/sbin` is often not in a user's `PATH`).
    pub fn find() -> Option<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .map(|d| d.join("nginx"))
            .find(|p| p.is_file())
    }

    /// Serve `root` over plain HTTP on a free port.
    pub fn start(root: &Path) -> io::Result<Nginx> {
        Self::launch(root, None)
    }

    /// Serve `root` over HTTPS on a free port.
    pub fn start_tls(root: &Path, tls: NginxTls) -> io::Result<Nginx> {
        Self::launch(root, Some(tls))
    }

    fn launch(root: &Path, tls: Option<NginxTls>) -> io::Result<Nginx> {
        let bin = Self::find()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "nginx not installed"))?;
        let mut n = Nginx {
            bin,
            prefix: tempfile::Builder::new()
                .prefix("edge-ota-nginx")
                .tempdir()?,
            root: root.canonicalize()?,
            tls,
            port: 0,
            child: None,
        };
        // The free port is found by binding and releasing it: another process may take it
        // in between, so a failed start is tried again on another port.
        let mut last = None;
        for _ in 0..5 {
            n.port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            match n.spawn() {
                Ok(()) => return Ok(n),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("nginx did not start")))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `http://127.0.0.1:PORT` + `path` (`https://` with TLS).
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}{path}", self.port)
    }

    /// `http://127.0.0.1:PORT`, for [`Proxy::start`].
    pub fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stop the server (the port stays reserved for [`Nginx::restart`] only by convention).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM: nginx closes its sockets and exits at once.
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start again on the same port after [`Nginx::stop`].
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        let mut last = None;
        for _ in 0..20 {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(last.unwrap_or_else(|| io::Error::other("nginx did not restart")))
    }

    fn spawn(&mut self) -> io::Result<()> {
        let p = self.prefix.path();
        for d in ["logs", "tmp"] {
            std::fs::create_dir_all(p.join(d))?;
        }
        let conf = p.join("nginx.conf");
        std::fs::write(&conf, self.config())?;
        let stderr = std::fs::File::create(p.join("logs/stderr.log"))?;
        let mut child = Command::new(&self.bin)
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(p)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(p.join("logs/stderr.log")).unwrap_or_default();
                return Err(io::Error::other(format!("nginx exited ({status}): {log}")));
            }
            if TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200)).is_ok() {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "nginx did not accept connections",
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn config(&self) -> String {
        let p = self.prefix.path().display();
        // One process (master_process off), so stopping it stops everything. As root, nginx
        // would hand requests to "nobody", which cannot read a test's private temp dir.
        let user = if nix::unistd::geteuid().is_root() {
            "user root;"
        } else {
            ""
        };
        let listen = match &self.tls {
            None => format!("listen 127.0.0.1:{};", self.port),
            Some(t) => {
                let mut s = format!(
                    "listen 127.0.0.1:{} ssl;\n    ssl_certificate {};\n    ssl_certificate_key {};",
                    self.port,
                    t.cert.display(),
                    t.key.display()
                );
                if let Some(ca) = &t.client_ca {
                    s.push_str(&format!(
                        "\n    ssl_client_certificate {};\n    ssl_verify_client on;",
                        ca.display()
                    ));
                }
                s
            }
        };
        format!(
            "{user}
worker_processes 1;
master_process off;
error_log {p}/logs/error.log warn;
pid {p}/nginx.pid;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {p}/tmp/body;
  proxy_temp_path {p}/tmp/proxy;
  fastcgi_temp_path {p}/tmp/fastcgi;
  uwsgi_temp_path {p}/tmp/uwsgi;
  scgi_temp_path {p}/tmp/scgi;
  types {{ }}
  default_type application/octet-stream;
  sendfile on;
  keepalive_timeout 60s;
  server {{
    {listen}
    root {root};
  }}
}}
",
            root = self.root.display()
        )
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Run `ip ARGS` (iproute2) for a test's network set-up; panics with its error output when it
/// fails, since nothing after it could be meaningful.
pub fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().unwrap();
    assert!(
        o.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
}
