//! A fault-injecting HTTP/1.1 reverse proxy: stands between a real client (edge-ota's
//! reqwest) and a real origin (nginx) and breaks the link the ways field links break.
//!
//! Plain threads over `std::net` and a hand-written forwarder, so a fault can be placed at an
//! exact byte of a body. Each client request goes to the origin on a new connection with
//! `Connection: close`; the response streams back to the client (kept alive when its length
//! is known), with the faults of [`Faults`] applied. Counters ([`ProxyStats`]) tell a test
//! what crossed the "link".

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest request or response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Largest write to the client between fault checks.
const PIECE: usize = 16 * 1024;
/// A client connection with no request for this long is closed (reqwest pools them).
const CLIENT_IDLE: Duration = Duration::from_secs(120);

/// Faults of one proxy instance. Byte counts are body bytes sent to clients.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Throttle everything sent to clients, all connections together, to this many bytes/s.
    pub throttle: Option<u64>,
    /// Close a connection once it has carried this many body bytes.
    pub drop_every: Option<u64>,
    /// Once, when this many body bytes have been sent in all, stop sending (without closing)
    /// for this long.
    pub stall_once: Option<(u64, Duration)>,
    /// Answer range requests with `200` and the whole file (the origin is asked without
    /// `Range` and `If-Range`).
    pub full_200: bool,
    /// Serve only the first range of a multi-range request, as a plain `206`.
    pub ignore_multirange: bool,
    /// Answer multi-range requests with `416`.
    pub refuse_multirange: bool,
    /// Append this many garbage bytes to every `206` body, `Content-Length` raised to match.
    pub extra_bytes: u64,
    /// Once this many body bytes have been sent in all, requests get this path instead:
    /// another file, so another `ETag` (the file "replaced on the server").
    pub swap: Option<(u64, String)>,
    /// `(count, seconds)`: answer this many requests `503` with `Retry-After: seconds`.
    pub busy: Option<(u64, u64)>,
    /// The answer-shaping faults (`full_200`, `ignore_multirange`, `refuse_multirange`,
    /// `extra_bytes`, `busy`) apply from this request on (1-based; 0 or 1: from the first),
    /// so a client can open normally and meet the fault on a later request.
    pub faults_from_request: u64,
}

/// What crossed the proxy towards its clients.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Everything written to clients: heads and bodies.
    pub bytes_sent: u64,
    /// Body bytes written to clients.
    pub body_bytes_sent: u64,
    /// Requests received.
    pub requests: u64,
    /// Client connections accepted.
    pub connections: u64,
}

impl std::fmt::Display for ProxyStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "bytes_sent={} body_bytes_sent={} requests={} connections={}",
            self.bytes_sent, self.body_bytes_sent, self.requests, self.connections
        )
    }
}

#[derive(Default)]
struct Counters {
    bytes_sent: AtomicU64,
    body_bytes_sent: AtomicU64,
    requests: AtomicU64,
    connections: AtomicU64,
}

struct Shared {
    origin: SocketAddr,
    /// `Host` sent to the origin.
    origin_host: String,
    faults: Mutex<Faults>,
    counters: Counters,
    stall_done: AtomicBool,
    /// Throttle state: tokens and when they were last refilled.
    bucket: Mutex<(f64, Instant)>,
    stop: AtomicBool,
    /// Open client connections, shut down when the proxy stops.
    clients: Mutex<HashMap<u64, TcpStream>>,
}

/// A running proxy; stops (and closes its connections) on drop.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listen on `listen` (`127.0.0.1:0` for any free port) in front of `origin`
    /// (`http://host:port`, any path ignored).
    pub fn start(listen: &str, origin: &str, faults: Faults) -> io::Result<Proxy> {
        let hostport = origin
            .strip_prefix("http://")
            .ok_or_else(|| invalid(format!("origin {origin}: only http:// origins")))?;
        let hostport = hostport.split('/').next().unwrap_or_default();
        let origin_addr = hostport
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| invalid(format!("origin {origin}: no address")))?;
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            origin: origin_addr,
            origin_host: hostport.to_string(),
            faults: Mutex::new(faults),
            counters: Counters::default(),
            stall_done: AtomicBool::new(false),
            bucket: Mutex::new((0.0, Instant::now())),
            stop: AtomicBool::new(false),
            clients: Mutex::new(HashMap::new()),
        });
        let sh = shared.clone();
        let accept = std::thread::Builder::new()
            .name("test-proxy-accept".into())
            .spawn(move || accept_loop(listener, sh))?;
        Ok(Proxy {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.counters;
        ProxyStats {
            bytes_sent: c.bytes_sent.load(Ordering::Relaxed),
            body_bytes_sent: c.body_bytes_sent.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            connections: c.connections.load(Ordering::Relaxed),
        }
    }

    /// Change the faults of later requests and writes.
    pub fn set_faults(&self, faults: Faults) {
        *lock(&self.shared.faults) = faults;
    }

    /// Stop accepting and close every client connection.
    pub fn stop(&mut self) {
        if self.shared.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the blocking accept.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for (_, c) in lock(&self.shared.clients).drain() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn accept_loop(listener: TcpListener, sh: Arc<Shared>) {
    let mut next_id = 0u64;
    for conn in listener.incoming() {
        if sh.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else { continue };
        sh.counters.connections.fetch_add(1, Ordering::Relaxed);
        next_id += 1;
        let id = next_id;
        if let Ok(c) = conn.try_clone() {
            lock(&sh.clients).insert(id, c);
        }
        let sh2 = sh.clone();
        let spawned = std::thread::Builder::new()
            .name("test-proxy-conn".into())
            .spawn(move || {
                let _ = serve(conn, &sh2);
                lock(&sh2.clients).remove(&id);
            });
        if spawned.is_err() {
            lock(&sh.clients).remove(&id);
        }
    }
}

/// A parsed request or response head.
struct Head {
    /// Request line or status line.
    first: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn remove(&mut self, name: &str) {
        self.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    }

    fn set(&mut self, name: &str, value: String) {
        self.remove(name);
        self.headers.push((name.to_string(), value));
    }

    fn encode(&self) -> Vec<u8> {
        let mut s = format!("{}\r\n", self.first);
        for (k, v) in &self.headers {
            s.push_str(&format!("{k}: {v}\r\n"));
        }
        s.push_str("\r\n");
        s.into_bytes()
    }
}

/// Read a head; `None` on a clean end of the stream before any byte.
fn read_head(r: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut lines = Vec::new();
    let mut total = 0;
    loop {
        let mut line = String::new();
        let n = r.read_line(&mut line)?;
        if n == 0 {
            if lines.is_empty() && total == 0 {
                return Ok(None);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "head cut short",
            ));
        }
        total += n;
        if total > MAX_HEAD {
            return Err(invalid("head too long".into()));
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            if lines.is_empty() {
                continue; // Tolerated CRLF between messages.
            }
            break;
        }
        lines.push(line);
    }
    let first = lines.remove(0);
    let headers = lines
        .into_iter()
        .map(|l| match l.split_once(':') {
            Some((k, v)) => Ok((k.trim().to_string(), v.trim().to_string())),
            None => Err(invalid(format!("bad header line {l:?}"))),
        })
        .collect::<io::Result<_>>()?;
    Ok(Some(Head { first, headers }))
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// Per-connection state for the faults.
struct Conn {
    stream: TcpStream,
    body_sent: u64,
}

enum Sent {
    Ok,
    /// The connection was closed by a fault.
    Dropped,
}

fn serve(stream: TcpStream, sh: &Shared) -> io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_IDLE))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut conn = Conn {
        stream,
        body_sent: 0,
    };
    loop {
        let Some(mut req) = read_head(&mut reader)? else {
            return Ok(());
        };
        let n = sh.counters.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let faults = lock(&sh.faults).clone();
        let shaping = n >= faults.faults_from_request;
        let client_close = req
            .get("connection")
            .is_some_and(|v| v.to_ascii_lowercase().contains("close"));
        let mut parts = req.first.splitn(3, ' ');
        let (method, mut target, version) = (
            parts.next().unwrap_or_default().to_string(),
            parts.next().unwrap_or_default().to_string(),
            parts.next().unwrap_or_default().to_string(),
        );
        if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
            send_simple(&mut conn, sh, "400 Bad Request", "")?;
            return Ok(());
        }
        if req.get("transfer-encoding").is_some() {
            send_simple(&mut conn, sh, "501 Not Implemented", "")?;
            return Ok(());
        }
        let mut body = Vec::new();
        if let Some(cl) = req.get("content-length") {
            let cl: u64 = cl
                .parse()
                .map_err(|_| invalid("bad Content-Length".into()))?;
            (&mut reader).take(cl).read_to_end(&mut body)?;
        }
        if let Some((after, path)) = &faults.swap {
            if sh.counters.body_bytes_sent.load(Ordering::Relaxed) >= *after {
                target = path.clone();
            }
        }
        if let Some((count, secs)) = faults.busy {
            if shaping && n < faults.faults_from_request.max(1) + count {
                send_simple(
                    &mut conn,
                    sh,
                    "503 Service Unavailable",
                    &format!("Retry-After: {secs}\r\n"),
                )?;
                if client_close {
                    return Ok(());
                }
                continue;
            }
        }
        let multi = req.get("range").is_some_and(|r| r.contains(','));
        if shaping && faults.refuse_multirange && multi {
            send_simple(&mut conn, sh, "416 Range Not Satisfiable", "")?;
            if client_close {
                return Ok(());
            }
            continue;
        }
        if shaping && faults.ignore_multirange && multi {
            if let Some(r) = req.get("range").map(str::to_string) {
                let first = r.split(',').next().unwrap_or_default().to_string();
                req.set("Range", first);
            }
        }
        if shaping && faults.full_200 {
            req.remove("range");
            req.remove("if-range");
        }
        for h in HOP_BY_HOP {
            req.remove(h);
        }
        req.set("Host", sh.origin_host.clone());
        req.set("Connection", "close".into());
        req.first = format!("{method} {target} HTTP/1.1");

        let Ok(mut origin) = TcpStream::connect(sh.origin) else {
            send_simple(&mut conn, sh, "502 Bad Gateway", "")?;
            return Ok(());
        };
        origin.write_all(&req.encode())?;
        origin.write_all(&body)?;
        let mut oreader = BufReader::new(origin);
        let Some(mut resp) = read_head(&mut oreader)? else {
            send_simple(&mut conn, sh, "502 Bad Gateway", "")?;
            return Ok(());
        };
        let status: u16 = resp
            .first
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(502);
        let has_body =
            method != "HEAD" && !(100..200).contains(&status) && status != 204 && status != 304;
        let chunked = resp
            .get("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let length: Option<u64> = if chunked {
            None
        } else {
            resp.get("content-length").and_then(|v| v.parse().ok())
        };
        let extra = if shaping && status == 206 && has_body && length.is_some() {
            faults.extra_bytes
        } else {
            0
        };
        // Keep-alive only where the client can tell where the body ends.
        let keep = !client_close && (!has_body || length.is_some() || chunked);
        for h in HOP_BY_HOP {
            if *h != "te" {
                resp.remove(h);
            }
        }
        if let Some(len) = length {
            resp.set("Content-Length", (len + extra).to_string());
        }
        resp.set(
            "Connection",
            if keep { "keep-alive" } else { "close" }.into(),
        );
        let head = resp.encode();
        conn.stream.write_all(&head)?;
        sh.counters
            .bytes_sent
            .fetch_add(head.len() as u64, Ordering::Relaxed);
        if has_body {
            let limit = if chunked { None } else { length };
            if let Sent::Dropped = copy_body(&mut oreader, limit, &mut conn, sh, &faults)? {
                return Ok(());
            }
            if extra > 0 {
                let garbage = vec![b'!'; extra as usize];
                if let Sent::Dropped = send_body(&mut conn, sh, &faults, &garbage)? {
                    return Ok(());
                }
            }
        }
        if !keep {
            let _ = conn.stream.shutdown(Shutdown::Both);
            return Ok(());
        }
    }
}

/// A bodiless answer made by the proxy itself; `extra` is more header lines (CRLF-ended).
fn send_simple(conn: &mut Conn, sh: &Shared, status: &str, extra: &str) -> io::Result<()> {
    let head = format!("HTTP/1.1 {status}\r\n{extra}Content-Length: 0\r\n\r\n");
    conn.stream.write_all(head.as_bytes())?;
    sh.counters
        .bytes_sent
        .fetch_add(head.len() as u64, Ordering::Relaxed);
    Ok(())
}

/// Forward `limit` bytes (or all until the origin closes) of the origin's body.
fn copy_body(
    origin: &mut impl Read,
    limit: Option<u64>,
    conn: &mut Conn,
    sh: &Shared,
    faults: &Faults,
) -> io::Result<Sent> {
    let mut left = limit;
    let mut buf = vec![0u8; PIECE];
    loop {
        let want = match left {
            Some(0) => return Ok(Sent::Ok),
            Some(l) => (l as usize).min(buf.len()),
            None => buf.len(),
        };
        let n = origin.read(&mut buf[..want])?;
        if n == 0 {
            if left.is_some() {
                // The origin cut its body short: pass the failure on.
                let _ = conn.stream.shutdown(Shutdown::Both);
                return Ok(Sent::Dropped);
            }
            return Ok(Sent::Ok);
        }
        if let Some(l) = &mut left {
            *l -= n as u64;
        }
        if let Sent::Dropped = send_body(conn, sh, faults, &buf[..n])? {
            return Ok(Sent::Dropped);
        }
    }
}

/// Write body bytes to the client with throttle, drop and stall applied.
fn send_body(conn: &mut Conn, sh: &Shared, faults: &Faults, mut data: &[u8]) -> io::Result<Sent> {
    while !data.is_empty() {
        let mut piece = data.len().min(PIECE);
        if let Some(every) = faults.drop_every {
            let left = every.saturating_sub(conn.body_sent);
            if left == 0 {
                let _ = conn.stream.shutdown(Shutdown::Both);
                return Ok(Sent::Dropped);
            }
            piece = piece.min(left as usize);
        }
        if let Some((after, pause)) = faults.stall_once {
            if !sh.stall_done.load(Ordering::SeqCst) {
                let total = sh.counters.body_bytes_sent.load(Ordering::Relaxed);
                if total >= after {
                    if !sh.stall_done.swap(true, Ordering::SeqCst) {
                        std::thread::sleep(pause);
                    }
                } else {
                    piece = piece.min((after - total) as usize);
                }
            }
        }
        if let Some(rate) = faults.throttle {
            piece = piece.min(((rate / 20) as usize).max(512));
            throttle(sh, rate, piece);
        }
        conn.stream.write_all(&data[..piece])?;
        conn.body_sent += piece as u64;
        sh.counters
            .body_bytes_sent
            .fetch_add(piece as u64, Ordering::Relaxed);
        sh.counters
            .bytes_sent
            .fetch_add(piece as u64, Ordering::Relaxed);
        data = &data[piece..];
        if faults
            .drop_every
            .is_some_and(|every| conn.body_sent >= every)
        {
            let _ = conn.stream.shutdown(Shutdown::Both);
            return Ok(Sent::Dropped);
        }
    }
    Ok(Sent::Ok)
}

/// Take `n` tokens from the shared bucket (`rate` per second, bursts of 1/10 s).
fn throttle(sh: &Shared, rate: u64, n: usize) {
    let rate = rate.max(1) as f64;
    let burst = (rate / 10.0).max(n as f64);
    loop {
        let wait = {
            let mut b = lock(&sh.bucket);
            let now = Instant::now();
            b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * rate).min(burst);
            b.1 = now;
            if b.0 >= n as f64 {
                b.0 -= n as f64;
                return;
            }
            (n as f64 - b.0) / rate
        };
        std::thread::sleep(Duration::from_secs_f64(wait));
    }
}
