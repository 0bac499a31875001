//! Health probes: a command, an HTTP GET (kubelet `/healthz`, API server `/readyz`), a TCP
//! connect, a file that must exist. Each runs with its own timeout.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

pub use crate::config::{Check, ProbeConfig};

impl ProbeConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs.max(1))
    }

    /// Run once. `Err` carries a one-line reason.
    pub fn run(&self) -> Result<(), String> {
        let timeout = self.timeout();
        match &self.check {
            Check::Command { command } => run_command(command, timeout),
            Check::Http { url, ca_file } => http_get(url, ca_file.as_ref(), timeout),
            Check::Tcp { address } => tcp_connect(address, timeout),
            Check::File { path } => {
                if path.exists() {
                    Ok(())
                } else {
                    Err(format!("{} does not exist", path.display()))
                }
            }
        }
    }
}

fn run_command(argv: &[String], timeout: Duration) -> Result<(), String> {
    crate::process::run(argv, timeout, false).map(|_| ())
}

fn http_get(url: &str, ca_file: Option<&PathBuf>, timeout: Duration) -> Result<(), String> {
    let mut builder = reqwest::blocking::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout);
    if let Some(ca) = ca_file {
        let pem = std::fs::read(ca).map_err(|e| format!("reading CA {}: {e}", ca.display()))?;
        let cert = reqwest::Certificate::from_pem(&pem)
            .map_err(|e| format!("CA {}: {e}", ca.display()))?;
        builder = builder.add_root_certificate(cert);
    }
    let client = builder.build().map_err(|e| format!("http client: {e}"))?;
    let resp = client
        .get(url)
        .send()
        .map_err(|e| format!("GET {url}: {}", one_line(&e)))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("GET {url}: {}", resp.status()))
    }
}

fn tcp_connect(address: &str, timeout: Duration) -> Result<(), String> {
    let addrs: Vec<_> = address
        .to_socket_addrs()
        .map_err(|e| format!("resolving {address}: {e}"))?
        .collect();
    let mut last = format!("{address}: no addresses");
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(_) => return Ok(()),
            Err(e) => last = format!("connecting to {a}: {e}"),
        }
    }
    Err(last)
}

/// An error and its causes on one line.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn probe(check: Check, timeout_secs: u64) -> ProbeConfig {
        ProbeConfig {
            name: "t".into(),
            required: true,
            timeout_secs,
            check,
        }
    }

    #[test]
    fn command_exit_status_decides() {
        let ok = probe(
            Check::Command {
                command: vec!["true".into()],
            },
            5,
        );
        let bad = probe(
            Check::Command {
                command: vec!["false".into()],
            },
            5,
        );
        assert!(ok.run().is_ok());
        assert!(bad.run().unwrap_err().contains("exited"));
    }

    #[test]
    fn probe_timing_out_is_a_failure() {
        let slow = probe(
            Check::Command {
                command: vec!["sleep".into(), "30".into()],
            },
            1,
        );
        let t = Instant::now();
        let err = slow.run().unwrap_err();
        assert!(err.contains("timed out"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn tcp_and_http_probes_against_a_local_server() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            // Answer two connections: the TCP probe's and the HTTP probe's.
            for (i, conn) in listener.incoming().take(2).enumerate() {
                let mut c = conn.unwrap();
                if i == 1 {
                    let mut buf = [0u8; 1024];
                    let _ = c.read(&mut buf);
                    let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                }
            }
        });
        assert!(probe(
            Check::Tcp {
                address: addr.to_string()
            },
            2
        )
        .run()
        .is_ok());
        let http = probe(
            Check::Http {
                url: format!("http://{addr}/healthz"),
                ca_file: None,
            },
            2,
        );
        assert!(http.run().is_ok());
        server.join().unwrap();
    }

    #[test]
    fn refused_connection_fails_with_a_reason() {
        // Bind then drop to get a port with nothing listening.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = probe(
            Check::Tcp {
                address: format!("127.0.0.1:{port}"),
            },
            1,
        )
        .run()
        .unwrap_err();
        assert!(err.contains("connecting"), "{err}");
    }

    #[test]
    fn missing_file_fails() {
        let p = probe(
            Check::File {
                path: "/nonexistent/edge-ota".into(),
            },
            1,
        );
        assert!(p.run().unwrap_err().contains("does not exist"));
    }
}
