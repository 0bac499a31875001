//! Bundles over HTTP(S) by range requests: [`HttpSource`] delivers exactly the byte ranges an
//! apply asks for, streaming, resuming from the exact byte after a drop, and refusing to mix
//! bytes of two versions of a file.
//!
//! Built for the links edge devices have: 2 KB/s satellite, LTE whose address changes, links
//! that are up in harbour and down at sea. Hence:
//! - no total-request timeout (a 1 MiB chunk takes minutes at 2 KB/s), but a connect timeout,
//!   an idle timeout (no byte for N seconds) and an optional low-speed timeout;
//! - retries with exponential backoff and full jitter that never give up while bytes arrive
//!   (only after `max_attempts` failed attempts in a row without a delivered byte);
//! - a new connection pool after every failure: a connection opened from the previous LTE
//!   address would hang until the idle timeout instead of failing;
//! - several ranges per request (`multipart/byteranges`) where the server allows it, and every
//!   other server behaviour detected and remembered rather than silently falling back to a
//!   full download.
//!
//! What each server behaviour maps to:
//!
//! | server answer | what happens |
//! |---|---|
//! | `206` multipart, parts exactly as asked | streamed, bytes between wanted ranges dropped |
//! | `206` multipart, a part not asked for, out of order, overlapping, longer than its `Content-Range`, data after the closing boundary | [`Error::Format`] naming the URL |
//! | `206` single part = the first of several ranges asked | used; "single ranges only" remembered |
//! | `206` whose `Content-Length` or body exceeds its `Content-Range` | [`Error::Format`] |
//! | `416` to a multi-range request | "single ranges only" remembered, asked again |
//! | `416` to one range inside the known length | [`Error::Network`] naming the range |
//! | `200` (whole file) with the validator seen at open | "no range support" remembered; the body is read up to the last wanted byte, the rest of it is counted as discarded |
//! | `200` with another validator or length, or no validator after `If-Range` | [`Error::SourceChanged`] |
//! | `206` with another `ETag`/`Last-Modified` or total length | [`Error::SourceChanged`] |
//! | connect error, reset, early end of body, stall, too slow, `408`, `429`, `5xx` | retried from the first byte not yet delivered (`Retry-After` honoured on `429`/`503`) |
//! | TLS failure, other `4xx`, other statuses | [`Error::Network`], not retried |
//!
//! The multipart parser is ours: the crates that parse multipart (`multer`, `multra`,
//! `multipart-stream`, `s3s-multipart`) are async and built for `multipart/form-data` (they
//! find parts by scanning for the boundary and ignore `Content-Range`), `multipart` is a
//! server-side form parser, and `http-range-header`/`http-range` parse the `Range` header for
//! servers. A `multipart/byteranges` answer carries each part's exact length in its
//! `Content-Range`, which lets a small strict parser read parts without scanning their data.

use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, BufReader, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::blocking::{Client, Response};
use reqwest::header::{self, HeaderMap};
use serde::Deserialize;

use super::RangeSource;
use crate::error::{Error, Result};

/// `User-Agent` of every request: servers and proxies can tell updater traffic apart.
pub const USER_AGENT: &str = concat!("edge-ota/", env!("CARGO_PKG_VERSION"));

/// Bytes asked for by the first request: the bundle header the caller reads first anyway.
const HEAD_LEN: u64 = 64 * 1024;
/// Largest single read from a body: bounds what the sink gets at once.
const READ_CHUNK: usize = 64 * 1024;
/// A `Retry-After` longer than this is taken as this: a misconfigured server must not park
/// the device for days.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Idle pooled connections are dropped after this: after a quiet spell the path (LTE
/// address, NAT mapping) has likely changed.
const POOL_IDLE: Duration = Duration::from_secs(20);
/// TCP keepalive probes find a dead peer on a connection that is waiting for the sink.
const TCP_KEEPALIVE: Duration = Duration::from_secs(15);

/// Network settings of an [`HttpSource`]; the configuration embeds them as `[network]`.
/// Durations are given in seconds (`*_secs`, integer or fractional).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpOptions {
    /// Extra trusted CA certificates (PEM, one or more), on top of the built-in roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM), for servers that authenticate devices by TLS.
    pub client_cert: Option<PathBuf>,
    /// Private key of `client_cert` (PEM: PKCS#8, PKCS#1 or SEC1).
    pub client_key: Option<PathBuf>,
    /// Time allowed to establish a TCP (and TLS) connection.
    #[serde(rename = "connect_timeout_secs", deserialize_with = "de_secs")]
    pub connect_timeout: Duration,
    /// A request fails when no byte arrives for this long (waiting for the response head, or
    /// between two reads of a body). Also bounds connecting, together with `connect_timeout`.
    #[serde(rename = "idle_timeout_secs", deserialize_with = "de_secs")]
    pub idle_timeout: Duration,
    /// `(bytes per second, window)`: a connection averaging fewer bytes per second than this
    /// over a window is dropped and the fetch resumed on a new one. Off by default.
    #[serde(deserialize_with = "de_low_speed")]
    pub low_speed: Option<(u64, Duration)>,
    /// Upper bound on the download rate in bytes per second (`--max-rate`), so an update
    /// leaves room for the device's own traffic.
    pub max_rate: Option<u64>,
    /// Give up after this many failed attempts in a row that delivered no byte.
    pub max_attempts: u32,
    /// First retry delay bound; doubled per failed attempt (full jitter: a random delay up to
    /// the bound), up to `backoff_cap`.
    #[serde(rename = "backoff_base_secs", deserialize_with = "de_secs")]
    pub backoff_base: Duration,
    #[serde(rename = "backoff_cap_secs", deserialize_with = "de_secs")]
    pub backoff_cap: Duration,
    /// Wanted ranges separated by fewer bytes than this are fetched as one range, the bytes
    /// between them read and dropped.
    pub coalesce_gap: u64,
    /// Most ranges in one multi-range request.
    pub max_ranges_per_request: usize,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            ca_file: None,
            client_cert: None,
            client_key: None,
            // Satellite round trips are 0.6-1 s and a TLS handshake takes several.
            connect_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            low_speed: None,
            max_rate: None,
            // With the 60 s cap: about ten minutes of a dead link before giving up.
            max_attempts: 15,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(60),
            // A gap costs its bytes; a separate range costs a part header (~100 bytes) in a
            // multi-range request, or a round trip (~1 s, 2 KiB at 2 KB/s) on servers that take
            // one range per request. 8 KiB sits between the two.
            coalesce_gap: 8 * 1024,
            // 64 ranges keep the Range header under 3 KiB, well within server limits (8 KiB).
            max_ranges_per_request: 64,
        }
    }
}

impl HttpOptions {
    /// Refuse values that would make the source hang or spin.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::Usage(format!("network options: {what}")));
        if self.max_attempts == 0 {
            return bad("max_attempts must be at least 1");
        }
        if self.max_ranges_per_request == 0 {
            return bad("max_ranges_per_request must be at least 1");
        }
        if self.idle_timeout.is_zero() || self.connect_timeout.is_zero() {
            return bad("idle and connect timeouts must be above zero");
        }
        if self.max_rate == Some(0) {
            return bad("max_rate must be above zero (leave it out for no limit)");
        }
        if let Some((rate, window)) = self.low_speed {
            if rate == 0 || window.is_zero() {
                return bad("low_speed needs a rate and a window above zero");
            }
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return bad("client_cert and client_key go together");
        }
        Ok(())
    }
}

fn de_secs<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Duration, D::Error> {
    let secs = f64::deserialize(d)?;
    Duration::try_from_secs_f64(secs)
        .map_err(|_| serde::de::Error::custom(format!("{secs}: not a number of seconds")))
}

fn de_low_speed<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<(u64, Duration)>, D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct LowSpeed {
        bytes_per_sec: u64,
        #[serde(deserialize_with = "de_secs")]
        secs: Duration,
    }
    let v = LowSpeed::deserialize(d)?;
    Ok(Some((v.bytes_per_sec, v.secs)))
}

/// Live counters of an [`HttpSource`], shared (`Arc`) so a progress thread can read them
/// while a fetch runs.
#[derive(Debug, Default)]
pub struct HttpCounters {
    wire_bytes: AtomicU64,
    delivered_bytes: AtomicU64,
    discarded_bytes: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// A copy of [`HttpCounters`] at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpStats {
    /// Body bytes received, including multipart framing and dropped bytes.
    pub wire_bytes: u64,
    /// Bytes handed to the sink.
    pub delivered_bytes: u64,
    /// Bytes of the file received and dropped: gaps between coalesced ranges, and whatever a
    /// server without range support sent before a wanted byte.
    pub discarded_bytes: u64,
    /// HTTP requests sent.
    pub requests: u64,
    /// Attempts repeated after a failure.
    pub retries: u64,
    /// The most recent failure, retried or not.
    pub last_error: Option<String>,
}

impl HttpCounters {
    pub fn wire_bytes(&self) -> u64 {
        self.wire_bytes.load(Ordering::Relaxed)
    }
    pub fn delivered_bytes(&self) -> u64 {
        self.delivered_bytes.load(Ordering::Relaxed)
    }
    pub fn discarded_bytes(&self) -> u64 {
        self.discarded_bytes.load(Ordering::Relaxed)
    }
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    pub fn snapshot(&self) -> HttpStats {
        HttpStats {
            wire_bytes: self.wire_bytes(),
            delivered_bytes: self.delivered_bytes(),
            discarded_bytes: self.discarded_bytes(),
            requests: self.requests(),
            retries: self.retries(),
            last_error: self.last_error(),
        }
    }
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    fn set_last_error(&self, e: &str) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    }
}

/// What the server has shown it does with `Range`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeSupport {
    /// Several ranges per request, answered as `multipart/byteranges` (assumed until a
    /// server shows otherwise).
    Multiple,
    /// One range per request.
    Single,
    /// No ranges: every request reads the file from its start.
    None,
}

/// A bundle at an `http://` or `https://` URL, read by range requests.
pub struct HttpSource {
    url: String,
    /// `url` without a password, for messages.
    name: String,
    opts: HttpOptions,
    client: Client,
    len: u64,
    validator: Validator,
    support: RangeSupport,
    /// The first bytes of the file, from the request that opened it, until a fetch uses them.
    head: Option<Vec<u8>>,
    bucket: Option<TokenBucket>,
    counters: Arc<HttpCounters>,
    jitter: Jitter,
}

impl std::fmt::Debug for HttpSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSource")
            .field("url", &self.name)
            .field("len", &self.len)
            .field("validator", &self.validator)
            .field("support", &self.support)
            .finish_non_exhaustive()
    }
}

impl HttpSource {
    /// Open `url`: one request learns the length, the validator (strong `ETag`, else
    /// `Last-Modified`) and whether ranges work, and keeps the first 64 KiB for the first
    /// fetch that asks. Retried like a fetch while the link is down.
    pub fn open(url: &str, opts: &HttpOptions) -> Result<HttpSource> {
        opts.validate()?;
        let mut parsed =
            reqwest::Url::parse(url).map_err(|e| Error::Usage(format!("{url}: not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(Error::Usage(format!(
                "{url}: only http:// and https:// URLs can be fetched"
            )));
        }
        if parsed.password().is_some() {
            // Cannot fail on an http(s) URL with a host.
            let _ = parsed.set_password(Some("***"));
        }
        let mut src = HttpSource {
            url: url.to_string(),
            name: parsed.to_string(),
            opts: opts.clone(),
            client: build_client(opts)?,
            len: 0,
            validator: Validator::default(),
            support: RangeSupport::Multiple,
            head: None,
            bucket: opts.max_rate.map(TokenBucket::new),
            counters: Arc::default(),
            jitter: Jitter::new(),
        };
        let mut failures = 0;
        loop {
            match src.probe() {
                Ok(()) => return Ok(src),
                Err(Fail::Fatal(e)) => return Err(e),
                Err(Fail::Retry {
                    reason,
                    retry_after,
                }) => src.after_failure(&mut failures, false, &reason, retry_after)?,
            }
        }
    }

    /// Counters for progress reports, live while fetches run.
    pub fn counters(&self) -> Arc<HttpCounters> {
        self.counters.clone()
    }

    /// What the server has shown so far.
    pub fn range_support(&self) -> RangeSupport {
        self.support
    }

    /// The validator sent as `If-Range` (strong `ETag`, else `Last-Modified`), if any.
    pub fn validator(&self) -> Option<&str> {
        self.validator.if_range()
    }

    /// The first request: `GET` of the first 64 KiB.
    fn probe(&mut self) -> Result<(), Fail> {
        let req = self
            .client
            .get(&self.url)
            .header(header::RANGE, format!("bytes=0-{}", HEAD_LEN - 1))
            .header(header::ACCEPT_ENCODING, "identity");
        HttpCounters::add(&self.counters.requests, 1);
        let resp = req.send().map_err(|e| self.transport_fail(&e))?;
        let status = resp.status().as_u16();
        match status {
            206 => {
                self.refuse_encoding(&resp)?;
                if is_multipart(&resp) {
                    return Err(self.format("answered one range with a multipart body"));
                }
                let (start, end, total) = match self.content_range(&resp)? {
                    ContentRange::Bytes { start, end, total } => (start, end, total),
                    ContentRange::Unsatisfied { .. } => {
                        return Err(self.format("206 with an unsatisfied Content-Range"))
                    }
                };
                let Some(total) = total else {
                    return Err(Fail::Fatal(self.network(
                        "the server does not tell the file's length (Content-Range with */*)",
                    )));
                };
                if start != 0 || end != total.min(HEAD_LEN) {
                    return Err(self.format(&format!(
                        "asked for bytes 0-{}, got bytes {start}-{}/{total}",
                        HEAD_LEN - 1,
                        end.saturating_sub(1)
                    )));
                }
                self.check_content_length(&resp, end - start)?;
                self.len = total;
                self.validator = Validator::from_headers(resp.headers());
                self.support = RangeSupport::Multiple;
                self.read_head(resp, end)
            }
            200 => {
                self.refuse_encoding(&resp)?;
                let Some(len) = content_length(&resp) else {
                    return Err(Fail::Fatal(self.network(
                        "the server supports no ranges and does not tell the file's length",
                    )));
                };
                self.len = len;
                self.validator = Validator::from_headers(resp.headers());
                self.support = RangeSupport::None;
                // The rest of the body is not read: dropping the response closes the
                // connection rather than downloading the whole file now.
                self.read_head(resp, len.min(HEAD_LEN))
            }
            416 => match self.content_range(&resp)? {
                // Only an empty file has no byte 0.
                ContentRange::Unsatisfied { total: 0 } => {
                    self.len = 0;
                    self.validator = Validator::from_headers(resp.headers());
                    self.head = Some(Vec::new());
                    Ok(())
                }
                _ => Err(Fail::Fatal(self.network(
                    "the server refused bytes 0-65535 as unsatisfiable (HTTP 416)",
                ))),
            },
            _ => Err(self.status_fail(&resp)),
        }
    }

    /// Read the first `n` bytes of a body into `head`. A drop after some bytes keeps what
    /// arrived: the validator is known, the rest will be fetched by range.
    fn read_head(&mut self, resp: Response, n: u64) -> Result<(), Fail> {
        let mut head = Vec::with_capacity(n as usize);
        let mut body = Body::new(resp, &self.opts, &self.counters, self.bucket.as_mut());
        let mut buf = vec![0u8; READ_CHUNK];
        while (head.len() as u64) < n {
            let want = ((n - head.len() as u64) as usize).min(buf.len());
            match body.read(&mut buf[..want]) {
                Ok(0) if head.is_empty() => {
                    return Err(Fail::retry("body ended at byte 0".to_string()))
                }
                Ok(0) => break,
                Ok(k) => head.extend_from_slice(&buf[..k]),
                Err(_) if !head.is_empty() => break,
                Err(e) => return Err(Fail::retry(io_reason(&e, 0))),
            }
        }
        if self.support != RangeSupport::None && head.len() as u64 == n {
            body.expect_end(&self.name)?;
        }
        self.head = Some(head);
        Ok(())
    }

    /// One request for (the first ranges of) `todo`; delivered bytes are removed from it.
    fn attempt(
        &mut self,
        todo: &mut VecDeque<Range<u64>>,
        sink: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<Step, Fail> {
        let spans = match self.support {
            RangeSupport::None => Vec::new(),
            RangeSupport::Single => plan(todo, self.opts.coalesce_gap, 1),
            RangeSupport::Multiple => plan(
                todo,
                self.opts.coalesce_gap,
                self.opts.max_ranges_per_request,
            ),
        };
        let mut req = self
            .client
            .get(&self.url)
            .header(header::ACCEPT_ENCODING, "identity");
        let mut sent_if_range = false;
        if !spans.is_empty() {
            req = req.header(header::RANGE, range_header(&spans));
            if let Some(v) = self.validator.if_range() {
                req = req.header(header::IF_RANGE, v);
                sent_if_range = true;
            }
        }
        HttpCounters::add(&self.counters.requests, 1);
        let resp = req.send().map_err(|e| self.transport_fail(&e))?;
        match resp.status().as_u16() {
            206 if spans.is_empty() => Err(self.format("206 to a request without Range")),
            206 => {
                self.check_same_file(&resp)?;
                self.refuse_encoding(&resp)?;
                if is_multipart(&resp) {
                    self.read_multipart(resp, &spans, todo, sink)
                } else {
                    self.read_single(resp, &spans, todo, sink)
                }
            }
            200 => self.read_whole(resp, sent_if_range, todo, sink),
            416 if spans.len() > 1 => {
                // Some servers and proxies refuse multi-range requests outright.
                self.support = RangeSupport::Single;
                Ok(Step::ModeChanged)
            }
            416 if !spans.is_empty() => {
                if let Ok(ContentRange::Unsatisfied { total }) = self.content_range(&resp) {
                    if total != self.len {
                        return Err(self.changed(&format!(
                            "its length is now {total} bytes, was {}",
                            self.len
                        )));
                    }
                }
                let s = &spans[0];
                Err(Fail::Fatal(self.network(&format!(
                    "the server refused bytes {}-{} of a {}-byte file as unsatisfiable (HTTP 416)",
                    s.start,
                    s.end - 1,
                    self.len
                ))))
            }
            _ => Err(self.status_fail(&resp)),
        }
    }

    /// A single-part `206`: the first requested range, or several coalesced by the server.
    fn read_single(
        &mut self,
        resp: Response,
        spans: &[Range<u64>],
        todo: &mut VecDeque<Range<u64>>,
        sink: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<Step, Fail> {
        let (start, end) = match self.content_range(&resp)? {
            ContentRange::Bytes { start, end, total } => {
                self.check_total(total)?;
                (start, end)
            }
            ContentRange::Unsatisfied { .. } => {
                return Err(self.format("206 with an unsatisfied Content-Range"))
            }
        };
        let covered = match_spans(spans, start, end).ok_or_else(|| {
            self.format(&format!(
                "answered bytes {start}-{}, not what was asked ({})",
                end - 1,
                range_header(spans)
            ))
        })?;
        self.check_content_length(&resp, end - start)?;
        if covered < spans.len() {
            // It answered only the first of several ranges: it takes one per request.
            self.support = RangeSupport::Single;
        }
        let mut body = Body::new(resp, &self.opts, &self.counters, self.bucket.as_mut());
        let mut out = Deliver::new(todo, sink, &self.counters);
        copy_exact(&mut body, start, end - start, &mut out)?;
        body.expect_end(&self.name)?;
        Ok(Step::Done)
    }

    /// A `multipart/byteranges` answer: each part must be the next range asked for (or a
    /// run of them coalesced), in order.
    fn read_multipart(
        &mut self,
        resp: Response,
        spans: &[Range<u64>],
        todo: &mut VecDeque<Range<u64>>,
        sink: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<Step, Fail> {
        let ctype = header_str(resp.headers(), header::CONTENT_TYPE).unwrap_or_default();
        let boundary = multipart::boundary(&ctype).map_err(|e| self.format(&e))?;
        let (name, len) = (self.name.clone(), self.len);
        let body = Body::new(resp, &self.opts, &self.counters, self.bucket.as_mut());
        let mut parts =
            multipart::Multipart::new(BufReader::with_capacity(16 * 1024, body), &boundary);
        let mut out = Deliver::new(todo, sink, &self.counters);
        let mut next = 0;
        let mut buf = vec![0u8; READ_CHUNK];
        let mp_fail = |e: multipart::MpError, at: u64| match e {
            multipart::MpError::Io(e) => Fail::retry(io_reason(&e, at)),
            multipart::MpError::Malformed(m) => Fail::Fatal(Error::Format(format!(
                "{name}: multipart/byteranges answer: {m}"
            ))),
        };
        loop {
            let part = match parts.next_part() {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => return Err(mp_fail(e, out.next_wanted())),
            };
            if part.total.is_some_and(|t| t != len) {
                return Err(Fail::Fatal(Error::SourceChanged {
                    url: name,
                    reason: format!(
                        "a part says the file has {} bytes, it had {len}",
                        part.total.unwrap_or_default()
                    ),
                }));
            }
            let covered = match_spans(&spans[next.min(spans.len())..], part.start, part.end)
                .ok_or_else(|| {
                    Fail::Fatal(Error::Format(format!(
                        "{name}: multipart/byteranges part bytes {}-{} was not asked for next (asked {})",
                        part.start,
                        part.end - 1,
                        range_header(spans)
                    )))
                })?;
            next += covered;
            let mut at = part.start;
            loop {
                let n = parts.read(&mut buf).map_err(|e| mp_fail(e, at))?;
                if n == 0 {
                    break;
                }
                out.feed(at, &buf[..n])?;
                at += n as u64;
            }
        }
        if next < spans.len() {
            return Err(Fail::retry(format!(
                "the multipart answer ended after {next} of {} ranges",
                spans.len()
            )));
        }
        Ok(Step::Done)
    }

    /// A `200`: the whole file. Used when it is the file seen at open (the server ignores
    /// ranges); refused when it may be another one.
    fn read_whole(
        &mut self,
        resp: Response,
        sent_if_range: bool,
        todo: &mut VecDeque<Range<u64>>,
        sink: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<Step, Fail> {
        self.check_same_file(&resp)?;
        let seen = Validator::from_headers(resp.headers());
        if sent_if_range && !self.validator.confirmed_by(&seen) {
            // A 200 to If-Range means "the validator no longer matches", unless the answer
            // proves it is the same file (a server that ignores Range ignores If-Range too).
            return Err(self.changed(
                "the server answered If-Range with the whole file and no matching validator",
            ));
        }
        if let Some(cl) = content_length(&resp) {
            if cl != self.len {
                return Err(
                    self.changed(&format!("its length is now {cl} bytes, was {}", self.len))
                );
            }
        }
        self.refuse_encoding(&resp)?;
        // Remember: asking again for ranges would only cost round trips.
        self.support = RangeSupport::None;
        let len = self.len;
        let name = self.name.clone();
        let mut body = Body::new(resp, &self.opts, &self.counters, self.bucket.as_mut());
        let mut out = Deliver::new(todo, sink, &self.counters);
        let mut buf = vec![0u8; READ_CHUNK];
        let mut at = 0u64;
        while !out.done() {
            let n = match body.read(&mut buf) {
                Ok(0) => {
                    return Err(Fail::retry(format!(
                        "body ended early at byte {at} of {len}"
                    )))
                }
                Ok(n) => n,
                Err(e) => return Err(Fail::retry(io_reason(&e, at))),
            };
            if at + n as u64 > len {
                return Err(Fail::Fatal(Error::Format(format!(
                    "{name}: the server sent more than the file's {len} bytes"
                ))));
            }
            out.feed(at, &buf[..n])?;
            at += n as u64;
        }
        // The rest of the body is not wanted: dropping the response closes the connection.
        Ok(Step::Done)
    }

    /// Sleep before the next attempt, or give up. `progressed`: the failed attempt
    /// delivered bytes, which resets the count of failures.
    fn after_failure(
        &mut self,
        failures: &mut u32,
        progressed: bool,
        reason: &str,
        retry_after: Option<Duration>,
    ) -> Result<()> {
        self.counters.set_last_error(reason);
        if progressed {
            *failures = 0;
        } else {
            *failures += 1;
            if *failures >= self.opts.max_attempts {
                let n = *failures;
                return Err(self.network(&format!(
                    "{reason} (gave up after {n} attempt{} in a row without progress)",
                    if n == 1 { "" } else { "s" }
                )));
            }
        }
        HttpCounters::add(&self.counters.retries, 1);
        let mut wait = backoff(
            &mut self.jitter,
            self.opts.backoff_base,
            self.opts.backoff_cap,
            (*failures).max(1),
        );
        if let Some(ra) = retry_after {
            wait = wait.max(ra.min(MAX_RETRY_AFTER));
        }
        std::thread::sleep(wait);
        // New pool: no connection from before the failure (or before an address change).
        self.client = build_client(&self.opts)?;
        Ok(())
    }

    fn network(&self, reason: &str) -> Error {
        Error::Network {
            url: self.name.clone(),
            reason: reason.to_string(),
        }
    }

    fn format(&self, what: &str) -> Fail {
        Fail::Fatal(Error::Format(format!("{}: {what}", self.name)))
    }

    fn changed(&self, reason: &str) -> Fail {
        Fail::Fatal(Error::SourceChanged {
            url: self.name.clone(),
            reason: reason.to_string(),
        })
    }

    /// A failure to get a response at all.
    fn transport_fail(&self, e: &reqwest::Error) -> Fail {
        let cause = error_chain(e);
        if has_tls_failure(e) {
            // Certificates do not fix themselves: retrying would only delay the answer.
            return Fail::Fatal(self.network(&format!("TLS: {cause}")));
        }
        if e.is_builder() || e.is_redirect() {
            return Fail::Fatal(self.network(&cause));
        }
        let reason = if e.is_timeout() {
            format!(
                "no answer within {}s (idle timeout)",
                self.opts.idle_timeout.as_secs_f64()
            )
        } else if e.is_connect() {
            format!("cannot connect: {cause}")
        } else {
            cause
        };
        Fail::retry(reason)
    }

    /// A status that carries no body we use.
    fn status_fail(&self, resp: &Response) -> Fail {
        let status = resp.status();
        let code = status.as_u16();
        let reason = format!("HTTP {status}");
        match code {
            408 | 429 | 500..=599 => Fail::Retry {
                reason,
                retry_after: if code == 429 || code == 503 {
                    retry_after(resp.headers(), SystemTime::now())
                } else {
                    None
                },
            },
            _ => Fail::Fatal(self.network(&reason)),
        }
    }

    fn content_range(&self, resp: &Response) -> Result<ContentRange, Fail> {
        let v = header_str(resp.headers(), header::CONTENT_RANGE)
            .ok_or_else(|| self.format(&format!("HTTP {} without Content-Range", resp.status())))?;
        parse_content_range(&v)
            .ok_or_else(|| self.format(&format!("unreadable Content-Range {v:?}")))
    }

    fn check_total(&self, total: Option<u64>) -> Result<(), Fail> {
        match total {
            Some(t) if t != self.len => {
                Err(self.changed(&format!("its length is now {t} bytes, was {}", self.len)))
            }
            _ => Ok(()),
        }
    }

    /// `Content-Length` must be what `Content-Range` announces: a longer body is bytes not
    /// asked for, never silently accepted.
    fn check_content_length(&self, resp: &Response, want: u64) -> Result<(), Fail> {
        match content_length(resp) {
            Some(cl) if cl != want => Err(self.format(&format!(
                "Content-Length {cl} for a range of {want} bytes ({} bytes {} than asked)",
                cl.abs_diff(want),
                if cl > want { "more" } else { "fewer" }
            ))),
            _ => Ok(()),
        }
    }

    fn check_same_file(&self, resp: &Response) -> Result<(), Fail> {
        let seen = Validator::from_headers(resp.headers());
        match self.validator.differs(&seen) {
            Some(why) => Err(self.changed(&why)),
            None => Ok(()),
        }
    }

    /// Compressed bytes are not the file's bytes at those offsets.
    fn refuse_encoding(&self, resp: &Response) -> Result<(), Fail> {
        match header_str(resp.headers(), header::CONTENT_ENCODING) {
            Some(enc) if !enc.trim().eq_ignore_ascii_case("identity") => {
                Err(Fail::Fatal(self.network(&format!(
                    "the server encoded the answer (Content-Encoding: {enc}) although asked for identity"
                ))))
            }
            _ => Ok(()),
        }
    }
}

impl RangeSource for HttpSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn is_remote(&self) -> bool {
        true
    }

    fn fetch(
        &mut self,
        ranges: &[Range<u64>],
        sink: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let mut todo = VecDeque::with_capacity(ranges.len());
        let mut prev_end = 0;
        for r in ranges {
            if r.start > r.end || r.start < prev_end {
                return Err(Error::Usage(format!(
                    "{}: ranges must be sorted and not overlap ({}..{} after ..{prev_end})",
                    self.name, r.start, r.end
                )));
            }
            if r.end > self.len {
                return Err(Error::Truncated(format!(
                    "{} is {} bytes, a range ends at {}",
                    self.name, self.len, r.end
                )));
            }
            prev_end = r.end;
            if !r.is_empty() {
                todo.push_back(r.clone());
            }
        }
        self.serve_head(&mut todo, sink)?;
        let mut failures = 0;
        while !todo.is_empty() {
            let before = remaining(&todo);
            match self.attempt(&mut todo, sink) {
                Ok(Step::Done) => failures = 0,
                Ok(Step::ModeChanged) => {}
                Err(Fail::Fatal(e)) => return Err(e),
                Err(Fail::Retry {
                    reason,
                    retry_after,
                }) => {
                    let progressed = remaining(&todo) < before;
                    self.after_failure(&mut failures, progressed, &reason, retry_after)?;
                }
            }
        }
        Ok(())
    }
}

impl HttpSource {
    /// Deliver from the bytes kept at open what `todo` starts with. They are kept for every
    /// fetch: a caller reads the header, then the manifest, then the first chunks, all often
    /// within them, and none of those bytes should cross a 2 KB/s link twice.
    fn serve_head(
        &mut self,
        todo: &mut VecDeque<Range<u64>>,
        sink: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let Some(head) = self.head.take() else {
            return Ok(());
        };
        let hl = head.len() as u64;
        let mut r = Ok(());
        while let Some(front) = todo.front_mut() {
            if front.start >= hl {
                break;
            }
            let end = front.end.min(hl);
            r = sink(front.start, &head[front.start as usize..end as usize]);
            if r.is_err() {
                break;
            }
            HttpCounters::add(&self.counters.delivered_bytes, end - front.start);
            if end == front.end {
                todo.pop_front();
            } else {
                front.start = end;
                break;
            }
        }
        self.head = Some(head);
        r
    }
}

/// What one attempt achieved.
enum Step {
    /// Its whole request was answered and delivered.
    Done,
    /// The server refused the form of the request; ask again differently.
    ModeChanged,
}

/// Why an attempt failed.
enum Fail {
    /// Transient: retried after a backoff.
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Returned as is (errors from the sink included).
    Fatal(Error),
}

impl Fail {
    fn retry(reason: String) -> Fail {
        Fail::Retry {
            reason,
            retry_after: None,
        }
    }
}

fn remaining(todo: &VecDeque<Range<u64>>) -> u64 {
    todo.iter().map(|r| r.end - r.start).sum()
}

/// The spans of the next request: the first ranges of `todo`, merged where the gap between
/// them is below `gap` (adjacent ones always), at most `max` spans.
fn plan(todo: &VecDeque<Range<u64>>, gap: u64, max: usize) -> Vec<Range<u64>> {
    let mut spans: Vec<Range<u64>> = Vec::new();
    for r in todo {
        if let Some(last) = spans.last_mut() {
            if r.start - last.end < gap.max(1) {
                last.end = r.end;
                continue;
            }
        }
        if spans.len() == max {
            break;
        }
        spans.push(r.clone());
    }
    spans
}

/// `bytes=a-b,c-d` (inclusive ends).
fn range_header(spans: &[Range<u64>]) -> String {
    let list: Vec<String> = spans
        .iter()
        .map(|s| format!("{}-{}", s.start, s.end - 1))
        .collect();
    format!("bytes={}", list.join(","))
}

/// How many spans, from the first, `start..end` covers exactly (a server may coalesce
/// neighbouring ranges into one, RFC 9110 §14.2); `None` when it is anything else.
fn match_spans(spans: &[Range<u64>], start: u64, end: u64) -> Option<usize> {
    if spans.first()?.start != start {
        return None;
    }
    spans.iter().position(|s| s.end == end).map(|i| i + 1)
}

/// Hands the wanted bytes of a stream to the sink and drops the others.
struct Deliver<'a> {
    todo: &'a mut VecDeque<Range<u64>>,
    sink: &'a mut dyn FnMut(u64, &[u8]) -> Result<()>,
    counters: &'a HttpCounters,
}

impl<'a> Deliver<'a> {
    fn new(
        todo: &'a mut VecDeque<Range<u64>>,
        sink: &'a mut dyn FnMut(u64, &[u8]) -> Result<()>,
        counters: &'a HttpCounters,
    ) -> Self {
        Deliver {
            todo,
            sink,
            counters,
        }
    }

    fn done(&self) -> bool {
        self.todo.is_empty()
    }

    fn next_wanted(&self) -> u64 {
        self.todo.front().map_or(0, |r| r.start)
    }

    /// `data` is the file's bytes at `at..`: deliver those still wanted, in order.
    fn feed(&mut self, mut at: u64, mut data: &[u8]) -> Result<(), Fail> {
        while !data.is_empty() {
            let Some(front) = self.todo.front_mut() else {
                HttpCounters::add(&self.counters.discarded_bytes, data.len() as u64);
                return Ok(());
            };
            if at < front.start {
                let skip = (front.start - at).min(data.len() as u64);
                HttpCounters::add(&self.counters.discarded_bytes, skip);
                at += skip;
                data = &data[skip as usize..];
                continue;
            }
            if at > front.start {
                // Parts are checked against the request before their bytes are read, so
                // this would be a bug here, not a server fault: never deliver out of order.
                return Err(Fail::Fatal(Error::Format(format!(
                    "internal: bytes at {at} arrived before bytes at {}",
                    front.start
                ))));
            }
            let n = (front.end - at).min(data.len() as u64);
            (self.sink)(at, &data[..n as usize]).map_err(Fail::Fatal)?;
            HttpCounters::add(&self.counters.delivered_bytes, n);
            front.start += n;
            if front.start == front.end {
                self.todo.pop_front();
            }
            at += n;
            data = &data[n as usize..];
        }
        Ok(())
    }
}

/// Read exactly `n` bytes of the file starting at `at` from `r` into `out`.
fn copy_exact(r: &mut impl Read, mut at: u64, n: u64, out: &mut Deliver<'_>) -> Result<(), Fail> {
    let end = at + n;
    let mut buf = vec![0u8; READ_CHUNK];
    while at < end {
        let want = ((end - at) as usize).min(buf.len());
        let k = match r.read(&mut buf[..want]) {
            Ok(0) => return Err(Fail::retry(format!("body ended early at byte {at}"))),
            Ok(k) => k,
            Err(e) => return Err(Fail::retry(io_reason(&e, at))),
        };
        out.feed(at, &buf[..k])?;
        at += k as u64;
    }
    Ok(())
}

/// A response body with the idle and low-speed timeouts, the rate limit and the wire
/// counter applied around each read.
struct Body<'a> {
    resp: Response,
    counters: &'a HttpCounters,
    bucket: Option<&'a mut TokenBucket>,
    idle: Duration,
    low_speed: Option<(u64, Duration)>,
    /// Time spent inside reads and bytes they returned in the current low-speed window.
    /// Only time inside reads counts: a slow sink (disk) must not look like a slow link.
    win_time: Duration,
    win_bytes: u64,
    /// A low-speed verdict reached after a read that returned bytes: reported on the next
    /// read, so those bytes are not lost.
    pending: Option<io::Error>,
}

impl<'a> Body<'a> {
    fn new(
        resp: Response,
        opts: &HttpOptions,
        counters: &'a HttpCounters,
        bucket: Option<&'a mut TokenBucket>,
    ) -> Self {
        Body {
            resp,
            counters,
            bucket,
            idle: opts.idle_timeout,
            low_speed: opts.low_speed,
            win_time: Duration::ZERO,
            win_bytes: 0,
            pending: None,
        }
    }

    /// After the last expected byte the body must end: anything more is bytes not asked for.
    fn expect_end(&mut self, name: &str) -> Result<(), Fail> {
        let mut probe = [0u8; 1];
        match self.read(&mut probe) {
            Ok(0) => Ok(()),
            Ok(_) => Err(Fail::Fatal(Error::Format(format!(
                "{name}: the server sent more bytes than its Content-Range announces"
            )))),
            // Every wanted byte arrived; a failure while confirming the end costs nothing.
            Err(_) => Ok(()),
        }
    }
}

impl Read for Body<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(e) = self.pending.take() {
            return Err(e);
        }
        let mut want = buf.len();
        if let Some(b) = self.bucket.as_deref_mut() {
            want = b.grant(want);
        }
        let t0 = Instant::now();
        let res = self.resp.read(&mut buf[..want]);
        let dt = t0.elapsed();
        match res {
            Ok(n) => {
                HttpCounters::add(&self.counters.wire_bytes, n as u64);
                if let Some(b) = self.bucket.as_deref_mut() {
                    b.take(n);
                }
                if let Some((rate, window)) = self.low_speed {
                    self.win_time += dt;
                    self.win_bytes += n as u64;
                    if self.win_time >= window {
                        let secs = self.win_time.as_secs_f64();
                        if (self.win_bytes as f64) < rate as f64 * secs {
                            self.pending = Some(io::Error::new(
                                io::ErrorKind::TimedOut,
                                format!(
                                    "too slow: {} bytes in {secs:.1}s, below the low-speed limit of {rate} bytes/s",
                                    self.win_bytes
                                ),
                            ));
                        }
                        self.win_time = Duration::ZERO;
                        self.win_bytes = 0;
                    }
                }
                Ok(n)
            }
            Err(e) if is_read_timeout(&e) || dt >= self.idle => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "stalled: no data for {}s (idle timeout)",
                    self.idle.as_secs_f64()
                ),
            )),
            Err(e) => Err(e),
        }
    }
}

fn is_read_timeout(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::TimedOut
        || e.get_ref()
            .and_then(|i| i.downcast_ref::<reqwest::Error>())
            .is_some_and(|r| r.is_timeout())
}

/// A token bucket: `rate` bytes per second, bursts of a quarter second at most.
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u64) -> Self {
        let burst = (rate as f64 / 4.0).clamp((rate as f64).min(256.0), 64.0 * 1024.0);
        TokenBucket {
            rate: rate as f64,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
    }

    /// How many bytes the next read may take; sleeps until at least one is allowed.
    fn grant(&mut self, want: usize) -> usize {
        self.refill();
        if self.tokens < 1.0 {
            std::thread::sleep(Duration::from_secs_f64((1.0 - self.tokens) / self.rate));
            self.refill();
        }
        want.min(self.tokens.max(1.0) as usize).max(1)
    }

    fn take(&mut self, n: usize) {
        self.tokens -= n as f64;
    }
}

/// Full-jitter delays without a random-number crate: a xorshift generator seeded from the
/// process's randomly keyed hasher (devices restarted together must not retry together).
struct Jitter(u64);

impl Jitter {
    fn new() -> Self {
        Jitter(RandomState::new().build_hasher().finish() | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// A random delay in `0..=min(cap, base * 2^(failures-1))` ("full jitter").
fn backoff(j: &mut Jitter, base: Duration, cap: Duration, failures: u32) -> Duration {
    let exp = base
        .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
        .min(cap);
    let nanos = exp.as_nanos().min(u64::MAX as u128) as u64;
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(j.next() % (nanos + 1))
}

/// What identifies the file's version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Validator {
    etag: Option<String>,
    last_modified: Option<String>,
}

impl Validator {
    fn from_headers(h: &HeaderMap) -> Self {
        Validator {
            etag: header_str(h, header::ETAG).map(|s| s.trim().to_string()),
            last_modified: header_str(h, header::LAST_MODIFIED).map(|s| s.trim().to_string()),
        }
    }

    fn strong_etag(&self) -> Option<&str> {
        self.etag.as_deref().filter(|e| !e.starts_with("W/"))
    }

    /// For `If-Range`, which takes a strong ETag or a date.
    fn if_range(&self) -> Option<&str> {
        self.strong_etag().or(self.last_modified.as_deref())
    }

    /// Why `seen` is another version of the file, if its validators say so.
    fn differs(&self, seen: &Validator) -> Option<String> {
        if let (Some(a), Some(b)) = (&self.etag, &seen.etag) {
            if a != b {
                return Some(format!("its ETag is now {b}, was {a}"));
            }
        }
        if let (Some(a), Some(b)) = (&self.last_modified, &seen.last_modified) {
            if a != b {
                return Some(format!("its Last-Modified is now {b}, was {a}"));
            }
        }
        None
    }

    /// Whether `seen` proves the same version: it carries the validator sent as `If-Range`.
    fn confirmed_by(&self, seen: &Validator) -> bool {
        match (self.strong_etag(), &self.last_modified) {
            (Some(e), _) => seen.strong_etag() == Some(e),
            (None, Some(lm)) => seen.last_modified.as_deref() == Some(lm),
            (None, None) => true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ContentRange {
    /// `bytes first-last/total`; `end` is exclusive, `total` `None` for `*`.
    Bytes {
        start: u64,
        end: u64,
        total: Option<u64>,
    },
    /// `bytes */total` (with a 416).
    Unsatisfied { total: u64 },
}

/// Strict `Content-Range` (RFC 9110 §14.4): unit `bytes`, decimal digits only.
fn parse_content_range(v: &str) -> Option<ContentRange> {
    let v = v.trim();
    let (unit, rest) = v.split_once(' ')?;
    if !unit.eq_ignore_ascii_case("bytes") {
        return None;
    }
    let (range, total) = rest.split_once('/')?;
    let total = match total {
        "*" => None,
        t => Some(digits(t)?),
    };
    if range == "*" {
        return Some(ContentRange::Unsatisfied { total: total? });
    }
    let (first, last) = range.split_once('-')?;
    let (first, last) = (digits(first)?, digits(last)?);
    if last < first || total.is_some_and(|t| last >= t) {
        return None;
    }
    Some(ContentRange::Bytes {
        start: first,
        end: last.checked_add(1)?,
        total,
    })
}

fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn header_str(h: &HeaderMap, name: header::HeaderName) -> Option<String> {
    h.get(name)?.to_str().ok().map(str::to_string)
}

fn content_length(resp: &Response) -> Option<u64> {
    header_str(resp.headers(), header::CONTENT_LENGTH).and_then(|v| digits(v.trim()))
}

fn is_multipart(resp: &Response) -> bool {
    header_str(resp.headers(), header::CONTENT_TYPE).is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("multipart/byteranges"))
    })
}

/// `Retry-After`: delay-seconds or an HTTP date (IMF-fixdate).
fn retry_after(h: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let v = header_str(h, header::RETRY_AFTER)?;
    let v = v.trim();
    if let Some(s) = digits(v) {
        return Some(Duration::from_secs(s));
    }
    let at = parse_http_date(v)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the form servers send (RFC 9110 §5.6.7).
fn parse_http_date(s: &str) -> Option<SystemTime> {
    let f: Vec<&str> = s.split(' ').collect();
    let [wd, day, mon, year, time, "GMT"] = f.as_slice() else {
        return None;
    };
    if wd.len() != 4 || !wd.ends_with(',') || day.len() != 2 || year.len() != 4 {
        return None;
    }
    let day = digits(day)?;
    let year = digits(year)?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| m == mon)? as u64
        + 1;
    let t: Vec<&str> = time.split(':').collect();
    let [h, m, sec] = t.as_slice() else {
        return None;
    };
    let (h, m, sec) = (digits(h)?, digits(m)?, digits(sec)?);
    if !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 || year < 1970 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm), years from March.
    let (y, mo) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * mo + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    Some(UNIX_EPOCH + Duration::from_secs(days * 86_400 + h * 3600 + m * 60 + sec))
}

/// An error and its causes, each once: "cannot connect: Connection refused (os error 111)"
/// says more than reqwest's outermost message.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = cur {
        let msg = err.to_string();
        if !parts.iter().any(|p| p.contains(&msg)) {
            parts.push(msg);
        }
        cur = err.source();
    }
    // The innermost causes are the informative ones; reqwest's outer message repeats the URL.
    if parts.len() > 2 {
        parts.drain(..parts.len() - 2);
    }
    parts.join(": ")
}

/// TLS handshake failures surface as `InvalidData` I/O errors (tokio-rustls), which
/// hyper-rustls wraps in another I/O error: `source()` skips such a wrapped error, so
/// `get_ref()` is followed too.
fn has_tls_failure(e: &reqwest::Error) -> bool {
    fn invalid_data(io: &io::Error) -> bool {
        io.kind() == io::ErrorKind::InvalidData
            || io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<io::Error>())
                .is_some_and(invalid_data)
    }
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<io::Error>().is_some_and(invalid_data) {
            return true;
        }
        cur = err.source();
    }
    false
}

fn io_reason(e: &io::Error, at: u64) -> String {
    format!("{} at byte {at}", error_chain(e))
}

/// A client with the configured TLS trust, client certificate and connect/idle timeouts (no
/// total-request timeout), for other requests to the same servers (the agent's desired state).
pub fn build_client(opts: &HttpOptions) -> Result<Client> {
    let mut b = Client::builder()
        .user_agent(USER_AGENT)
        .connect_timeout(opts.connect_timeout)
        // In reqwest's blocking client `timeout` bounds each wait separately: for the
        // response head, and for every read of the body (reqwest 0.12,
        // blocking/client.rs, blocking/response.rs): exactly an idle timeout, not a total.
        // (The async client's `timeout` is a total deadline; it is not used.)
        .timeout(opts.idle_timeout)
        .tcp_keepalive(TCP_KEEPALIVE)
        .pool_idle_timeout(POOL_IDLE);
    // Proxies come from HTTP_PROXY/HTTPS_PROXY/NO_PROXY: reqwest's default, kept.
    if let Some(path) = &opts.ca_file {
        let pem = read_file(path)?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            config_error(path, &format!("not PEM certificates: {}", error_chain(&e)))
        })?;
        if certs.is_empty() {
            return Err(config_error(path, "no certificate in the file"));
        }
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    if let (Some(cert), Some(key)) = (&opts.client_cert, &opts.client_key) {
        // reqwest (rustls) takes the key and the chain as one PEM buffer.
        let mut pem = read_file(key)?;
        pem.push(b'\n');
        pem.extend_from_slice(&read_file(cert)?);
        let id = reqwest::Identity::from_pem(&pem).map_err(|e| {
            config_error(
                cert,
                &format!(
                    "client certificate with key {}: {}",
                    key.display(),
                    error_chain(&e)
                ),
            )
        })?;
        b = b.identity(id);
    }
    b.build().map_err(|e| Error::Config {
        path: "[network]".into(),
        reason: error_chain(&e),
    })
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))
}

fn config_error(path: &Path, reason: &str) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// A strict streaming reader of `multipart/byteranges` bodies (RFC 9110 §14.6, RFC 2046
/// §5.1). Each part's `Content-Range` gives its exact length, so part data is read by count,
/// never scanned for the boundary; anything not in the grammar is refused.
mod multipart {
    use std::io::{self, BufRead};

    use super::{parse_content_range, ContentRange};

    /// Longest header or delimiter line accepted.
    const MAX_LINE: usize = 1024;
    /// Most header fields in a part (servers send Content-Type and Content-Range).
    const MAX_FIELDS: usize = 16;
    /// Most empty lines before the first delimiter (nginx and Apache send one).
    const MAX_LEADING_BLANKS: usize = 2;
    /// Most bytes after the closing delimiter, all of them CR, LF, space or tab.
    const MAX_EPILOGUE: usize = 64;

    #[derive(Debug)]
    pub(super) enum MpError {
        /// The stream failed or ended early: transient.
        Io(io::Error),
        /// Not a valid answer: final.
        Malformed(String),
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) struct Part {
        pub start: u64,
        /// Exclusive.
        pub end: u64,
        pub total: Option<u64>,
    }

    /// The `boundary` parameter of a `multipart/byteranges` Content-Type.
    pub(super) fn boundary(content_type: &str) -> Result<String, String> {
        let mut it = content_type.split(';');
        let media = it.next().unwrap_or_default().trim();
        if !media.eq_ignore_ascii_case("multipart/byteranges") {
            return Err(format!(
                "Content-Type {content_type:?} is not multipart/byteranges"
            ));
        }
        for param in it {
            let Some((k, v)) = param.split_once('=') else {
                continue;
            };
            if !k.trim().eq_ignore_ascii_case("boundary") {
                continue;
            }
            let v = v.trim();
            let v = match v.strip_prefix('"') {
                Some(q) => q
                    .strip_suffix('"')
                    .ok_or_else(|| format!("unterminated boundary in {content_type:?}"))?,
                None => v,
            };
            // RFC 2046 bchars, 1 to 70 of them, not ending in a space.
            let ok = (1..=70).contains(&v.len())
                && !v.ends_with(' ')
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"'()+_,-./:=? ".contains(&b));
            if !ok {
                return Err(format!("invalid boundary {v:?}"));
            }
            return Ok(v.to_string());
        }
        Err(format!("no boundary in Content-Type {content_type:?}"))
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum State {
        Start,
        Data,
        Done,
    }

    pub(super) struct Multipart<R> {
        r: R,
        /// `--` and the boundary.
        delim: Vec<u8>,
        state: State,
        /// Data bytes of the current part not read yet.
        left: u64,
    }

    impl<R: BufRead> Multipart<R> {
        pub fn new(r: R, boundary: &str) -> Self {
            Multipart {
                r,
                delim: [b"--", boundary.as_bytes()].concat(),
                state: State::Start,
                left: 0,
            }
        }

        /// The next part's range, its data then readable with [`Multipart::read`]; `None`
        /// after the closing delimiter and a clean end of the body.
        pub fn next_part(&mut self) -> Result<Option<Part>, MpError> {
            let line = match self.state {
                State::Done => return Ok(None),
                State::Start => {
                    let mut blanks = 0;
                    loop {
                        let l = self.line(true)?;
                        if !l.is_empty() {
                            break l;
                        }
                        blanks += 1;
                        if blanks > MAX_LEADING_BLANKS {
                            return Err(malformed("blank lines instead of the first boundary"));
                        }
                    }
                }
                State::Data => {
                    if self.left > 0 {
                        return Err(malformed("next part asked before this one was read"));
                    }
                    // The CRLF after a part's data belongs to the next delimiter.
                    if !self.line(false)?.is_empty() {
                        return Err(malformed(
                            "a part is longer than its Content-Range (no boundary after its bytes)",
                        ));
                    }
                    self.line(true)?
                }
            };
            let rest = line
                .strip_prefix(self.delim.as_slice())
                .ok_or_else(|| malformed(&format!("expected the boundary, got {}", show(&line))))?;
            if let Some(after) = rest.strip_prefix(b"--") {
                if !after.iter().all(|b| *b == b' ' || *b == b'\t') {
                    return Err(malformed("text after the closing boundary"));
                }
                self.state = State::Done;
                self.epilogue()?;
                return Ok(None);
            }
            if !rest.iter().all(|b| *b == b' ' || *b == b'\t') {
                return Err(malformed(&format!(
                    "expected the boundary, got {}",
                    show(&line)
                )));
            }
            let mut range = None;
            let mut fields = 0;
            loop {
                let l = self.line(false)?;
                if l.is_empty() {
                    break;
                }
                fields += 1;
                if fields > MAX_FIELDS {
                    return Err(malformed("too many header fields in a part"));
                }
                if l[0] == b' ' || l[0] == b'\t' {
                    return Err(malformed("folded header field in a part"));
                }
                let text = std::str::from_utf8(&l)
                    .map_err(|_| malformed("header field of a part is not text"))?;
                let (name, value) = text
                    .split_once(':')
                    .ok_or_else(|| malformed(&format!("not a header field: {text:?}")))?;
                if name.eq_ignore_ascii_case("content-range") {
                    if range.is_some() {
                        return Err(malformed("two Content-Range fields in a part"));
                    }
                    range = match parse_content_range(value) {
                        Some(ContentRange::Bytes { start, end, total }) => {
                            Some(Part { start, end, total })
                        }
                        _ => {
                            return Err(malformed(&format!(
                                "unreadable Content-Range {:?}",
                                value.trim()
                            )))
                        }
                    };
                }
            }
            let part = range.ok_or_else(|| malformed("a part without Content-Range"))?;
            self.left = part.end - part.start;
            self.state = State::Data;
            Ok(Some(part))
        }

        /// Data of the current part; `Ok(0)` at its end.
        pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, MpError> {
            if self.state != State::Data || self.left == 0 || buf.is_empty() {
                return Ok(0);
            }
            let want = (buf.len() as u64).min(self.left) as usize;
            let n = self.r.read(&mut buf[..want]).map_err(MpError::Io)?;
            if n == 0 {
                return Err(MpError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "body ended inside a part",
                )));
            }
            self.left -= n as u64;
            Ok(n)
        }

        /// One line without its CRLF. `eof_ok`: the body may end instead of the CRLF (after
        /// the closing delimiter).
        fn line(&mut self, eof_ok: bool) -> Result<Vec<u8>, MpError> {
            let mut line = Vec::new();
            loop {
                let buf = self.r.fill_buf().map_err(MpError::Io)?;
                if buf.is_empty() {
                    if eof_ok && !line.is_empty() {
                        return Ok(line);
                    }
                    return Err(MpError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "body ended inside the multipart framing",
                    )));
                }
                let (chunk, found) = match buf.iter().position(|b| *b == b'\n') {
                    Some(i) => (&buf[..=i], true),
                    None => (buf, false),
                };
                if line.len() + chunk.len() > MAX_LINE + 2 {
                    return Err(malformed("line too long in the multipart framing"));
                }
                line.extend_from_slice(chunk);
                let n = chunk.len();
                self.r.consume(n);
                if found {
                    line.pop();
                    if line.pop() != Some(b'\r') {
                        return Err(malformed("bare LF in the multipart framing"));
                    }
                    return Ok(line);
                }
            }
        }

        /// After the closing delimiter only a little white space may follow: bytes there
        /// would be bytes not asked for.
        fn epilogue(&mut self) -> Result<(), MpError> {
            let mut seen = 0usize;
            loop {
                let buf = self.r.fill_buf().map_err(MpError::Io)?;
                if buf.is_empty() {
                    return Ok(());
                }
                seen += buf.len();
                let blank = buf.iter().all(|b| b" \t\r\n".contains(b));
                let n = buf.len();
                self.r.consume(n);
                if !blank || seen > MAX_EPILOGUE {
                    return Err(malformed(
                        "data after the closing boundary (more bytes than asked)",
                    ));
                }
            }
        }
    }

    fn malformed(what: &str) -> MpError {
        MpError::Malformed(what.to_string())
    }

    fn show(line: &[u8]) -> String {
        let s = String::from_utf8_lossy(&line[..line.len().min(80)]);
        format!("{s:?}")
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Captured from nginx 1.22.1 (Debian 12): `Range: bytes=0-9,20-29,390-399` on a
        /// 400-byte text file.
        const NGINX: &[u8] = b"\r\n--00000000000000000001\r\nContent-Type: text/plain\r\nContent-Range: bytes 0-9/400\r\n\r\n0PocP8wkZu\r\n--00000000000000000001\r\nContent-Type: text/plain\r\nContent-Range: bytes 20-29/400\r\n\r\nMgSXwKaJ/3\r\n--00000000000000000001\r\nContent-Type: text/plain\r\nContent-Range: bytes 390-399/400\r\n\r\niVGlUj4fMP\r\n--00000000000000000001--\r\n";

        /// The example of RFC 9110 §14.6 (Apache's layout: no leading CRLF).
        const RFC9110: &[u8] = b"--THIS_STRING_SEPARATES\r\nContent-Type: application/pdf\r\nContent-Range: bytes 500-999/8000\r\n\r\n...the first range...\r\n--THIS_STRING_SEPARATES\r\nContent-Type: application/pdf\r\nContent-Range: bytes 7000-7999/8000\r\n\r\n...the second range\r\n--THIS_STRING_SEPARATES--\r\n";

        fn parse_all(body: &[u8], boundary: &str) -> Result<Vec<(Part, Vec<u8>)>, MpError> {
            // A tiny buffer: lines and data straddle reads, as on a slow link.
            let r = io::BufReader::with_capacity(3, body);
            let mut m = Multipart::new(r, boundary);
            let mut out = Vec::new();
            while let Some(p) = m.next_part()? {
                let mut data = Vec::new();
                let mut buf = [0u8; 7];
                loop {
                    let n = m.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    data.extend_from_slice(&buf[..n]);
                }
                out.push((p, data));
            }
            Ok(out)
        }

        fn malformed_msg(r: Result<Vec<(Part, Vec<u8>)>, MpError>) -> String {
            match r {
                Err(MpError::Malformed(m)) => m,
                other => panic!("expected Malformed, got {other:?}"),
            }
        }

        #[test]
        fn nginx_capture() {
            let b = boundary("multipart/byteranges; boundary=00000000000000000001").unwrap();
            let parts = parse_all(NGINX, &b).unwrap();
            let got: Vec<_> = parts
                .iter()
                .map(|(p, d)| {
                    (
                        p.start,
                        p.end,
                        p.total,
                        String::from_utf8_lossy(d).to_string(),
                    )
                })
                .collect();
            assert_eq!(
                got,
                [
                    (0, 10, Some(400), "0PocP8wkZu".to_string()),
                    (20, 30, Some(400), "MgSXwKaJ/3".to_string()),
                    (390, 400, Some(400), "iVGlUj4fMP".to_string()),
                ]
            );
        }

        #[test]
        fn rfc9110_example() {
            let b = boundary("Multipart/ByteRanges; boundary=\"THIS_STRING_SEPARATES\"").unwrap();
            // The example's data is shorter than its ranges: give each part its exact length.
            let body = String::from_utf8_lossy(RFC9110)
                .replace("bytes 500-999/8000", "bytes 500-520/8000")
                .replace("bytes 7000-7999/8000", "bytes 7000-7018/8000");
            let parts = parse_all(body.as_bytes(), &b).unwrap();
            assert_eq!(parts.len(), 2);
            assert_eq!(parts[0].1, b"...the first range...");
            assert_eq!(parts[1].0.start, 7000);
            assert_eq!(parts[1].1, b"...the second range");
        }

        #[test]
        fn closing_delimiter_without_crlf_and_lowercase_fields() {
            let body = b"--b\r\ncontent-range: bytes 0-2/3\r\n\r\nabc\r\n--b--";
            let parts = parse_all(body, "b").unwrap();
            assert_eq!(parts[0].1, b"abc");
        }

        #[test]
        fn refuses_what_is_not_in_the_grammar() {
            let b = "b";
            // Part longer than its Content-Range.
            let m = malformed_msg(parse_all(
                b"--b\r\nContent-Range: bytes 0-2/9\r\n\r\nabcd\r\n--b--\r\n",
                b,
            ));
            assert!(m.contains("longer than its Content-Range"), "{m}");
            // Garbage after the closing boundary.
            let m = malformed_msg(parse_all(
                b"--b\r\nContent-Range: bytes 0-2/9\r\n\r\nabc\r\n--b--\r\nGARBAGE",
                b,
            ));
            assert!(m.contains("after the closing boundary"), "{m}");
            // No Content-Range.
            let m = malformed_msg(parse_all(
                b"--b\r\nContent-Type: x\r\n\r\nabc\r\n--b--\r\n",
                b,
            ));
            assert!(m.contains("without Content-Range"), "{m}");
            // Folded field.
            let m = malformed_msg(parse_all(
                b"--b\r\nContent-Range: bytes 0-2/9\r\n x\r\n\r\nabc\r\n--b--\r\n",
                b,
            ));
            assert!(m.contains("folded"), "{m}");
            // Another boundary.
            let m = malformed_msg(parse_all(
                b"--c\r\nContent-Range: bytes 0-2/9\r\n\r\nabc\r\n--c--\r\n",
                b,
            ));
            assert!(m.contains("expected the boundary"), "{m}");
            // A boundary that only starts like ours.
            let m = malformed_msg(parse_all(
                b"--bb\r\nContent-Range: bytes 0-2/9\r\n\r\nabc\r\n--b--\r\n",
                b,
            ));
            assert!(m.contains("expected the boundary"), "{m}");
            // Unsatisfied range inside a part.
            let m = malformed_msg(parse_all(
                b"--b\r\nContent-Range: bytes */9\r\n\r\n--b--\r\n",
                b,
            ));
            assert!(m.contains("Content-Range"), "{m}");
            // Bare LF.
            let m = malformed_msg(parse_all(
                b"--b\nContent-Range: bytes 0-2/9\r\n\r\nabc\r\n--b--\r\n",
                b,
            ));
            assert!(m.contains("bare LF"), "{m}");
            // Two Content-Range fields.
            let m = malformed_msg(parse_all(b"--b\r\nContent-Range: bytes 0-2/9\r\nContent-Range: bytes 0-2/9\r\n\r\nabc\r\n--b--\r\n", b));
            assert!(m.contains("two Content-Range"), "{m}");
        }

        #[test]
        fn early_end_is_io_not_malformed() {
            for body in [
                &b"--b\r\nContent-Range: bytes 0-2/9\r\n\r\nab"[..],
                &b"--b\r\nContent-Range: bytes 0-2/9\r\n"[..],
                &b"--b\r\nContent-Range: bytes 0-2/9\r\n\r\nabc\r\n"[..],
                &b""[..],
            ] {
                match parse_all(body, "b") {
                    Err(MpError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
                    other => panic!("{:?}: expected Io, got {other:?}", show(body)),
                }
            }
        }

        #[test]
        fn boundary_parameter() {
            assert_eq!(
                boundary("multipart/byteranges;boundary=abc; charset=x").unwrap(),
                "abc"
            );
            assert!(boundary("multipart/form-data; boundary=abc").is_err());
            assert!(boundary("multipart/byteranges").is_err());
            assert!(boundary("multipart/byteranges; boundary=\"abc").is_err());
            assert!(boundary("multipart/byteranges; boundary=a\u{1}b").is_err());
            assert!(boundary(&format!(
                "multipart/byteranges; boundary={}",
                "x".repeat(71)
            ))
            .is_err());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_forms() {
        assert_eq!(
            parse_content_range("bytes 0-9/400"),
            Some(ContentRange::Bytes {
                start: 0,
                end: 10,
                total: Some(400)
            })
        );
        assert_eq!(
            parse_content_range("bytes 5-5/*"),
            Some(ContentRange::Bytes {
                start: 5,
                end: 6,
                total: None
            })
        );
        assert_eq!(
            parse_content_range("bytes */400"),
            Some(ContentRange::Unsatisfied { total: 400 })
        );
        for bad in [
            "bytes 9-0/400",
            "bytes 0-400/400",
            "bytes -1-9/400",
            "bytes 0-9",
            "items 0-9/400",
            "bytes +0-9/400",
            "bytes */*",
            "bytes 0-18446744073709551615/*",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn plan_coalesces_and_bounds_spans() {
        let todo: VecDeque<Range<u64>> = [0..10, 10..20, 25..30, 100..110, 1000..1010]
            .into_iter()
            .collect();
        assert_eq!(
            plan(&todo, 0, 10),
            vec![0..20, 25..30, 100..110, 1000..1010]
        );
        assert_eq!(plan(&todo, 6, 10), vec![0..30, 100..110, 1000..1010]);
        assert_eq!(plan(&todo, 100, 10), vec![0..110, 1000..1010]);
        assert_eq!(plan(&todo, 100, 1), vec![0..110]);
        assert_eq!(range_header(&plan(&todo, 6, 2)), "bytes=0-29,100-109");
    }

    #[test]
    fn spans_matched_exactly_or_coalesced_from_the_first() {
        let spans = [0..10, 20..30, 40..50];
        assert_eq!(match_spans(&spans, 0, 10), Some(1));
        assert_eq!(match_spans(&spans, 0, 50), Some(3));
        assert_eq!(match_spans(&spans, 0, 11), None);
        assert_eq!(match_spans(&spans, 20, 30), None);
        assert_eq!(match_spans(&spans[1..], 20, 30), Some(1));
        assert_eq!(match_spans(&[], 0, 10), None);
    }

    #[test]
    fn deliver_drops_gaps_and_keeps_order() {
        let mut todo: VecDeque<Range<u64>> = [2..4, 6..9].into_iter().collect();
        let counters = HttpCounters::default();
        let mut got = Vec::new();
        let mut sink = |at: u64, b: &[u8]| {
            got.push((at, b.to_vec()));
            Ok(())
        };
        {
            let mut d = Deliver::new(&mut todo, &mut sink, &counters);
            d.feed(0, b"abcde").ok().unwrap();
            d.feed(5, b"fghijk").ok().unwrap();
            assert!(d.done());
        }
        assert_eq!(got, [(2, b"cd".to_vec()), (6, b"ghi".to_vec())]);
        assert_eq!(counters.delivered_bytes(), 5);
        assert_eq!(counters.discarded_bytes(), 6);
    }

    #[test]
    fn validators() {
        let strong = Validator {
            etag: Some("\"a-1\"".into()),
            last_modified: Some("Sat, 21 Nov 2026 13:50:10 GMT".into()),
        };
        assert_eq!(strong.if_range(), Some("\"a-1\""));
        let other = Validator {
            etag: Some("\"a-2\"".into()),
            last_modified: None,
        };
        assert!(strong.differs(&other).unwrap().contains("ETag"));
        assert!(strong.differs(&strong).is_none());
        assert!(strong.confirmed_by(&strong));
        assert!(!strong.confirmed_by(&Validator::default()));
        let weak = Validator {
            etag: Some("W/\"a\"".into()),
            last_modified: Some("Sat, 21 Nov 2026 13:50:10 GMT".into()),
        };
        assert_eq!(weak.if_range(), Some("Sat, 21 Nov 2026 13:50:10 GMT"));
    }

    #[test]
    fn http_dates_and_retry_after() {
        let t = parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(t.duration_since(UNIX_EPOCH).unwrap().as_secs(), 784_111_777);
        let t = parse_http_date("Sat, 29 Feb 2020 00:00:00 GMT").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1_582_934_400
        );
        assert!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT").is_none());
        assert!(parse_http_date("Sun, 06 Nov 1994 25:49:37 GMT").is_none());
        let mut h = HeaderMap::new();
        h.insert(header::RETRY_AFTER, "120".parse().unwrap());
        assert_eq!(retry_after(&h, UNIX_EPOCH), Some(Duration::from_secs(120)));
        h.insert(
            header::RETRY_AFTER,
            "Sun, 06 Nov 1994 08:49:37 GMT".parse().unwrap(),
        );
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777 - 30);
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(30)));
        h.insert(header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h, now), None);
    }

    #[test]
    fn backoff_is_full_jitter_under_the_cap() {
        let mut j = Jitter::new();
        let base = Duration::from_secs(1);
        let cap = Duration::from_secs(60);
        for failures in 1..40 {
            let bound = base.saturating_mul(1 << (failures - 1).min(20)).min(cap);
            for _ in 0..50 {
                assert!(backoff(&mut j, base, cap, failures) <= bound);
            }
        }
        // Spread out, not constant.
        let v: Vec<_> = (0..20).map(|_| backoff(&mut j, base, cap, 10)).collect();
        assert!(v.iter().any(|d| *d != v[0]));
    }

    #[test]
    fn token_bucket_holds_the_rate() {
        let mut b = TokenBucket::new(200_000);
        let t0 = Instant::now();
        let mut n = 0;
        while n < 100_000 {
            let k = b.grant(64 * 1024);
            b.take(k);
            n += k;
        }
        // 100 kB at 200 kB/s, less the initial burst of 50 kB: at least ~0.25 s.
        assert!(
            t0.elapsed() >= Duration::from_millis(200),
            "{:?}",
            t0.elapsed()
        );
    }

    #[test]
    fn options_from_toml() {
        let o: HttpOptions = toml::from_str(
            "connect_timeout_secs = 5\nidle_timeout_secs = 1.5\nlow_speed = { bytes_per_sec = 100, secs = 60 }\nmax_rate = 2048\nca_file = \"/etc/edge-ota/ca.pem\"\n",
        )
        .unwrap();
        assert_eq!(o.connect_timeout, Duration::from_secs(5));
        assert_eq!(o.idle_timeout, Duration::from_millis(1500));
        assert_eq!(o.low_speed, Some((100, Duration::from_secs(60))));
        assert_eq!(o.max_rate, Some(2048));
        assert_eq!(o.max_attempts, HttpOptions::default().max_attempts);
        assert!(toml::from_str::<HttpOptions>("timeout_secs = 5").is_err());
        assert!(toml::from_str::<HttpOptions>("idle_timeout_secs = -1").is_err());
        HttpOptions::default().validate().unwrap();
        let bad = HttpOptions {
            client_cert: Some("/c.pem".into()),
            ..HttpOptions::default()
        };
        assert!(matches!(bad.validate(), Err(Error::Usage(_))));
    }

    #[test]
    fn open_refuses_other_schemes() {
        for url in ["ftp://example.com/b", "file:///tmp/b", "not a url"] {
            let e = HttpSource::open(url, &HttpOptions::default()).unwrap_err();
            assert!(matches!(e, Error::Usage(_)), "{url}: {e}");
        }
    }
}
