//! `HttpSource` against a real server (Debian's nginx) and, where a fault is needed, the
//! fault-injecting proxy of `edge-ota-testkit`: one test per way a field link or server
//! misbehaves. Each fetches ranges of a ~5 MiB random file and compares every delivered byte
//! with the file; where the fault allows it, the bytes that crossed the proxy (heads
//! included) stay within 5 % of the bytes needed.

// `[a..b]` here is a list of one byte range, which is what `fetch` takes.
#![allow(clippy::single_range_in_vec_init)]

use std::ops::Range;
use std::time::{Duration, Instant};

use edge_ota::source::http::{HttpOptions, HttpSource, RangeSupport};
use edge_ota::source::RangeSource;
use edge_ota::Error;
use edge_ota_testkit::{Faults, Nginx, NginxTls, Proxy};

const FILE_LEN: usize = 5 * 1024 * 1024 + 12_345;
const PATH: &str = "/bundle.bin";
const NEW_PATH: &str = "/bundle-new.bin";

/// nginx serving `bundle.bin` (random) and `bundle-new.bin` (another random file, another
/// length: what a replaced bundle looks like).
struct Site {
    _dir: tempfile::TempDir,
    data: Vec<u8>,
    nginx: Nginx,
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The site, or `None` after [`edge_ota::testing::skip`] when nginx is missing.
fn site(test: &str) -> Option<Site> {
    if Nginx::find().is_none() {
        edge_ota::testing::skip(test, "nginx not installed");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(FILE_LEN, 1);
    std::fs::write(dir.path().join("bundle.bin"), &data).unwrap();
    std::fs::write(
        dir.path().join("bundle-new.bin"),
        random_bytes(FILE_LEN + 1, 2),
    )
    .unwrap();
    let nginx = Nginx::start(dir.path()).unwrap();
    Some(Site {
        _dir: dir,
        data,
        nginx,
    })
}

/// Small timeouts and short backoffs, so each fault costs a second, not a minute.
fn quick() -> HttpOptions {
    HttpOptions {
        connect_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(1),
        backoff_base: Duration::from_millis(50),
        backoff_cap: Duration::from_millis(300),
        max_attempts: 8,
        ..HttpOptions::default()
    }
}

/// What an apply asks for: the header, chunks megabytes long, two ranges close enough to be
/// merged (5 KB apart), a tiny one and the file's end.
fn chunk_ranges() -> Vec<Range<u64>> {
    let n = FILE_LEN as u64;
    vec![
        0..4096,
        70_000..600_000,
        605_000..1_400_000,
        2_000_000..2_000_100,
        2_100_000..3_300_000,
        4_000_000..4_900_000,
        n - 1000..n,
    ]
}

fn needed(ranges: &[Range<u64>]) -> u64 {
    ranges.iter().map(|r| r.end - r.start).sum()
}

/// Fetch `ranges` and check that every byte arrives exactly once, in order, equal to the
/// file's.
fn fetch_exact(src: &mut HttpSource, ranges: &[Range<u64>], data: &[u8]) -> edge_ota::Result<()> {
    let mut idx = 0;
    let mut pos = ranges.first().map_or(0, |r| r.start);
    src.fetch(ranges, &mut |at, bytes| {
        assert!(idx < ranges.len(), "bytes at {at} after the last range");
        assert_eq!(at, pos, "delivery out of order");
        let end = at + bytes.len() as u64;
        assert!(end <= ranges[idx].end, "delivery past the end of its range");
        assert!(
            bytes == &data[at as usize..end as usize],
            "wrong bytes at {at}"
        );
        pos = end;
        if pos == ranges[idx].end {
            idx += 1;
            if let Some(r) = ranges.get(idx) {
                pos = r.start;
            }
        }
        Ok(())
    })?;
    assert_eq!(idx, ranges.len(), "not every range was delivered");
    Ok(())
}

/// Bytes that crossed the proxy, heads included, within 5 % of the bytes needed.
fn assert_wire_within_5_percent(test: &str, proxy: &Proxy, src: &HttpSource, need: u64) {
    let s = proxy.stats();
    let c = src.counters().snapshot();
    eprintln!(
        "{test}: needed {need}, proxy sent {} ({:.3}x) in {} requests over {} connections; client: {c:?}",
        s.bytes_sent,
        s.bytes_sent as f64 / need as f64,
        s.requests,
        s.connections
    );
    assert!(
        s.bytes_sent as f64 <= need as f64 * 1.05,
        "{test}: {} bytes on the wire for {need} needed",
        s.bytes_sent
    );
}

fn proxy(site: &Site, faults: Faults) -> Proxy {
    Proxy::start("127.0.0.1:0", &site.nginx.origin(), faults).unwrap()
}

#[test]
fn clean_link_uses_one_multirange_request() {
    let Some(site) = site("clean_link_uses_one_multirange_request") else {
        return;
    };
    let p = proxy(&site, Faults::default());
    let mut src = HttpSource::open(&p.url(PATH), &quick()).unwrap();
    assert_eq!(src.len(), FILE_LEN as u64);
    assert!(src.validator().is_some_and(|v| v.starts_with('"')));
    let ranges = chunk_ranges();
    fetch_exact(&mut src, &ranges, &site.data).unwrap();
    assert_wire_within_5_percent("clean link", &p, &src, needed(&ranges));
    assert_eq!(src.range_support(), RangeSupport::Multiple);
    // The open, then one request for all the ranges.
    assert_eq!(p.stats().requests, 2);
    assert_eq!(src.counters().retries(), 0);
}

#[test]
fn throttled_link() {
    let Some(site) = site("throttled_link") else {
        return;
    };
    let p = proxy(
        &site,
        Faults {
            throttle: Some(2 * 1024 * 1024),
            ..Faults::default()
        },
    );
    let t0 = Instant::now();
    let mut src = HttpSource::open(&p.url(PATH), &quick()).unwrap();
    let ranges = chunk_ranges();
    fetch_exact(&mut src, &ranges, &site.data).unwrap();
    let took = t0.elapsed();
    assert_wire_within_5_percent("throttled", &p, &src, needed(&ranges));
    // Longer than the idle timeout (1 s) with no retry: no total-request timeout.
    assert!(took > Duration::from_millis(1400), "{took:?}");
    assert_eq!(src.counters().retries(), 0);
}

#[test]
fn drop_every_256k() {
    let Some(site) = site("drop_every_256k") else {
        return;
    };
    let p = proxy(
        &site,
        Faults {
            drop_every: Some(256 * 1024),
            ..Faults::default()
        },
    );
    let mut src = HttpSource::open(&p.url(PATH), &quick()).unwrap();
    let ranges = chunk_ranges();
    fetch_exact(&mut src, &ranges, &site.data).unwrap();
    assert_wire_within_5_percent("drop every 256 KiB", &p, &src, needed(&ranges));
    // 3.4 MB in 256 KiB pieces: each drop resumed at the next byte.
    assert!(src.counters().retries() >= 10, "{:?}", src.counters());
}

#[test]
fn stall_longer_than_idle_timeout() {
    let Some(site) = site("stall_longer_than_idle_timeout") else {
        return;
    };
    // Long, so that finishing before it ends proves the resume; nothing waits for it.
    let stall = Duration::from_secs(6);
    let p = proxy(
        &site,
        Faults {
            stall_once: Some((1024 * 1024, stall)),
            ..Faults::default()
        },
    );
    let t0 = Instant::now();
    let mut src = HttpSource::open(&p.url(PATH), &quick()).unwrap();
    let ranges = chunk_ranges();
    fetch_exact(&mut src, &ranges, &site.data).unwrap();
    let took = t0.elapsed();
    assert_wire_within_5_percent("stall", &p, &src, needed(&ranges));
    let c = src.counters().snapshot();
    assert_eq!(c.retries, 1, "{c:?}");
    assert!(
        c.last_error
            .as_deref()
            .unwrap_or_default()
            .contains("stalled"),
        "{c:?}"
    );
    // Resumed on a new connection after the idle timeout, not after the stall.
    assert!(took < stall, "{took:?}");
}

#[test]
fn range_request_answered_200() {
    let Some(site) = site("range_request_answered_200") else {
        return;
    };
    let ranges = chunk_ranges();
    // From the first request: the open learns that ranges do not work.
    let p = proxy(
        &site,
        Faults {
            full_200: true,
            ..Faults::default()
        },
    );
    let mut src = HttpSource::open(&p.url(PATH), &quick()).unwrap();
    assert_eq!(src.range_support(), RangeSupport::None);
    fetch_exact(&mut src, &ranges, &site.data).unwrap();
    let c = src.counters().snapshot();
    eprintln!("200 from the open: {c:?}, proxy {:?}", p.stats());
    assert!(
        c.discarded_bytes > 0 && c.wire_bytes > needed(&ranges),
        "{c:?}"
    );
    assert_eq!(p.stats().requests, 2);

    // From the second request: the open sees 206, the fetch (with If-Range) gets the whole
    // file with the same ETag, uses it and remembers.
    let p = proxy(
        &site,
        Faults {
            full_200: true,
            faults_from_request: 2,
            ..Faults::default()
        },
    );
    let mut src = HttpSource::open(&p.url(PATH), &quick()).unwrap();
    assert_eq!(src.range_support(), RangeSupport::Multiple);
    fetch_exact(&mut src, &ranges, &site.data).unwrap();
    assert_eq!(src.range_support(), RangeSupport::None);
    let c = src.counters().snapshot();
    eprintln!("200 to a fetch: {c:?}, proxy {:?}", p.stats());
    // Everything up to the last wanted byte crossed the link, and is counted as overhead.
    let last = ranges.last().unwrap().end;
    assert!(c.wire_bytes >= last - 64 * 1024, "{c:?}");
    assert_eq!(
        c.discarded_bytes + c.delivered_bytes + 64 * 1024 - 4096,
        c.wire_bytes,
        "{c:?}"
    );
    assert_eq!(c.retries, 0);
    // A later fetch does not ask for ranges again: one request, no failure. (Bytes within
    // the 64 KiB read at open are served from memory, so ask beyond them.)
    let before = p.stats().requests;
    fetch_exact(&mut src, &[100_000..100_100], &site.data).unwrap();
    assert_eq!(p.stats().requests, before + 1);
    // And what the open read is kept for every fetch: no request at all.
    fetch_exact(&mut src, &[100..200], &site.data).unwrap();
    assert_eq!(p.stats().requests, before + 1);
}

#[test]
fn multirange_ignored() {
    let Some(site) = site("multirange_ignored") else {
        return;
    };
    let p = proxy(
        &site,
        Faults {
            ignore_multirange: true,
            ..Faults::default()
        },
    );
    let mut src = HttpSource::open(&p.url(PATH), &quick()).unwrap();
    let ranges = chunk_ranges();
    fetch_exact(&mut src, &ranges, &site.data).unwrap();
    assert_wire_within_5_percent("multi-range ignored", &p, &src, needed(&ranges));
    assert_eq!(src.range_support(), RangeSupport::Single);
    // The first answer was used; then one request per (merged) range.
    assert_eq!(p.stats().requests, 1 + 5);
    assert_eq!(src.counters().retries(), 0);
}

#[test]
fn multirange_416() {
    let Some(site) = site("multirange_416") else {
        return;
    };
    let p = proxy(
        &site,
        Faults {
            refuse_multirange: true,
            ..Faults::default()
        },
    );
    let mut src = HttpSource::open(&p.url(PATH), &quick()).unwrap();
    let ranges = chunk_ranges();
    fetch_exact(&mut src, &ranges, &site.data).unwrap();
    assert_wire_within_5_percent("416 to multi-range", &p, &src, needed(&ranges));
    assert_eq!(src.range_support(), RangeSupport::Single);
    // The refused one, then one per (merged) range.
    assert_eq!(p.stats().requests, 1 + 1 + 5);
    assert_eq!(src.counters().retries(), 0);
}

#[test]
fn more_bytes_than_asked() {
    let Some(site) = site("more_bytes_than_asked") else {
        return;
    };
    // A multipart answer (garbage after the closing boundary), then a single-range answer
    // (Content-Length above the Content-Range).
    for max_ranges in [64, 1] {
        let p = proxy(
            &site,
            Faults {
                extra_bytes: 100,
                faults_from_request: 2,
                ..Faults::default()
            },
        );
        let opts = HttpOptions {
            max_ranges_per_request: max_ranges,
            ..quick()
        };
        let mut src = HttpSource::open(&p.url(PATH), &opts).unwrap();
        let e = fetch_exact(&mut src, &chunk_ranges(), &site.data).unwrap_err();
        eprintln!("more bytes than asked ({max_ranges} ranges per request): {e}");
        assert!(matches!(e, Error::Format(_)), "{e:?}");
        assert_eq!(e.exit_code(), 10);
        let msg = e.to_string();
        assert!(msg.contains(&p.url(PATH)), "{msg}");
        assert!(msg.contains("more"), "{msg}");
        assert_eq!(src.counters().retries(), 0);
    }
    // The open itself, through a proxy that pads every 206.
    let p = proxy(
        &site,
        Faults {
            extra_bytes: 1,
            ..Faults::default()
        },
    );
    let e = HttpSource::open(&p.url(PATH), &quick()).unwrap_err();
    assert_eq!(e.exit_code(), 10, "{e}");
}

#[test]
fn file_swapped_mid_download() {
    let Some(site) = site("file_swapped_mid_download") else {
        return;
    };
    let p = proxy(
        &site,
        Faults {
            swap: Some((512 * 1024, NEW_PATH.into())),
            ..Faults::default()
        },
    );
    // Two ranges per request, so the swap falls between requests.
    let opts = HttpOptions {
        max_ranges_per_request: 2,
        ..quick()
    };
    let mut src = HttpSource::open(&p.url(PATH), &opts).unwrap();
    let mut delivered = 0u64;
    let e = src
        .fetch(&chunk_ranges(), &mut |at, b| {
            assert!(
                b == &site.data[at as usize..at as usize + b.len()],
                "bytes of the new file delivered at {at}"
            );
            delivered += b.len() as u64;
            Ok(())
        })
        .unwrap_err();
    eprintln!("file swapped after {delivered} bytes: {e}");
    assert!(matches!(e, Error::SourceChanged { .. }), "{e:?}");
    assert_eq!(e.exit_code(), 26);
    assert!(delivered > 0 && delivered < needed(&chunk_ranges()));
}

#[test]
fn server_busy_503_with_retry_after() {
    let Some(site) = site("server_busy_503_with_retry_after") else {
        return;
    };
    let p = proxy(
        &site,
        Faults {
            busy: Some((2, 1)),
            faults_from_request: 2,
            ..Faults::default()
        },
    );
    let mut src = HttpSource::open(&p.url(PATH), &quick()).unwrap();
    let t0 = Instant::now();
    let ranges = chunk_ranges();
    fetch_exact(&mut src, &ranges, &site.data).unwrap();
    let took = t0.elapsed();
    let c = src.counters().snapshot();
    eprintln!("busy twice, Retry-After 1 s: {took:?}, {c:?}");
    assert_eq!(c.retries, 2, "{c:?}");
    assert!(c.last_error.unwrap_or_default().contains("503"));
    // Retry-After (1 s, twice) honoured over the 50-100 ms backoff.
    assert!(took >= Duration::from_secs(2), "{took:?}");
}

#[test]
fn server_down_for_a_while_then_back() {
    let Some(mut site) = site("server_down_for_a_while_then_back") else {
        return;
    };
    let url = site.nginx.url(PATH);
    let opts = HttpOptions {
        max_attempts: 40,
        ..quick()
    };
    let mut src = HttpSource::open(&url, &opts).unwrap();
    site.nginx.stop();
    let ranges = chunk_ranges();
    let data = site.data.clone();
    let fetcher = std::thread::spawn(move || {
        let r = fetch_exact(&mut src, &ranges, &data);
        (r, src.counters().snapshot())
    });
    std::thread::sleep(Duration::from_millis(1500));
    site.nginx.restart().unwrap();
    let (r, c) = fetcher.join().unwrap();
    r.unwrap();
    eprintln!("down then back: {c:?}");
    assert!(c.retries >= 2, "{c:?}");
    assert!(c.last_error.unwrap_or_default().contains("connect"));
}

#[test]
fn server_down_for_good() {
    let Some(mut site) = site("server_down_for_good") else {
        return;
    };
    let opts = HttpOptions {
        max_attempts: 5,
        ..quick()
    };
    let mut src = HttpSource::open(&site.nginx.url(PATH), &opts).unwrap();
    site.nginx.stop();
    let t0 = Instant::now();
    let e = fetch_exact(&mut src, &chunk_ranges(), &site.data).unwrap_err();
    let took = t0.elapsed();
    eprintln!("down for good, after {took:?}: {e}");
    let Error::Network { reason, .. } = &e else {
        panic!("{e:?}")
    };
    assert!(reason.contains("cannot connect"), "{reason}");
    assert!(reason.contains("gave up after 5 attempts"), "{reason}");
    assert_eq!(e.exit_code(), 25);
    // 4 backoffs of at most 50, 100, 200, 300 ms.
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(src.counters().retries(), 4);

    // The same at open.
    let e = HttpSource::open(&site.nginx.url(PATH), &opts).unwrap_err();
    assert!(matches!(e, Error::Network { .. }), "{e:?}");
}

#[test]
fn many_small_ranges_coalesced() {
    let Some(site) = site("many_small_ranges_coalesced") else {
        return;
    };
    let p = proxy(&site, Faults::default());
    // 50 clusters 100 KB apart, each 8 ranges of 4000 bytes with 20-byte gaps: 400 ranges.
    let mut ranges = Vec::new();
    for c in 0..50u64 {
        for i in 0..8u64 {
            let start = c * 100_000 + i * 4020;
            ranges.push(start..start + 4000);
        }
    }
    let mut src = HttpSource::open(&p.url(PATH), &quick()).unwrap();
    fetch_exact(&mut src, &ranges, &site.data).unwrap();
    assert_wire_within_5_percent("400 small ranges", &p, &src, needed(&ranges));
    // The open, then the 50 merged spans in one multi-range request.
    assert!(p.stats().requests <= 3, "{:?}", p.stats());
}

#[test]
fn max_rate_limits_the_client() {
    let Some(site) = site("max_rate_limits_the_client") else {
        return;
    };
    let opts = HttpOptions {
        max_rate: Some(1024 * 1024),
        ..quick()
    };
    let t0 = Instant::now();
    let mut src = HttpSource::open(&site.nginx.url(PATH), &opts).unwrap();
    let ranges = [100_000..1_700_000u64];
    fetch_exact(&mut src, &ranges, &site.data).unwrap();
    let took = t0.elapsed();
    // 1.66 MB in all at 1 MiB/s (less a quarter-second burst).
    assert!(took > Duration::from_millis(1200), "{took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
}

#[test]
fn low_speed_link_is_reconnected() {
    let Some(site) = site("low_speed_link_is_reconnected") else {
        return;
    };
    let p = proxy(
        &site,
        Faults {
            throttle: Some(256 * 1024),
            ..Faults::default()
        },
    );
    // Below 512 KiB/s over half a second counts as too slow: the link never is fast enough,
    // yet each attempt delivers bytes, so the fetch goes on to the end.
    let opts = HttpOptions {
        low_speed: Some((512 * 1024, Duration::from_millis(500))),
        ..quick()
    };
    let mut src = HttpSource::open(&p.url(PATH), &opts).unwrap();
    let ranges = [200_000..600_000u64];
    fetch_exact(&mut src, &ranges, &site.data).unwrap();
    let c = src.counters().snapshot();
    assert!(c.retries >= 1, "{c:?}");
    assert!(c.last_error.unwrap_or_default().contains("too slow"));
}

#[test]
fn https_with_extra_ca_and_client_cert() {
    let test = "https_with_extra_ca_and_client_cert";
    if Nginx::find().is_none() {
        edge_ota::testing::skip(test, "nginx not installed");
        return;
    }
    if edge_ota::testing::find_tool("openssl").is_none() {
        edge_ota::testing::skip(test, "openssl not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = random_bytes(300_000, 3);
    std::fs::create_dir(d.join("www")).unwrap();
    std::fs::write(d.join("www/bundle.bin"), &data).unwrap();
    edge_ota_testkit::pki::make(d).unwrap();
    let nginx = Nginx::start_tls(
        &d.join("www"),
        NginxTls {
            cert: d.join("server.pem"),
            key: d.join("server.key"),
            client_ca: Some(d.join("ca.pem")),
        },
    )
    .unwrap();
    let url = nginx.url(PATH);
    let opts = HttpOptions {
        ca_file: Some(d.join("ca.pem")),
        client_cert: Some(d.join("client.pem")),
        client_key: Some(d.join("client.key")),
        ..quick()
    };
    let mut src = HttpSource::open(&url, &opts).unwrap();
    fetch_exact(&mut src, &[0..1000, 100_000..250_000], &data).unwrap();

    // Without the CA: a certificate error, final at once (no retries).
    let t0 = Instant::now();
    let e = HttpSource::open(&url, &quick()).unwrap_err();
    eprintln!("without the CA: {e}");
    let Error::Network { reason, .. } = &e else {
        panic!("{e:?}")
    };
    assert!(reason.starts_with("TLS"), "{reason}");
    assert!(!reason.contains("gave up"), "{reason}");
    assert!(t0.elapsed() < Duration::from_secs(3));

    // Without the client certificate: refused (nginx: 400), not retried.
    let opts = HttpOptions {
        ca_file: Some(d.join("ca.pem")),
        ..quick()
    };
    let e = HttpSource::open(&url, &opts).unwrap_err();
    eprintln!("without the client certificate: {e}");
    assert!(matches!(e, Error::Network { .. }), "{e:?}");
}
