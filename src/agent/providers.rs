//! Desired-state providers: each runs on its own thread and hands the agent a document when it
//! changes. The latest change wins (a stick plugged in by a person, a GitOps commit, a fleet
//! server: whichever changed last); an unchanged document is never handed over twice, so a
//! provider whose document stays the same cannot undo a newer one from another provider.
//!
//! - file: a local file (what a GitOps-synced file or a USB drop looks like), read every few
//!   seconds and taken only once it is the same on two reads in a row (a half-written file is
//!   never parsed);
//! - url: an http(s) URL, polled with `If-None-Match` (ETag), backing off on errors;
//! - removable media: [`super::media`].

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use crossbeam_channel::Sender;

use super::desired;
use super::Input;
use crate::config::AgentConfig;
use crate::source::http::HttpOptions;

/// How often the file provider looks.
pub const FILE_POLL: Duration = Duration::from_secs(2);

/// Watch `path`; hand over each new stable content.
pub fn watch_file(path: PathBuf, agent: AgentConfig, tx: Sender<Input>, every: Duration) {
    let origin = format!("file:{}", path.display());
    let mut given: Option<blake3::Hash> = None;
    let mut seen: Option<blake3::Hash> = None;
    let mut last_error: Option<String> = None;
    loop {
        match std::fs::read(&path) {
            Ok(bytes) => {
                let h = blake3::hash(&bytes);
                if seen == Some(h) && given != Some(h) {
                    given = Some(h);
                    let d = desired::parse(&bytes, &origin, &agent);
                    if tx
                        .send(Input::Offer(origin.clone(), d.map(Box::new)))
                        .is_err()
                    {
                        return;
                    }
                }
                seen = Some(h);
                last_error = None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // A missing file withdraws nothing (a GitOps tool may be replacing it); the
                // same content appearing again is not handed over twice.
                seen = None;
            }
            Err(e) => {
                let msg = format!("reading {}: {e}", path.display());
                if last_error.as_ref() != Some(&msg) {
                    let _ = tx.send(Input::ProviderError(origin.clone(), msg.clone()));
                    last_error = Some(msg);
                }
            }
        }
        std::thread::sleep(every);
    }
}

/// Poll `url` every `agent.poll_secs`; hand over each new document.
pub fn poll_url(url: String, net: HttpOptions, agent: AgentConfig, tx: Sender<Input>) {
    let origin = format!("url:{url}");
    let every = Duration::from_secs(agent.poll_secs);
    let client = match crate::source::http::build_client(&net) {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Input::ProviderError(origin, e.to_string()));
            return;
        }
    };
    let mut etag: Option<String> = None;
    let mut given: Option<blake3::Hash> = None;
    let mut delay = every;
    loop {
        let mut req = client.get(&url);
        if let Some(e) = &etag {
            req = req.header("if-none-match", e);
        }
        let outcome = req.send().map_err(|e| e.to_string()).and_then(|resp| {
            let status = resp.status();
            if status == reqwest::StatusCode::NOT_MODIFIED {
                return Ok(None);
            }
            if !status.is_success() {
                return Err(format!("HTTP {status}"));
            }
            let tag = resp
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .map(String::from);
            let mut body = Vec::new();
            resp.take(desired::MAX_LEN as u64 + 1)
                .read_to_end(&mut body)
                .map_err(|e| e.to_string())?;
            Ok(Some((tag, body)))
        });
        match outcome {
            Ok(None) => delay = every,
            Ok(Some((tag, body))) => {
                delay = every;
                etag = tag;
                let h = blake3::hash(&body);
                if given != Some(h) {
                    given = Some(h);
                    let d = desired::parse(&body, &origin, &agent);
                    if tx
                        .send(Input::Offer(origin.clone(), d.map(Box::new)))
                        .is_err()
                    {
                        return;
                    }
                }
            }
            Err(e) => {
                if tx
                    .send(Input::ProviderError(origin.clone(), e.clone()))
                    .is_err()
                {
                    return;
                }
                // Back off while the server or the link is down; never hammer it.
                delay = (delay * 2).min(Duration::from_secs(agent.retry_max_secs).max(every));
            }
        }
        std::thread::sleep(delay);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::desired::tests::agent;

    const DOC: &str = "apiVersion: edge-ota.io/v1alpha1\nkind: OSUpdate\nspec:\n  version: 2.0.0\n  sources: [/x.eota]\n";

    #[test]
    fn file_is_handed_over_once_when_stable_and_again_only_when_changed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("desired.yaml");
        std::fs::write(&path, DOC).unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let p = path.clone();
        std::thread::spawn(move || watch_file(p, agent(), tx, Duration::from_millis(20)));
        let first = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let Input::Offer(origin, Ok(d)) = first else {
            panic!("expected an offer")
        };
        assert!(origin.starts_with("file:"));
        assert_eq!(d.target(), "2.0.0");
        // Unchanged: nothing more.
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        std::fs::write(&path, DOC.replace("2.0.0", "2.1.0")).unwrap();
        let Input::Offer(_, Ok(d)) = rx.recv_timeout(Duration::from_secs(5)).unwrap() else {
            panic!("expected an offer")
        };
        assert_eq!(d.target(), "2.1.0");
    }

    #[test]
    fn malformed_file_is_reported_not_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("desired.yaml");
        std::fs::write(&path, "kind: OSUpdate\nspec: [").unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let p = path.clone();
        std::thread::spawn(move || watch_file(p, agent(), tx, Duration::from_millis(20)));
        let Input::Offer(_, r) = rx.recv_timeout(Duration::from_secs(5)).unwrap() else {
            panic!("expected an offer")
        };
        assert!(r.unwrap_err().contains("desired state from file:"));
    }
}
