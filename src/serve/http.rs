//! Connections and requests of `serve`: hyper's HTTP/1.1 server (optionally behind rustls),
//! `http-serve` for what RFC 9110 says about ranges and conditions, and the limits a LAN
//! server needs around them:
//!
//! - connections: at most `max_connections` in all and `max_connections_per_peer` from one
//!   address; the next one is answered `503` with `Retry-After` and closed;
//! - request heads: at most `max_header_bytes` (`431`) and `max_headers` fields, received
//!   within `idle_timeout` (a slow-loris trickling header bytes is closed), no request body
//!   (`413`), only `GET` and `HEAD` (`405`);
//! - ranges: at most `max_ranges`, none overlapping ([`super::ranges`], `416`);
//! - a connection that moves no byte for `idle_timeout` is closed (a client that stops
//!   reading), except while its response waits for the upstream;
//! - paths: a request names an entry of the library or the cache by exact name
//!   ([`super::library::valid_name`]); nothing is ever joined to a directory.
//!
//! Bodies stream from disk in 128 KiB reads on the blocking pool: memory stays flat in the
//! number of clients and in the size of bundles.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::Stream;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::cache::{self, Failure};
use super::stats::Stats;
use super::{App, INDEX_PATH, STATS_PATH};
use crate::error::{Error, Result};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body error. A named type rather than `BoxError` itself: with the boxed trait object as
/// the body's error, hyper's connection future cannot be proven `Send` for every lifetime.
#[derive(Debug)]
pub struct BodyError(BoxError);

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BodyError {}

impl From<BoxError> for BodyError {
    fn from(e: BoxError) -> Self {
        BodyError(e)
    }
}

/// Every response body: http-serve's (streamed entity, or bytes).
pub type Body = http_serve::Body<Bytes, BodyError>;

/// Bytes per read from disk.
const READ_CHUNK: usize = 128 << 10;

/// An HTTPS acceptor from a PEM certificate chain and key (rustls, ring).
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let bad = |path: &Path, why: String| Error::Config {
        path: path.into(),
        reason: why,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect())
        .map_err(|e| bad(cert, format!("not a PEM certificate chain: {e}")))?;
    if certs.is_empty() {
        return Err(bad(cert, "no certificate in the file".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| bad(key, format!("not a PEM private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| bad(cert, e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// Open connections, in all and per peer.
#[derive(Default)]
struct Slots {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// One connection's place in [`Slots`], given back on drop.
struct Slot {
    slots: Arc<Mutex<Slots>>,
    peer: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        s.total -= 1;
        if let Some(n) = s.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                s.per_peer.remove(&self.peer);
            }
        }
    }
}

/// Accept connections until `cancel` fires; each runs as a task of `conns`.
pub async fn accept_loop(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: Arc<App>,
    cancel: CancellationToken,
    conns: &TaskTracker,
) {
    let slots = Arc::new(Mutex::new(Slots::default()));
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    super::log(format!("accept: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        Stats::add(&app.stats.connections, 1);
        let _ = stream.set_nodelay(true);
        let slot = {
            let mut s = slots.lock().unwrap_or_else(|e| e.into_inner());
            let mine = s.per_peer.get(&peer.ip()).copied().unwrap_or(0);
            if s.total >= app.cfg.max_connections || mine >= app.cfg.max_connections_per_peer {
                None
            } else {
                s.total += 1;
                *s.per_peer.entry(peer.ip()).or_default() += 1;
                Some(Slot {
                    slots: slots.clone(),
                    peer: peer.ip(),
                })
            }
        };
        let Some(slot) = slot else {
            Stats::add(&app.stats.refused_connections, 1);
            conns.spawn(refuse(stream));
            continue;
        };
        conns.spawn(connection(
            stream,
            peer,
            tls.clone(),
            app.clone(),
            cancel.clone(),
            slot,
        ));
    }
}

/// Over the limits: a short `503` and close (a client retries later), written within a
/// second or not at all.
async fn refuse(mut stream: TcpStream) {
    use tokio::io::AsyncWriteExt;
    let msg = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(msg).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// When a connection last moved a byte, and whether its response waits for the upstream.
pub struct Activity {
    base: Instant,
    last_ms: AtomicU64,
    /// Reads waiting for bytes still on their way from the upstream.
    pub waiting: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Activity {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        self.last_ms
            .store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = self.base.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// A socket that records activity and counts what it sends.
struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
    stats: Arc<Stats>,
    peer: IpAddr,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 {
                self.activity.touch();
                self.stats.sent(self.peer, n as u64);
            }
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 {
                self.activity.touch();
                self.stats.sent(self.peer, n as u64);
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: Arc<App>,
    cancel: CancellationToken,
    _slot: Slot,
) {
    let activity = Arc::new(Activity::new());
    activity.touch();
    let io = Watched {
        inner: stream,
        activity: activity.clone(),
        stats: app.stats.clone(),
        peer: peer.ip(),
    };
    match tls {
        Some(acceptor) => {
            let hs = tokio::time::timeout(app.cfg.idle_timeout, acceptor.accept(io)).await;
            if let Ok(Ok(tls_stream)) = hs {
                serve_http(TokioIo::new(tls_stream), peer, app, activity, cancel).await;
            }
        }
        None => serve_http(TokioIo::new(io), peer, app, activity, cancel).await,
    }
}

async fn serve_http<I>(
    io: I,
    peer: SocketAddr,
    app: Arc<App>,
    activity: Arc<Activity>,
    cancel: CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = {
        let app = app.clone();
        let activity = activity.clone();
        hyper::service::service_fn(move |req| {
            let app = app.clone();
            let activity = activity.clone();
            async move { Ok::<_, Infallible>(handle(app, peer, activity, req).await) }
        })
    };
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(app.cfg.idle_timeout)
        .max_buf_size(app.cfg.max_header_bytes)
        .max_headers(app.cfg.max_headers)
        .keep_alive(true);
    let conn = b.serve_connection(io, svc);
    tokio::pin!(conn);
    let idle = app.cfg.idle_timeout;
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = cancel.cancelled(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep(idle / 4) => {
                if activity.idle_for() >= idle && activity.waiting.load(Ordering::Acquire) == 0 {
                    Stats::add(&app.stats.idle_closed, 1);
                    return;
                }
            }
        }
    }
}

fn plain(status: StatusCode, msg: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::from(msg));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json<T: serde::Serialize>(v: &T) -> Response<Body> {
    let mut r = Response::new(Body::from(
        serde_json::to_vec_pretty(v).expect("serializable"),
    ));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

async fn handle(
    app: Arc<App>,
    _peer: SocketAddr,
    activity: Arc<Activity>,
    req: Request<Incoming>,
) -> Response<Body> {
    Stats::add(&app.stats.requests, 1);
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        // The body is not read: the connection cannot be reused.
        let mut r = plain(StatusCode::PAYLOAD_TOO_LARGE, "requests carry no body\n");
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return r;
    }
    let path = req.uri().path();
    if path == "/" || path == INDEX_PATH {
        return json(&app.index());
    }
    if path == STATS_PATH {
        return json(&app.stats.snapshot());
    }
    let name = path.strip_prefix('/').unwrap_or(path);
    if !super::library::valid_name(name) {
        return plain(StatusCode::NOT_FOUND, "no such bundle\n");
    }
    let entity = match find(&app, name, activity).await {
        Ok(e) => e,
        Err(r) => return r,
    };
    if let Err(why) = super::ranges::check(
        req.headers().get(header::RANGE),
        entity.len,
        app.cfg.max_ranges,
    ) {
        Stats::add(&app.stats.refused_ranges, 1);
        let mut r = plain(StatusCode::RANGE_NOT_SATISFIABLE, "range refused\n");
        let h = r.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&format!("bytes */{}", entity.len)) {
            h.insert(header::CONTENT_RANGE, v);
        }
        h.insert(header::ETAG, entity.etag.clone());
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        if let Ok(v) = HeaderValue::from_str(&why.to_string()) {
            h.insert("x-edge-ota-refused", v);
        }
        return r;
    }
    http_serve::serve(entity, &req)
}

/// The entity for bundle `name`: a file of the directory, else the cache's.
async fn find(
    app: &Arc<App>,
    name: &str,
    activity: Arc<Activity>,
) -> std::result::Result<BundleEntity, Response<Body>> {
    if let Some(b) = app.library.get(name) {
        let b2 = b.clone();
        let opened = tokio::task::spawn_blocking(move || b2.open())
            .await
            .ok()
            .flatten();
        return match opened {
            Some(f) => Ok(BundleEntity {
                len: b.len,
                etag: etag(&b.id),
                content: Content::Local(Arc::new(f)),
                activity,
            }),
            None => {
                // Changed since the scan: look again, and let the client retry.
                let a = app.clone();
                tokio::task::spawn_blocking(move || {
                    if a.library.scan() {
                        a.bump_index();
                    }
                });
                let mut r = plain(StatusCode::SERVICE_UNAVAILABLE, "bundle changed, retry\n");
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                Err(r)
            }
        };
    }
    let Some(cache) = &app.cache else {
        return Err(plain(StatusCode::NOT_FOUND, "no such bundle\n"));
    };
    match cache.get(name).await {
        Ok(reader) => {
            let c = reader.bundle();
            Ok(BundleEntity {
                len: c.len,
                etag: etag(&c.id),
                content: Content::Cached(reader),
                activity,
            })
        }
        Err(f) => Err(failure_response(&f)),
    }
}

fn failure_response(f: &Failure) -> Response<Body> {
    let (status, msg) = match f {
        Failure::NotFound => (StatusCode::NOT_FOUND, "no such bundle upstream\n"),
        Failure::Busy => (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many upstream downloads, retry\n",
        ),
        Failure::NoSpace(_) => (
            StatusCode::INSUFFICIENT_STORAGE,
            "the cache is full of bundles being served\n",
        ),
        Failure::Refused(_) => (
            StatusCode::BAD_GATEWAY,
            "the upstream's bundle was refused (signatures or content)\n",
        ),
        Failure::Upstream(_) => (StatusCode::BAD_GATEWAY, "the upstream cannot be read\n"),
    };
    let mut r = plain(status, msg);
    if matches!(f, Failure::Busy) {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    r
}

/// The strong `ETag` of a bundle: its id (blake3 of the signed manifest), quoted.
pub fn etag(id: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{id}\"")).expect("hex is a valid header value")
}

/// Where a response's bytes come from.
#[derive(Clone)]
enum Content {
    Local(Arc<File>),
    Cached(cache::Reader),
}

struct BundleEntity {
    len: u64,
    etag: HeaderValue,
    content: Content,
    activity: Arc<Activity>,
}

/// State of one range's stream.
struct RangeRead {
    content: Content,
    activity: Arc<Activity>,
    pos: u64,
    end: u64,
    open: cache::OpenFrame,
}

impl RangeRead {
    async fn next(&mut self) -> io::Result<Bytes> {
        let max = ((self.end - self.pos) as usize).min(READ_CHUNK);
        match &self.content {
            Content::Local(f) => {
                let f = f.clone();
                let pos = self.pos;
                tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; max];
                    f.read_exact_at(&mut buf, pos)?;
                    Ok(Bytes::from(buf))
                })
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)))
            }
            Content::Cached(r) => {
                r.read(self.pos, max, &mut self.open, &self.activity.waiting)
                    .await
            }
        }
    }
}

impl http_serve::Entity for BundleEntity {
    type Error = BodyError;
    type Data = Bytes;

    fn len(&self) -> u64 {
        self.len
    }

    fn get_range(
        &self,
        range: Range<u64>,
    ) -> Pin<Box<dyn Stream<Item = std::result::Result<Bytes, BodyError>> + Send + Sync>> {
        let state = RangeRead {
            content: self.content.clone(),
            activity: self.activity.clone(),
            pos: range.start,
            end: range.end,
            open: None,
        };
        let s = futures_util::stream::unfold(state, |mut st| async move {
            if st.pos >= st.end {
                return None;
            }
            match st.next().await {
                Ok(b) if b.is_empty() => Some((
                    Err(BodyError(BoxError::from("no progress reading the bundle"))),
                    RangeRead { pos: st.end, ..st },
                )),
                Ok(b) => {
                    st.pos += b.len() as u64;
                    Some((Ok(b), st))
                }
                // The stream ends after an error: hyper aborts the response.
                Err(e) => Some((
                    Err(BodyError(BoxError::from(e))),
                    RangeRead { pos: st.end, ..st },
                )),
            }
        });
        Box::pin(sync_wrapper::SyncStream::new(s))
    }

    fn add_headers(&self, h: &mut http::HeaderMap) {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
    }

    fn etag(&self) -> Option<HeaderValue> {
        Some(self.etag.clone())
    }

    fn last_modified(&self) -> Option<std::time::SystemTime> {
        None
    }
}
