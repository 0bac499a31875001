//! Progress of long operations (apply, fetch): a bar on a terminal for people, versioned JSON
//! Lines for programs (`--progress=jsonl`: the agent and GitOps layers follow these), or
//! nothing. Byte counts are cumulative; rate and ETA are computed here.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// Schema version of the JSON Lines events.
pub const EVENTS_VERSION: u32 = 1;

/// One thing worth reporting.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// A phase starts: verifying, planning, writing, reading-back, staging, done.
    Phase { phase: String, detail: String },
    /// What an apply or fetch will do, before it starts.
    Plan(Plan),
    /// Bytes so far.
    Bytes(Bytes),
    /// Something a person should read (a retry, a fallback, why the delta is not used).
    Note { message: String },
}

/// The plan of an apply or fetch, in bytes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Plan {
    /// Where the bundle comes from (path, URL, cache).
    pub source: String,
    /// Uncompressed size of everything the bundle installs.
    pub full_size: u64,
    /// Compressed bytes still to fetch from the source.
    pub fetch: u64,
    /// Of those, bytes of delta frames (rebuilding from the running slot).
    pub fetch_delta: u64,
    /// Uncompressed bytes already present: in the target slot (resume), in the running slot,
    /// zeros, or in the staging cache.
    pub reused: u64,
    pub reused_target: u64,
    pub reused_local: u64,
    pub reused_cache: u64,
    /// The release a delta rebuilds from, when one is used.
    pub delta_from: Option<String>,
}

/// Cumulative byte counts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Bytes {
    /// Compressed bytes that must come from the source (the plan's `fetch`).
    pub needed: u64,
    /// Of those, received so far.
    pub fetched: u64,
    /// Uncompressed bytes written to the target so far, of `total`.
    pub written: u64,
    pub total: u64,
    /// Bytes reused instead of fetched (the plan's `reused`).
    pub reused: u64,
    /// Fetch rate, bytes per second, since the start.
    pub rate: u64,
    /// Seconds to fetch the rest at that rate.
    pub eta_secs: Option<u64>,
}

/// One JSON Lines record: `{"version":1,"time":…,"event":"bytes",…}`.
#[derive(Serialize)]
pub struct Line<'a> {
    pub version: u32,
    /// Unix seconds.
    pub time: u64,
    #[serde(flatten)]
    pub event: &'a Event,
}

impl Line<'_> {
    /// The record as one line of JSON (no newline).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("serializable")
    }
}

/// Receives every event with its time (the agent forwards them to its API and metrics).
pub type Sink = std::sync::Arc<dyn Fn(u64, &Event) + Send + Sync>;

enum Mode {
    Bar(ProgressBar),
    Jsonl,
    Quiet,
    Sink(Sink),
}

/// Where events go.
pub struct Progress {
    mode: Mode,
    started: Instant,
    last_bytes: Mutex<Option<Instant>>,
}

/// How the CLI asked for progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// A bar on a terminal, nothing otherwise.
    Auto,
    /// JSON Lines on standard output.
    Jsonl,
    /// Nothing.
    None,
}

impl Progress {
    pub fn new(mode: ProgressMode) -> Self {
        let mode = match mode {
            ProgressMode::Jsonl => Mode::Jsonl,
            ProgressMode::None => Mode::Quiet,
            ProgressMode::Auto if std::io::stderr().is_terminal() => {
                let b = ProgressBar::new(0);
                b.set_style(
                    ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                Mode::Bar(b)
            }
            ProgressMode::Auto => Mode::Quiet,
        };
        Progress {
            mode,
            started: Instant::now(),
            last_bytes: Mutex::new(None),
        }
    }

    /// A bar if stderr is a terminal and `quiet` is off.
    pub fn auto(quiet: bool) -> Self {
        Self::new(if quiet {
            ProgressMode::None
        } else {
            ProgressMode::Auto
        })
    }

    pub fn hidden() -> Self {
        Self::new(ProgressMode::None)
    }

    /// Every event goes to `sink`.
    pub fn sink(sink: Sink) -> Self {
        Progress {
            mode: Mode::Sink(sink),
            started: Instant::now(),
            last_bytes: Mutex::new(None),
        }
    }

    pub fn is_jsonl(&self) -> bool {
        matches!(self.mode, Mode::Jsonl)
    }

    /// Report an event. Byte counts are throttled to a few per second.
    pub fn event(&self, e: Event) {
        if let Event::Bytes(b) = &e {
            let mut last = self.last_bytes.lock().expect("progress lock");
            let done = b.written >= b.total && b.fetched >= b.needed;
            if !done && last.is_some_and(|t| t.elapsed() < Duration::from_millis(500)) {
                return;
            }
            *last = Some(Instant::now());
        }
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        match &self.mode {
            Mode::Quiet => {}
            Mode::Sink(f) => f(time, &e),
            Mode::Jsonl => {
                let line = Line {
                    version: EVENTS_VERSION,
                    time,
                    event: &e,
                };
                let mut out = std::io::stdout().lock();
                let _ = writeln!(
                    out,
                    "{}",
                    serde_json::to_string(&line).expect("serializable")
                );
                let _ = out.flush();
            }
            Mode::Bar(bar) => match e {
                Event::Phase { phase, detail } => bar.set_message(format!("{phase} {detail}")),
                Event::Plan(p) => bar.println(p.describe()),
                Event::Bytes(b) => {
                    bar.set_length(b.total);
                    bar.set_position(b.written);
                }
                Event::Note { message } => bar.println(message),
            },
        }
    }

    /// A `Bytes` event with rate and ETA filled in from the start of this operation.
    pub fn bytes(&self, mut b: Bytes) {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        b.rate = (b.fetched as f64 / secs) as u64;
        b.eta_secs = (b.rate > 0).then(|| b.needed.saturating_sub(b.fetched) / b.rate);
        self.event(Event::Bytes(b));
    }

    pub fn phase(&self, phase: &str, detail: impl Into<String>) {
        self.event(Event::Phase {
            phase: phase.into(),
            detail: detail.into(),
        });
    }

    /// A note for people: on the bar's terminal, as a JSON event, or on stderr when quiet.
    pub fn note(&self, message: impl Into<String>) {
        let message = message.into();
        match &self.mode {
            Mode::Quiet => eprintln!("edge-ota: {message}"),
            _ => self.event(Event::Note { message }),
        }
    }

    pub fn finish(&self) {
        if let Mode::Bar(b) = &self.mode {
            b.finish_and_clear();
        }
    }
}

impl Plan {
    /// One line for people.
    pub fn describe(&self) -> String {
        let mib = |b: u64| b as f64 / 1048576.0;
        let mut s = format!(
            "plan: fetch {:.2} MiB from {}, reuse {:.2} MiB (slot being written {:.2}, running slot and zeros {:.2}, staged {:.2}); full size {:.2} MiB",
            mib(self.fetch),
            self.source,
            mib(self.reused),
            mib(self.reused_target),
            mib(self.reused_local),
            mib(self.reused_cache),
            mib(self.full_size)
        );
        if let Some(v) = &self.delta_from {
            s += &format!(
                "; delta from {v}: {:.2} MiB of the fetch",
                mib(self.fetch_delta)
            );
        }
        s
    }
}
