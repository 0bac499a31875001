//! `edge-ota serve` as a real process on loopback, each test named after what it protects:
//! the ranges and validators a leaf's client relies on (checked with raw requests, byte by
//! byte), the pull-through cache in front of a real origin (Debian's nginx behind the
//! byte-counting test proxy), and the LAN's attacks. Leaves are the real `edge-ota` binary
//! on file-backed devices.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use edge_ota_testkit::{Faults, Nginx, Proxy};

/// A running `edge-ota serve`; stopped (SIGKILL) on drop.
struct Serve {
    child: Option<Child>,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
    _cfg: tempfile::TempDir,
}

impl Serve {
    /// `serve --dir DIR` on a free loopback port, without mDNS; `toml` is put under `[serve]`.
    fn start(dir: &Path, toml: &str, args: &[&str]) -> Serve {
        let cfg = tempfile::tempdir().unwrap();
        let path = cfg.path().join("serve.toml");
        std::fs::write(&path, format!("[serve]\n{toml}\n")).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_edge-ota"))
            .arg("--config")
            .arg(&path)
            .args(["serve", "--listen", "127.0.0.1:0", "--no-announce", "--dir"])
            .arg(dir)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let err = child.stderr.take().unwrap();
        let l = log.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(err).lines().map_while(|l| l.ok()) {
                if let Some(rest) = line.strip_prefix("edge-ota serve: listening on ") {
                    let _ = tx.send(rest.split(' ').next().unwrap().to_string());
                }
                l.lock().unwrap().push_str(&line);
                l.lock().unwrap().push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a.parse().unwrap(),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                panic!("serve did not start: {}", log.lock().unwrap());
            }
        };
        Serve {
            child: Some(child),
            addr,
            log,
            _cfg: cfg,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn get(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        request(self.addr, "GET", path, headers)
    }

    fn stats(&self) -> serde_json::Value {
        let r = self.get("/stats.json", &[]);
        assert_eq!(r.status, 200);
        serde_json::from_slice(&r.body).unwrap()
    }

    fn index(&self) -> serde_json::Value {
        let r = self.get("/index.json", &[]);
        assert_eq!(r.status, 200, "{}", self.log());
        serde_json::from_slice(&r.body).unwrap()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A response read to the end of the connection.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn content_length(&self) -> u64 {
        self.header("content-length").unwrap().parse().unwrap()
    }
}

/// Parse a response head and what follows it.
fn parse(raw: &[u8]) -> Resp {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8(raw[..end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    Resp {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    }
}

/// Send `raw` as is and read until the server closes (or 30 s pass).
fn exchange(addr: SocketAddr, raw: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(raw).unwrap();
    let mut out = Vec::new();
    // A reset after the response (the server closing with unread input) ends it too.
    let mut buf = [0u8; 64 << 10];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}

fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    parse(&exchange(addr, req.as_bytes()))
}

/// The bundle id of a file (its `ETag`, unquoted).
fn bundle_id(bundle: &Path) -> String {
    let mut f = std::fs::File::open(bundle).unwrap();
    let head = edge_ota::bundle::head::BundleHead::read(&mut f).unwrap();
    edge_ota::bundle::Manifest::id(&head.manifest_bytes).to_hex()
}

fn ok(o: &std::process::Output) {
    assert_eq!(o.status.code(), Some(0), "{}", stderr(o));
}

/// A directory holding one bundle, `b.eota`, of a 1 MiB image (many 16 KiB chunks).
fn served_dir(dev: &Device) -> (tempfile::TempDir, PathBuf) {
    let b = dev.bundle(
        "v2.eota",
        &BundleOpts {
            payloads: vec![(
                edge_ota::bundle::PayloadKind::Image,
                "rootfs",
                image_bytes(1 << 20, 3),
            )],
            ..Default::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&b, dir.path().join("b.eota")).unwrap();
    let path = dir.path().join("b.eota");
    (dir, path)
}

fn installed(dev: &Device, image: &[u8]) {
    assert_eq!(
        &std::fs::read(dev.path("slotB")).unwrap()[..image.len()],
        image,
        "slot B does not hold the image"
    );
}

// ---------------------------------------------------------------------------------------
// HTTP semantics a leaf relies on

#[test]
fn leaf_applies_through_serve_fetching_each_byte_once() {
    let dev = Device::new(2 << 20);
    let (dir, b) = served_dir(&dev);
    let serve = Serve::start(dir.path(), "", &[]);
    ok(&dev.run(&["apply", "--no-reboot", &serve.url("/b.eota")]));
    installed(&dev, &image_bytes(1 << 20, 3));
    let size = std::fs::metadata(&b).unwrap().len();
    let st = serve.stats();
    let sent = st["bytes_sent"].as_u64().unwrap();
    // Heads of responses included: each request costs a few hundred bytes.
    let requests = st["requests"].as_u64().unwrap();
    assert!(
        sent as f64 <= 1.05 * size as f64 + 400.0 * requests as f64,
        "{sent} bytes sent in {requests} requests for a {size}-byte bundle"
    );
    assert!(requests <= 20, "{requests} requests for one apply");
    // The real `fetch` stages from it too.
    let dev2 = Device::new(2 << 20);
    ok(&dev2.run(&["fetch", "--progress", "none", &serve.url("/b.eota")]));
}

#[test]
fn https_serve_is_trusted_only_through_the_configured_ca() {
    let test = "https_serve_is_trusted_only_through_the_configured_ca";
    if edge_ota::testing::find_tool("openssl").is_none() {
        edge_ota::testing::skip(test, "openssl not installed");
        return;
    }
    let dev = Device::new(2 << 20);
    let (dir, b) = served_dir(&dev);
    let pki = tempfile::tempdir().unwrap();
    edge_ota_testkit::pki::make(pki.path()).unwrap();
    let p = |f: &str| pki.path().join(f).display().to_string();
    let serve = Serve::start(
        dir.path(),
        &format!(
            "tls_cert = {:?}\ntls_key = {:?}",
            p("server.pem"),
            p("server.key")
        ),
        &[],
    );
    let url = format!("https://{}/b.eota", serve.addr);
    // A leaf that does not trust the certificate: refused at once, nothing changed.
    dev.edit_config(|c| c + "[network]\nmax_attempts = 2\nbackoff_base_secs = 0.1\n");
    let before = dev.snapshot();
    let o = dev.run(&["apply", "--no-reboot", &url]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("TLS"), "{}", stderr(&o));
    assert_eq!(
        before,
        dev.snapshot(),
        "an untrusted server changed the device"
    );
    // Trusting the CA: the update goes through, each byte once.
    let ca = p("ca.pem");
    dev.edit_config(|c| c.replace("[network]\n", &format!("[network]\nca_file = {ca:?}\n")));
    let o = dev.run(&["--json", "apply", "--no-reboot", &url]);
    ok(&o);
    installed(&dev, &image_bytes(1 << 20, 3));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let fetched = r["bytes_fetched"].as_u64().unwrap();
    let size = std::fs::metadata(&b).unwrap().len();
    assert!(
        fetched > 0 && fetched <= size,
        "{fetched} payload bytes fetched from a {size}-byte bundle"
    );
    // The port speaks only TLS: a plain request gets no HTTP answer.
    let raw = exchange(serve.addr, b"GET /b.eota HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(!raw.starts_with(b"HTTP/"), "served in clear text");
}

#[test]
fn get_and_head_carry_the_bundle_id_as_a_strong_etag() {
    let dev = Device::new(2 << 20);
    let (dir, b) = served_dir(&dev);
    let serve = Serve::start(dir.path(), "", &[]);
    let bytes = std::fs::read(&b).unwrap();
    let etag = format!("\"{}\"", bundle_id(&b));
    let r = serve.get("/b.eota", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("etag"), Some(etag.as_str()));
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    assert_eq!(r.content_length(), bytes.len() as u64);
    assert!(r.body == bytes, "the body is not the file");
    let h = request(serve.addr, "HEAD", "/b.eota", &[]);
    assert_eq!(h.status, 200);
    assert_eq!(h.header("etag"), Some(etag.as_str()));
    assert_eq!(h.content_length(), bytes.len() as u64);
    assert!(
        h.body.is_empty(),
        "HEAD carried {} body bytes",
        h.body.len()
    );
    // A conditional GET with the current validator: nothing to send.
    let nm = serve.get("/b.eota", &[("If-None-Match", &etag)]);
    assert_eq!(nm.status, 304);
    assert!(nm.body.is_empty());
    assert_eq!(request(serve.addr, "POST", "/b.eota", &[]).status, 405);
    assert_eq!(serve.get("/none.eota", &[]).status, 404);
}

#[test]
fn single_range_is_206_with_exactly_those_bytes() {
    let dev = Device::new(2 << 20);
    let (dir, b) = served_dir(&dev);
    let serve = Serve::start(dir.path(), "", &[]);
    let bytes = std::fs::read(&b).unwrap();
    let len = bytes.len();
    for (spec, a, z) in [
        ("bytes=100-199".to_string(), 100, 200),
        (format!("bytes={}-", len - 10), len - 10, len),
        ("bytes=-64".to_string(), len - 64, len),
        (format!("bytes=1000-{}", len + 5000), 1000, len),
    ] {
        let r = serve.get("/b.eota", &[("Range", &spec)]);
        assert_eq!(r.status, 206, "{spec}");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {a}-{}/{len}", z - 1).as_str()),
            "{spec}"
        );
        assert!(r.body == bytes[a..z], "{spec}: wrong bytes");
    }
}

/// The parts of a `multipart/byteranges` body: (Content-Range, bytes), checked to be framed
/// exactly (boundary lines, CRLFs, a closing delimiter and nothing after it).
fn multipart(r: &Resp) -> Vec<(String, Vec<u8>)> {
    let ct = r.header("content-type").unwrap();
    let boundary = ct
        .strip_prefix("multipart/byteranges; boundary=")
        .unwrap_or_else(|| panic!("content-type {ct}"));
    assert_eq!(r.content_length(), r.body.len() as u64);
    let delim = format!("--{boundary}");
    let mut rest = &r.body[..];
    let mut parts = Vec::new();
    // Optional CRLF before the first delimiter.
    if rest.starts_with(b"\r\n") {
        rest = &rest[2..];
    }
    loop {
        assert!(rest.starts_with(delim.as_bytes()), "no delimiter");
        rest = &rest[delim.len()..];
        if rest.starts_with(b"--") {
            rest = &rest[2..];
            assert!(rest.is_empty() || rest == b"\r\n", "bytes after the close");
            return parts;
        }
        assert!(rest.starts_with(b"\r\n"));
        rest = &rest[2..];
        let end = rest.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = std::str::from_utf8(&rest[..end]).unwrap();
        let range = head
            .split("\r\n")
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-range")
                    .then(|| v.trim().to_string())
            })
            .expect("a part without Content-Range");
        rest = &rest[end + 4..];
        let (a, z) = range
            .strip_prefix("bytes ")
            .unwrap()
            .split_once('/')
            .unwrap()
            .0
            .split_once('-')
            .unwrap();
        let n = z.parse::<usize>().unwrap() + 1 - a.parse::<usize>().unwrap();
        parts.push((range, rest[..n].to_vec()));
        rest = &rest[n..];
        assert!(rest.starts_with(b"\r\n"), "part not followed by CRLF");
        rest = &rest[2..];
    }
}

#[test]
fn multiple_ranges_are_multipart_byteranges_byte_for_byte() {
    let dev = Device::new(2 << 20);
    let (dir, b) = served_dir(&dev);
    let serve = Serve::start(dir.path(), "", &[]);
    let bytes = std::fs::read(&b).unwrap();
    let len = bytes.len();
    let want = [
        (0usize, 64usize),
        (5000, 9000),
        (200_000, 200_001),
        (len - 7, len),
    ];
    let spec = format!(
        "bytes={}",
        want.iter()
            .map(|(a, z)| format!("{a}-{}", z - 1))
            .collect::<Vec<_>>()
            .join(",")
    );
    let r = serve.get("/b.eota", &[("Range", &spec)]);
    assert_eq!(r.status, 206);
    let parts = multipart(&r);
    assert_eq!(parts.len(), want.len());
    for ((range, data), (a, z)) in parts.iter().zip(want) {
        assert_eq!(range, &format!("bytes {a}-{}/{len}", z - 1));
        assert!(data[..] == bytes[a..z], "part {range}: wrong bytes");
    }
    // Many ranges (the most a leaf asks for in one request, 64) are served too.
    let many: Vec<String> = (0..64)
        .map(|i| format!("{}-{}", i * 1000, i * 1000 + 99))
        .collect();
    let r = serve.get(
        "/b.eota",
        &[("Range", &format!("bytes={}", many.join(",")))],
    );
    assert_eq!(r.status, 206);
    let parts = multipart(&r);
    assert_eq!(parts.len(), 64);
    for (i, (_, data)) in parts.iter().enumerate() {
        assert!(data[..] == bytes[i * 1000..i * 1000 + 100]);
    }
}

#[test]
fn if_range_with_a_stale_validator_gets_the_whole_bundle() {
    let dev = Device::new(2 << 20);
    let (dir, b) = served_dir(&dev);
    let serve = Serve::start(dir.path(), "", &[]);
    let bytes = std::fs::read(&b).unwrap();
    let etag = format!("\"{}\"", bundle_id(&b));
    let stale = format!("\"{}\"", "0".repeat(64));
    let r = serve.get("/b.eota", &[("Range", "bytes=10-19"), ("If-Range", &stale)]);
    assert_eq!(r.status, 200, "a stale If-Range must get the full entity");
    assert!(r.body == bytes);
    // A weak validator never matches If-Range (RFC 9110 §13.1.5).
    let weak = format!("W/{etag}");
    let r = serve.get("/b.eota", &[("Range", "bytes=10-19"), ("If-Range", &weak)]);
    assert_eq!(r.status, 200);
    let r = serve.get("/b.eota", &[("Range", "bytes=10-19"), ("If-Range", &etag)]);
    assert_eq!(r.status, 206);
    assert!(r.body == bytes[10..20]);
}

#[test]
fn unsatisfiable_range_is_416_with_the_length() {
    let dev = Device::new(2 << 20);
    let (dir, b) = served_dir(&dev);
    let serve = Serve::start(dir.path(), "", &[]);
    let len = std::fs::metadata(&b).unwrap().len();
    for spec in [
        format!("bytes={len}-"),
        format!("bytes={}-{}", len + 10, len + 20),
    ] {
        let r = serve.get("/b.eota", &[("Range", &spec)]);
        assert_eq!(r.status, 416, "{spec}");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes */{len}").as_str())
        );
    }
}

#[test]
fn index_lists_compatible_version_security_version_id_and_size() {
    let dev = Device::new(2 << 20);
    let (dir, b) = served_dir(&dev);
    // Not bundles: never listed.
    std::fs::write(dir.path().join("junk.eota"), b"not a bundle").unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"hello").unwrap();
    let serve = Serve::start(dir.path(), "", &[]);
    let ix = serve.index();
    assert_eq!(ix["api"], 1);
    assert_eq!(ix["upstream"], false);
    let bundles = ix["bundles"].as_array().unwrap();
    assert_eq!(bundles.len(), 1, "{ix}");
    let e = &bundles[0];
    assert_eq!(e["name"], "b.eota");
    assert_eq!(e["path"], "/b.eota");
    assert_eq!(e["compatible"], "edge-test");
    assert_eq!(e["version"], "2.0.0");
    assert_eq!(e["security_version"], 2);
    assert_eq!(e["bundle_id"], bundle_id(&b));
    assert_eq!(e["size"], std::fs::metadata(&b).unwrap().len());
    assert_eq!(e["complete"], true);
    // A bundle copied in later appears after a rescan.
    let v3 = dev.bundle(
        "v3.eota",
        &BundleOpts {
            version: "3.0.0",
            ..Default::default()
        },
    );
    std::fs::copy(&v3, dir.path().join("c.eota")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while serve.index()["bundles"].as_array().unwrap().len() < 2 {
        assert!(Instant::now() < deadline, "c.eota never listed");
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------------------------------
// The pull-through cache

/// An origin (nginx) behind the counting proxy, serving `files` by name.
struct Upstream {
    root: tempfile::TempDir,
    _nginx: Nginx,
    proxy: Proxy,
}

fn upstream(files: &[(&str, &Path)], faults: Faults, test: &str) -> Option<Upstream> {
    if Nginx::find().is_none() {
        edge_ota::testing::skip(test, "nginx is not installed (apt-get install nginx-light)");
        return None;
    }
    let root = tempfile::tempdir().unwrap();
    for (name, p) in files {
        std::fs::copy(p, root.path().join(name)).unwrap();
    }
    let nginx = Nginx::start(root.path()).unwrap();
    let proxy = Proxy::start("127.0.0.1:0", &nginx.origin(), faults).unwrap();
    Some(Upstream {
        root,
        _nginx: nginx,
        proxy,
    })
}

fn pull_through(up: &Upstream, dir: &Path, toml: &str) -> Serve {
    let key = demo_key("INSECURE-demo.pub.pem");
    Serve::start(
        dir,
        toml,
        &[
            "--upstream",
            &up.proxy.url("/"),
            "--trust-key",
            key.to_str().unwrap(),
        ],
    )
}

fn random_bundle(
    dev: &Device,
    name: &str,
    version: &'static str,
    len: usize,
    seed: u64,
) -> PathBuf {
    // The pseudo-random half of image_bytes: incompressible, shares no chunk with another seed.
    let data = image_bytes(2 * len, seed)[..len].to_vec();
    dev.bundle(
        name,
        &BundleOpts {
            version,
            payloads: vec![(edge_ota::bundle::PayloadKind::Image, "rootfs", data)],
            ..Default::default()
        },
    )
}

#[test]
fn concurrent_leaves_share_one_upstream_download() {
    let devs: Vec<Device> = (0..4).map(|_| Device::new(2 << 20)).collect();
    let image = image_bytes(1 << 20, 5);
    let b = devs[0].bundle(
        "v2.eota",
        &BundleOpts {
            payloads: vec![(
                edge_ota::bundle::PayloadKind::Image,
                "rootfs",
                image.clone(),
            )],
            ..Default::default()
        },
    );
    let size = std::fs::metadata(&b).unwrap().len();
    // A slow upstream link: the leaves all ask while the bundle is still arriving.
    let faults = Faults {
        throttle: Some(400 << 10),
        ..Default::default()
    };
    let Some(up) = upstream(&[("b.eota", &b)], faults, "concurrent_leaves_share_one") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let serve = pull_through(&up, dir.path(), "");
    let children: Vec<_> = devs
        .iter()
        .map(|d| {
            d.cmd()
                .args(["apply", "--no-reboot", "-q", &serve.url("/b.eota")])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        ok(&c.wait_with_output().unwrap());
    }
    for d in &devs {
        installed(d, &image);
    }
    let upstream_bytes = up.proxy.stats().body_bytes_sent;
    assert!(
        upstream_bytes as f64 <= 1.05 * size as f64,
        "{upstream_bytes} bytes over the upstream link for one {size}-byte bundle and 4 leaves"
    );
    let st = serve.stats();
    assert_eq!(st["upstream_fetches"], 1, "{st}");
    // Complete and listed; the next leaf is served from the disk.
    let e = &serve.index()["bundles"][0];
    assert_eq!(
        (e["complete"].as_bool(), e["origin"].as_str()),
        (Some(true), Some("cache"))
    );
    let r = serve.get("/b.eota", &[]);
    assert!(r.body == std::fs::read(&b).unwrap());
    assert_eq!(up.proxy.stats().body_bytes_sent, upstream_bytes);
}

#[test]
fn chunks_shared_across_versions_are_fetched_once() {
    let dev = Device::new(2 << 20);
    let v1 = image_bytes(1 << 20, 6);
    let mut v2 = v1.clone();
    v2[100_000..100_100].fill(0x5a);
    let b1 = dev.bundle(
        "v1.eota",
        &BundleOpts {
            version: "1.0.0",
            payloads: vec![(edge_ota::bundle::PayloadKind::Image, "rootfs", v1)],
            ..Default::default()
        },
    );
    let b2 = dev.bundle(
        "v2.eota",
        &BundleOpts {
            payloads: vec![(edge_ota::bundle::PayloadKind::Image, "rootfs", v2)],
            ..Default::default()
        },
    );
    let Some(up) = upstream(
        &[("v1.eota", &b1), ("v2.eota", &b2)],
        Faults::default(),
        "chunks_shared_across_versions",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let serve = pull_through(&up, dir.path(), "");
    assert!(serve.get("/v1.eota", &[]).body == std::fs::read(&b1).unwrap());
    let after_v1 = up.proxy.stats().body_bytes_sent;
    assert!(serve.get("/v2.eota", &[]).body == std::fs::read(&b2).unwrap());
    let for_v2 = up.proxy.stats().body_bytes_sent - after_v1;
    let size2 = std::fs::metadata(&b2).unwrap().len();
    // The head and the one changed chunk.
    assert!(
        for_v2 < size2 / 5,
        "v2 cost {for_v2} upstream bytes of {size2}: shared chunks were fetched again"
    );
}

#[test]
fn tampered_upstream_bundle_is_never_served_as_complete() {
    let dev = Device::new(2 << 20);
    let b = random_bundle(&dev, "v2.eota", "2.0.0", 1 << 20, 11);
    // The last byte of the payload changed: the head (and signatures) are intact, the last
    // frame does not check out. A reader streaming along must never get a whole response.
    let mut bytes = std::fs::read(&b).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    let bad = dev.path("bad.eota");
    std::fs::write(&bad, &bytes).unwrap();
    let faults = Faults {
        throttle: Some(1 << 20),
        ..Default::default()
    };
    let Some(up) = upstream(&[("b.eota", &bad)], faults, "tampered_upstream_bundle") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let serve = pull_through(&up, dir.path(), "");
    let r = serve.get("/b.eota", &[]);
    assert_eq!(r.status, 200);
    assert!(
        (r.body.len() as u64) < r.content_length(),
        "a response carried all {} bytes of a bundle whose last frame does not check out",
        r.body.len()
    );
    // Now known bad: refused at once, never listed as complete.
    let r = serve.get("/b.eota", &[]);
    assert_eq!(r.status, 502, "{}", serve.log());
    for e in serve.index()["bundles"].as_array().unwrap() {
        assert_eq!(e["complete"], false, "{e}");
    }
    // A leaf through it: refused (after two attempts), the boot environment untouched.
    dev.edit_config(|c| {
        c + "[network]\nmax_attempts = 2\nbackoff_base_secs = 0.1\nbackoff_cap_secs = 0.2\n"
    });
    let before = dev.snapshot();
    let o = dev.run(&["apply", "--no-reboot", &serve.url("/b.eota")]);
    assert_ne!(o.status.code(), Some(0));
    assert_eq!(before.0, dev.snapshot().0, "the boot environment changed");
    // A bundle whose signature does not verify is refused before any payload byte.
    let mut unsigned = std::fs::read(&b).unwrap();
    let (_, m, _, _) = layout(&b);
    unsigned[64 + m / 2] ^= 1;
    std::fs::write(up.root.path().join("u.eota"), &unsigned).unwrap();
    let r = serve.get("/u.eota", &[]);
    assert_eq!(r.status, 502);
    assert!(r.body.starts_with(b"the upstream's bundle was refused"));
}

fn dir_bytes(p: &Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(p).unwrap().flatten() {
        // serve renames and removes its temporary files while this walks: a file gone
        // between the listing and its metadata holds nothing.
        let Ok(m) = e.metadata() else {
            continue;
        };
        n += if m.is_dir() {
            dir_bytes(&e.path())
        } else {
            m.len()
        };
    }
    n
}

#[test]
fn interrupted_upstream_fetch_resumes_where_it_stopped() {
    let dev = Device::new(2 << 20);
    let b = random_bundle(&dev, "v2.eota", "2.0.0", 3 << 20, 12);
    let size = std::fs::metadata(&b).unwrap().len();
    let faults = Faults {
        throttle: Some(1 << 20),
        ..Default::default()
    };
    let Some(up) = upstream(&[("b.eota", &b)], faults, "interrupted_upstream_fetch") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join(".edge-ota-cache");
    let mut serve = pull_through(&up, dir.path(), "");
    let addr = serve.addr;
    let reader = std::thread::spawn(move || request(addr, "GET", "/b.eota", &[]));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cache.join("frames").exists() || dir_bytes(&cache.join("frames")) < size / 3 {
        assert!(Instant::now() < deadline, "the cache stored nothing");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Power cut on the base station.
    serve.kill();
    let _ = reader.join();
    let first = up.proxy.stats().body_bytes_sent;
    let kept = dir_bytes(&cache.join("frames"));
    up.proxy.set_faults(Faults::default());
    let serve = pull_through(&up, dir.path(), "");
    let r = serve.get("/b.eota", &[]);
    assert!(r.body == std::fs::read(&b).unwrap(), "{}", serve.log());
    let second = up.proxy.stats().body_bytes_sent - first;
    assert!(
        // The reopened download reads the first 64 KiB again (the head is in them).
        second + kept <= size + (128 << 10),
        "the second run fetched {second} bytes, {kept} were kept, of a {size}-byte bundle"
    );
    assert!(
        first + second <= size + (256 << 10),
        "{first} + {second} upstream bytes for a {size}-byte bundle"
    );
}

#[test]
fn bounded_cache_evicts_the_oldest_version_never_one_being_served() {
    let dev = Device::new(2 << 20);
    // Larger than every socket buffer: a stalled reader of v2 really holds v2.
    let b1 = random_bundle(&dev, "v1.eota", "1.0.0", 6 << 20, 21);
    let b2 = random_bundle(&dev, "v2.eota", "2.0.0", 6 << 20, 22);
    let b3 = random_bundle(&dev, "v3.eota", "3.0.0", 6 << 20, 23);
    let size = std::fs::metadata(&b1).unwrap().len();
    let max = size * 3 / 2;
    let Some(up) = upstream(
        &[("v1.eota", &b1), ("v2.eota", &b2), ("v3.eota", &b3)],
        Faults::default(),
        "bounded_cache_evicts",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join(".edge-ota-cache");
    let serve = pull_through(&up, dir.path(), &format!("max_cache_bytes = {max}"));
    assert!(serve.get("/v1.eota", &[]).body == std::fs::read(&b1).unwrap());
    assert!(serve.get("/v2.eota", &[]).body == std::fs::read(&b2).unwrap());
    let names: Vec<String> = serve.index()["bundles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["v2.eota"], "v1 should have been evicted");
    assert!(
        dir_bytes(&cache) <= max,
        "{} bytes cached, limit {max}",
        dir_bytes(&cache)
    );
    // v2 being read by a leaf that stalls: v3 cannot make room.
    let slow = stalled_reader(serve.addr, "/v2.eota");
    let r = serve.get("/v3.eota", &[]);
    assert_eq!(r.status, 507, "{}", serve.log());
    assert!(serve.get("/v2.eota", &[("Range", "bytes=0-99")]).status == 206);
    // The leaf goes away: now v2 is evicted for v3.
    drop(slow);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = serve.get("/v3.eota", &[]);
        if r.status == 200 {
            assert!(r.body == std::fs::read(&b3).unwrap());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "v3 never served: {}",
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(dir_bytes(&cache) <= max);
}

// ---------------------------------------------------------------------------------------
// Attacks from the LAN

/// A served directory inside a parent that holds a secret bundle-named file.
fn dir_with_secret(dev: &Device) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let parent = tempfile::tempdir().unwrap();
    let served = parent.path().join("served");
    std::fs::create_dir(&served).unwrap();
    let b = dev.bundle("v2.eota", &BundleOpts::default());
    std::fs::copy(&b, served.join("b.eota")).unwrap();
    // A valid bundle outside the directory: readable only through an escape.
    let secret = std::fs::read(&b).unwrap();
    std::fs::write(parent.path().join("secret.eota"), &secret).unwrap();
    std::fs::write(parent.path().join("passwd"), b"root:x:0:0").unwrap();
    (parent, served, secret)
}

fn assert_no_escape(r: &Resp, secret: &[u8], what: &str) {
    assert!(
        r.status == 404 || r.status == 400,
        "{what}: status {}",
        r.status
    );
    assert!(
        !r.body.windows(8).any(|w| w == &secret[..8]) && !r.body.windows(4).any(|w| w == b"root"),
        "{what}: a file outside the directory was served"
    );
}

#[test]
fn path_traversal_is_refused() {
    let dev = Device::new(2 << 20);
    let (_parent, served, secret) = dir_with_secret(&dev);
    let serve = Serve::start(&served, "", &[]);
    for path in [
        "/../secret.eota",
        "/..%2fsecret.eota",
        "/%2e%2e/secret.eota",
        "/%2e%2e%2fsecret.eota",
        "/b.eota/../../secret.eota",
        "/./../secret.eota",
        "//../secret.eota",
        "/..\\secret.eota",
        "/../passwd",
        "/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/.edge-ota-cache/../../secret.eota",
    ] {
        let raw = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let out = exchange(serve.addr, raw.as_bytes());
        if out.is_empty() {
            continue; // closed without an answer: nothing served
        }
        assert_no_escape(&parse(&out), &secret, path);
    }
    // Absolute-form request targets name no file either.
    let raw = "GET http://x/../secret.eota HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let out = exchange(serve.addr, raw.as_bytes());
    if !out.is_empty() {
        assert_no_escape(&parse(&out), &secret, "absolute form");
    }
    assert_eq!(serve.get("/b.eota", &[]).status, 200);
}

#[test]
fn symlink_in_the_directory_is_not_followed() {
    let dev = Device::new(2 << 20);
    let (parent, served, secret) = dir_with_secret(&dev);
    std::os::unix::fs::symlink(parent.path().join("secret.eota"), served.join("link.eota"))
        .unwrap();
    std::os::unix::fs::symlink(parent.path(), served.join("up")).unwrap();
    let serve = Serve::start(&served, "", &[]);
    assert_no_escape(&serve.get("/link.eota", &[]), &secret, "symlink");
    assert_no_escape(
        &serve.get("/up/secret.eota", &[]),
        &secret,
        "symlinked directory",
    );
    let names: Vec<_> = serve.index()["bundles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].clone())
        .collect();
    assert_eq!(names, ["b.eota"]);
    // A bundle replaced by a link after the scan is not followed either.
    std::fs::remove_file(served.join("b.eota")).unwrap();
    std::os::unix::fs::symlink(parent.path().join("secret.eota"), served.join("b.eota")).unwrap();
    assert_no_escape_or_retry(&serve.get("/b.eota", &[]), &secret);
}

fn assert_no_escape_or_retry(r: &Resp, secret: &[u8]) {
    assert!(r.status == 404 || r.status == 503, "status {}", r.status);
    assert!(!r.body.windows(8).any(|w| w == &secret[..8]));
}

#[test]
fn too_many_ranges_are_refused() {
    let dev = Device::new(2 << 20);
    let (dir, _) = served_dir(&dev);
    let serve = Serve::start(dir.path(), "max_ranges = 16", &[]);
    let spec = |n: usize| {
        format!(
            "bytes={}",
            (0..n)
                .map(|i| format!("{}-{}", i * 10, i * 10 + 4))
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    let r = serve.get("/b.eota", &[("Range", &spec(16))]);
    assert_eq!(r.status, 206);
    let before = serve.stats()["refused_ranges"].as_u64().unwrap();
    let r = serve.get("/b.eota", &[("Range", &spec(17))]);
    assert_eq!(r.status, 416);
    assert!(
        r.body.len() < 100,
        "a refusal carried {} bytes",
        r.body.len()
    );
    // Thousands of tiny ranges (one request making the server seek and frame each).
    let r = serve.get("/b.eota", &[("Range", &spec(1500))]);
    assert_eq!(r.status, 416);
    assert_eq!(
        serve.stats()["refused_ranges"].as_u64().unwrap(),
        before + 2
    );
}

#[test]
fn overlapping_ranges_are_refused() {
    let dev = Device::new(2 << 20);
    let (dir, _) = served_dir(&dev);
    let serve = Serve::start(dir.path(), "", &[]);
    // The "send the file many times over" shape: the whole file, repeatedly.
    let r = serve.get("/b.eota", &[("Range", "bytes=0-,0-,0-,0-")]);
    assert_eq!(r.status, 416);
    assert!(r.body.len() < 100);
    for spec in [
        "bytes=0-99,50-149",
        "bytes=500-600,0-1000",
        "bytes=0-10,-5000000",
    ] {
        assert_eq!(
            serve.get("/b.eota", &[("Range", spec)]).status,
            416,
            "{spec}"
        );
    }
    // Adjacent is not overlapping.
    assert_eq!(
        serve
            .get("/b.eota", &[("Range", "bytes=0-99,100-199")])
            .status,
        206
    );
}

#[test]
fn oversized_headers_are_refused() {
    let dev = Device::new(2 << 20);
    let (dir, _) = served_dir(&dev);
    let serve = Serve::start(
        dir.path(),
        "max_header_bytes = 16384\nmax_headers = 32",
        &[],
    );
    let big = "a".repeat(64 << 10);
    let raw = format!("GET /b.eota HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let out = exchange(serve.addr, raw.as_bytes());
    assert_eq!(
        parse(&out).status,
        431,
        "{}",
        String::from_utf8_lossy(&out[..out.len().min(200)])
    );
    let many: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    let raw = format!("GET /b.eota HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    let out = exchange(serve.addr, raw.as_bytes());
    assert_eq!(parse(&out).status, 431);
    // A request body is never read.
    let raw = "GET /b.eota HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\nxx";
    assert_eq!(parse(&exchange(serve.addr, raw.as_bytes())).status, 413);
    assert_eq!(serve.get("/b.eota", &[]).status, 200);
}

/// Whether the server closed `s` within `within`, while `poke` runs every 200 ms.
fn closed_within(
    s: &mut TcpStream,
    within: Duration,
    mut poke: impl FnMut(&mut TcpStream),
) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
        poke(s);
    }
    false
}

#[test]
fn slow_loris_is_closed_after_the_idle_timeout() {
    let dev = Device::new(2 << 20);
    let (dir, _) = served_dir(&dev);
    let serve = Serve::start(dir.path(), "idle_timeout_secs = 1", &[]);
    // A head trickled one byte at a time, never finished.
    let mut loris = TcpStream::connect(serve.addr).unwrap();
    loris
        .write_all(b"GET /b.eota HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let t0 = Instant::now();
    let closed = closed_within(&mut loris, Duration::from_secs(6), |s| {
        let _ = s.write_all(b"X");
    });
    assert!(closed, "a trickling head kept its connection for 6 s");
    assert!(t0.elapsed() >= Duration::from_millis(800));
    // A connection that never sends anything.
    let mut silent = TcpStream::connect(serve.addr).unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(5), |_| {}));
    assert_eq!(serve.get("/b.eota", &[]).status, 200);
}

/// A leaf that asks for a bundle larger than every socket buffer and stops reading.
fn stalled_reader(addr: SocketAddr, path: &str) -> TcpStream {
    let mut s = connect_with([127, 0, 0, 1], Some(4096), addr);
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut first = [0u8; 16];
    s.read_exact(&mut first).unwrap();
    s
}

#[test]
fn client_that_stops_reading_is_closed_after_the_idle_timeout() {
    let dev = Device::new(2 << 20);
    let b = random_bundle(&dev, "big.eota", "2.0.0", 6 << 20, 31);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&b, dir.path().join("b.eota")).unwrap();
    let serve = Serve::start(dir.path(), "idle_timeout_secs = 1", &[]);
    let mut stuck = stalled_reader(serve.addr, "/b.eota");
    std::thread::sleep(Duration::from_secs(4));
    let st = serve.stats();
    assert_eq!(st["idle_closed"], 1, "{st}");
    // What was in the buffers, then the end: never the whole bundle.
    stuck
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    let _ = stuck.read_to_end(&mut got);
    let size = std::fs::metadata(&b).unwrap().len();
    assert!(
        (got.len() as u64) < size,
        "a closed connection carried {} bytes",
        got.len()
    );
}

#[test]
fn connection_flood_is_capped_per_peer_and_in_all() {
    let dev = Device::new(2 << 20);
    let (dir, _) = served_dir(&dev);
    let serve = Serve::start(
        dir.path(),
        "max_connections = 6\nmax_connections_per_peer = 4\nidle_timeout_secs = 30",
        &[],
    );
    let mut held: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(serve.addr).unwrap())
        .collect();
    // The fifth from the same address, once the four are accepted: 503 and closed.
    let deadline = Instant::now() + Duration::from_secs(5);
    let r = loop {
        let r = serve.get("/b.eota", &[]);
        if r.status == 503 {
            break r;
        }
        assert!(Instant::now() < deadline, "the per-peer limit did not hold");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(r.header("retry-after").is_some());
    // Another peer address (all of 127/8 is loopback) still gets in, up to the total.
    let other = |ip: [u8; 4]| -> Resp {
        let s = socket_from(ip, serve.addr);
        let mut s = s;
        write!(
            s,
            "GET /b.eota HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        parse(&out)
    };
    assert_eq!(other([127, 0, 0, 2]).status, 200);
    held.push(socket_from([127, 0, 0, 3], serve.addr));
    held.push(socket_from([127, 0, 0, 3], serve.addr));
    // Once the server has accepted those two (under a loaded test run that can take longer
    // than any fixed sleep), the total of 6 is reached and a seventh peer is turned away.
    let deadline = Instant::now() + Duration::from_secs(5);
    while other([127, 0, 0, 4]).status != 503 {
        assert!(Instant::now() < deadline, "the total limit did not hold");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The flood ends: service again.
    held.clear();
    let deadline = Instant::now() + Duration::from_secs(5);
    while serve.get("/b.eota", &[]).status != 200 {
        assert!(Instant::now() < deadline, "no service after the flood");
        std::thread::sleep(Duration::from_millis(100));
    }
    let st = serve.stats();
    assert!(st["refused_connections"].as_u64().unwrap() >= 2, "{st}");
}

/// A connection from source address `ip` (std cannot bind before connecting).
fn socket_from(ip: [u8; 4], to: SocketAddr) -> TcpStream {
    connect_with(ip, None, to)
}

/// A connection from `ip` with a receive buffer of `rcvbuf` bytes (set before connecting: a
/// leaf that stops reading then holds the server's response back at once).
fn connect_with(ip: [u8; 4], rcvbuf: Option<i32>, to: SocketAddr) -> TcpStream {
    use nix::libc;
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(v4) = to else {
        panic!("IPv4 only")
    };
    let sin = |ip: [u8; 4], port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor this function owns, with valid sockaddr_in
    // values and their sizes; the descriptor's ownership then moves to the TcpStream.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        if let Some(n) = rcvbuf {
            let r = libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&n as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            );
            assert_eq!(r, 0, "setsockopt: {}", std::io::Error::last_os_error());
        }
        let local = sin(ip, 0);
        let r = libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len);
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        let remote = sin(v4.ip().octets(), v4.port());
        let r = libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len);
        assert_eq!(r, 0, "connect: {}", std::io::Error::last_os_error());
        TcpStream::from_raw_fd(fd)
    }
}
