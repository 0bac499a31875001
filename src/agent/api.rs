//! The agent's local API: HTTP/1.1 (hyper) on a Unix socket, root-only by default, and the
//! Prometheus endpoint on TCP. JSON in and out, every document with a `version` field.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/v1/status` | phase, desired state, running/staged release, last result, history |
//! | GET | `/v1/desired` | the desired state being worked on (404 if none) |
//! | PUT | `/v1/desired` | set a desired state (YAML or JSON; origin `api`) |
//! | POST | `/v1/stage` | stage now, even outside the windows |
//! | POST | `/v1/apply` | apply now (after staging), even outside the windows |
//! | POST | `/v1/pause`, `/v1/resume` | start nothing new / go on |
//! | GET | `/v1/events` | JSON Lines: the progress events of `apply --progress=jsonl`, plus `phase` changes and notices |
//! | GET | `/metrics` | Prometheus text (also on `[agent] metrics`, TCP) |
//!
//! The server runs on a small tokio runtime of its own; the update work stays on the agent's
//! thread, which it reaches through a channel.

use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::sync::{broadcast, oneshot};

use super::metrics::Metrics;
use super::Snapshot;
use crate::error::{Error, IoContext, Result};

/// Schema version of the API's documents (same as the CLI's `--json`).
pub const API_VERSION: u32 = crate::JSON_VERSION;
/// Largest request body (a desired state).
const MAX_BODY: usize = super::desired::MAX_LEN;

/// What the API asks the agent's thread to do.
#[derive(Debug)]
pub enum Command {
    Stage,
    Apply,
    Pause,
    Resume,
    /// A desired-state document (YAML or JSON), from `agent set` or a forwarded `apply`.
    SetDesired(Vec<u8>),
}

/// A command and where to send its answer.
pub type ApiRequest = (
    Command,
    oneshot::Sender<std::result::Result<String, String>>,
);

/// State shared between the agent's thread and the API.
pub struct Shared {
    pub snapshot: Mutex<Snapshot>,
    pub metrics: Metrics,
    /// Lines for `/v1/events` subscribers (JSON, no newline).
    pub events: broadcast::Sender<Arc<str>>,
    pub commands: crossbeam_channel::Sender<super::Input>,
}

impl Shared {
    pub fn new(snapshot: Snapshot, commands: crossbeam_channel::Sender<super::Input>) -> Shared {
        let (events, _) = broadcast::channel(1024);
        Shared {
            snapshot: Mutex::new(snapshot),
            metrics: Metrics::new(),
            events,
            commands,
        }
    }

    /// Publish one event line (dropped when nobody listens).
    pub fn publish(&self, line: String) {
        let _ = self.events.send(Arc::from(line));
    }

    pub fn set_snapshot(&self, s: Snapshot) {
        self.metrics.update(&s);
        *self.snapshot.lock().expect("snapshot lock") = s;
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()).boxed())
        .expect("valid response")
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    #[derive(Serialize)]
    struct Versioned<'a, T> {
        version: u32,
        #[serde(flatten)]
        inner: &'a T,
    }
    let mut body = serde_json::to_vec_pretty(&Versioned {
        version: API_VERSION,
        inner: value,
    })
    .expect("serializable");
    body.push(b'\n');
    full(status, "application/json", body)
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message }))
}

async fn handle(req: Request<Incoming>, shared: Arc<Shared>, local: bool) -> Response<Body> {
    let path = req.uri().path().to_string();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/metrics") => full(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            shared.metrics.render(),
        ),
        // Only /metrics is served on TCP.
        _ if !local => error(StatusCode::NOT_FOUND, "only /metrics is served here"),
        (Method::GET, "/v1/status") => {
            let s = shared.snapshot.lock().expect("snapshot lock").clone();
            json(StatusCode::OK, &s)
        }
        (Method::GET, "/v1/desired") => {
            let s = shared.snapshot.lock().expect("snapshot lock").clone();
            match &s.agent.desired {
                Some(d) => json(StatusCode::OK, d),
                None => error(StatusCode::NOT_FOUND, "no desired state"),
            }
        }
        (Method::GET, "/v1/events") => events(&shared),
        (Method::PUT, "/v1/desired") => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes().to_vec(),
                Err(e) => return error(StatusCode::PAYLOAD_TOO_LARGE, &e.to_string()),
            };
            command(&shared, Command::SetDesired(body)).await
        }
        (Method::POST, "/v1/stage") => command(&shared, Command::Stage).await,
        (Method::POST, "/v1/apply") => command(&shared, Command::Apply).await,
        (Method::POST, "/v1/pause") => command(&shared, Command::Pause).await,
        (Method::POST, "/v1/resume") => command(&shared, Command::Resume).await,
        (
            _,
            "/v1/status" | "/v1/desired" | "/v1/events" | "/v1/stage" | "/v1/apply" | "/v1/pause"
            | "/v1/resume",
        ) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        _ => error(StatusCode::NOT_FOUND, &format!("no such endpoint {path}")),
    }
}

async fn command(shared: &Shared, c: Command) -> Response<Body> {
    let (tx, rx) = oneshot::channel();
    if shared.commands.send(super::Input::Api((c, tx))).is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping");
    }
    match rx.await {
        Ok(Ok(msg)) => json(StatusCode::OK, &serde_json::json!({ "result": msg })),
        Ok(Err(msg)) => error(StatusCode::CONFLICT, &msg),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping"),
    }
}

fn events(shared: &Shared) -> Response<Body> {
    let rx = shared.events.subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(line) => {
                    let mut b = line.as_bytes().to_vec();
                    b.push(b'\n');
                    return Some((Ok::<_, Infallible>(Frame::data(Bytes::from(b))), rx));
                }
                // A slow reader misses events rather than slowing the agent.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/x-ndjson")
        .body(StreamBody::new(stream).boxed())
        .expect("valid response")
}

/// Bind the Unix socket (replacing a stale one), with `mode`.
pub fn bind_unix(path: &Path, mode: u32) -> Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(Error::Busy(format!(
            "an agent already listens on {}",
            path.display()
        )));
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::io(
                format!("removing stale socket {}", path.display()),
                e,
            ))
        }
        _ => {}
    }
    // Created with no permissions for others, then opened up to `mode`: never a window in
    // which anyone could connect.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let l = std::os::unix::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let l = l.ctx(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .ctx(|| format!("setting the mode of {}", path.display()))?;
    l.set_nonblocking(true)
        .ctx(|| format!("configuring {}", path.display()))?;
    Ok(l)
}

/// Serve the API on `unix` and `/metrics` on `tcp`, until the process ends.
pub fn serve(
    shared: Arc<Shared>,
    unix: std::os::unix::net::UnixListener,
    tcp: Option<std::net::TcpListener>,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .ctx(|| "starting the API runtime".into())?;
    rt.block_on(async move {
        let unix =
            tokio::net::UnixListener::from_std(unix).map_err(|e| Error::io("API socket", e))?;
        if let Some(t) = tcp {
            t.set_nonblocking(true)
                .map_err(|e| Error::io("metrics socket", e))?;
            let t =
                tokio::net::TcpListener::from_std(t).map_err(|e| Error::io("metrics socket", e))?;
            let shared = shared.clone();
            tokio::spawn(async move {
                loop {
                    if let Ok((s, _)) = t.accept().await {
                        spawn_conn(TokioIo::new(s), shared.clone(), false);
                    }
                }
            });
        }
        loop {
            match unix.accept().await {
                Ok((s, _)) => spawn_conn(TokioIo::new(s), shared.clone(), true),
                Err(e) => eprintln!("edge-ota agent: API accept: {e}"),
            }
        }
    })
}

fn spawn_conn<I>(io: I, shared: Arc<Shared>, local: bool)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let svc = hyper::service::service_fn(move |req| {
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(handle(req, shared, local).await) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, svc)
            .await;
    });
}

/// A client of the API, for the CLI.
pub struct Client {
    socket: std::path::PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Client {
        Client {
            socket: socket.to_path_buf(),
        }
    }

    /// Whether an agent answers on the socket.
    pub fn is_running(&self) -> bool {
        std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
    }

    fn runtime() -> Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .ctx(|| "starting a runtime".into())
    }

    async fn send(&self, method: Method, path: &str, body: Vec<u8>) -> Result<Response<Incoming>> {
        let name = self.socket.display().to_string();
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| Error::io(format!("connecting to the agent at {name}"), e))?;
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Error::io(format!("agent at {name}"), std::io::Error::other(e)))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "edge-ota-agent")
            .body(Full::new(Bytes::from(body)))
            .expect("valid request");
        tx.send_request(req)
            .await
            .map_err(|e| Error::io(format!("agent at {name}"), std::io::Error::other(e)))
    }

    /// One request; the answer's status and body.
    pub fn request(&self, method: Method, path: &str, body: Vec<u8>) -> Result<(u16, Vec<u8>)> {
        Self::runtime()?.block_on(async {
            let resp = self.send(method, path, body).await?;
            let status = resp.status().as_u16();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| Error::io("reading the agent's answer", std::io::Error::other(e)))?
                .to_bytes();
            Ok((status, bytes.to_vec()))
        })
    }

    /// Follow a JSON Lines stream; `on_line` returns false to stop.
    pub fn follow(&self, path: &str, mut on_line: impl FnMut(&str) -> bool) -> Result<()> {
        Self::runtime()?.block_on(async {
            let resp = self.send(Method::GET, path, Vec::new()).await?;
            let mut body = resp.into_body();
            let mut buf = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame
                    .map_err(|e| Error::io("reading agent events", std::io::Error::other(e)))?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                buf.extend_from_slice(&data);
                while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=nl).collect();
                    if !on_line(String::from_utf8_lossy(&line[..nl]).as_ref()) {
                        return Ok(());
                    }
                }
            }
            Ok(())
        })
    }
}
