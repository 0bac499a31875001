//! Maintenance windows: a cron pattern, a duration and an IANA time zone. A window is open at
//! `t` when the latest start at or before `t` (in the window's zone, so daylight saving time
//! moves it with the wall clock) is less than `duration` ago.
//!
//! A leaf module (cron and time zones only): the configuration and the agent both use it.
//! Time is always passed in (unix seconds), never read here, so tests inject any clock.

use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use serde::{Deserialize, Serialize};

/// Longest window accepted: a week (a longer one is a typo, or "always": say `now`).
pub const MAX_WINDOW_SECS: u64 = 7 * 86_400;

/// A window as written in the configuration (`[[agent.window]]`) or a desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WindowSpec {
    /// Cron pattern of the window's start: `min hour day month weekday`, or with a leading
    /// seconds field.
    pub schedule: String,
    /// How long the window stays open: `2h`, `90m`, `1h 30m`.
    pub duration: String,
    /// IANA time zone the pattern is read in (default UTC).
    /// (The schema names it as Kubernetes objects spell it; both spellings are read.)
    #[serde(default = "utc", alias = "timeZone", skip_serializing_if = "is_utc")]
    #[schemars(rename = "timeZone")]
    pub time_zone: String,
}

fn utc() -> String {
    "UTC".into()
}
fn is_utc(s: &String) -> bool {
    s == "UTC"
}

/// A window, checked and ready to evaluate.
#[derive(Debug, Clone)]
pub struct Window {
    cron: Cron,
    duration: u64,
    tz: Tz,
    spec: WindowSpec,
}

impl Window {
    /// Check a spec: the pattern, a duration of 1 s up to [`MAX_WINDOW_SECS`], a known zone.
    pub fn compile(spec: &WindowSpec) -> Result<Window, String> {
        let cron = Cron::from_str(&spec.schedule)
            .map_err(|e| format!("window schedule {:?}: {e}", spec.schedule))?;
        let duration = humantime::parse_duration(&spec.duration)
            .map_err(|e| format!("window duration {:?}: {e}", spec.duration))?
            .as_secs();
        if duration == 0 || duration > MAX_WINDOW_SECS {
            return Err(format!(
                "window duration {:?} must be between 1 s and 7 days",
                spec.duration
            ));
        }
        let tz = Tz::from_str(&spec.time_zone)
            .map_err(|_| format!("window time zone {:?} is not an IANA zone", spec.time_zone))?;
        Ok(Window {
            cron,
            duration,
            tz,
            spec: spec.clone(),
        })
    }

    pub fn spec(&self) -> &WindowSpec {
        &self.spec
    }

    fn at(&self, unix: u64) -> DateTime<Tz> {
        Utc.timestamp_opt(unix as i64, 0)
            .single()
            .unwrap_or_default()
            .with_timezone(&self.tz)
    }

    /// When the window that contains `now` closes, if one does.
    pub fn open_until(&self, now: u64) -> Option<u64> {
        let start = self
            .cron
            .find_previous_occurrence(&self.at(now), true)
            .ok()?;
        let start = start.timestamp().max(0) as u64;
        let end = start + self.duration;
        (now < end).then_some(end)
    }

    /// The next start strictly after `now`.
    pub fn next_start(&self, now: u64) -> Option<u64> {
        let next = self.cron.find_next_occurrence(&self.at(now), false).ok()?;
        Some(next.timestamp().max(0) as u64)
    }
}

/// A set of windows: open when any is.
#[derive(Debug, Clone, Default)]
pub struct Windows(pub Vec<Window>);

impl Windows {
    pub fn compile(specs: &[WindowSpec]) -> Result<Windows, String> {
        specs
            .iter()
            .map(Window::compile)
            .collect::<Result<_, _>>()
            .map(Windows)
    }

    /// Until when the windows are open at `now` (the latest close of those open), if any is.
    pub fn open_until(&self, now: u64) -> Option<u64> {
        self.0.iter().filter_map(|w| w.open_until(now)).max()
    }

    /// The earliest start after `now`.
    pub fn next_start(&self, now: u64) -> Option<u64> {
        self.0.iter().filter_map(|w| w.next_start(now)).min()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(schedule: &str, duration: &str, tz: &str) -> Window {
        Window::compile(&WindowSpec {
            schedule: schedule.into(),
            duration: duration.into(),
            time_zone: tz.into(),
        })
        .unwrap()
    }

    fn unix(s: &str) -> u64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp() as u64
    }

    #[test]
    fn nightly_window_is_open_only_between_its_start_and_its_end() {
        let win = w("0 2 * * *", "2h", "UTC");
        assert_eq!(win.open_until(unix("2026-11-21T01:59:59Z")), None);
        assert_eq!(
            win.open_until(unix("2026-11-21T02:00:00Z")),
            Some(unix("2026-11-21T04:00:00Z"))
        );
        assert_eq!(
            win.open_until(unix("2026-11-21T03:59:59Z")),
            Some(unix("2026-11-21T04:00:00Z"))
        );
        assert_eq!(win.open_until(unix("2026-11-21T04:00:00Z")), None);
        assert_eq!(
            win.next_start(unix("2026-11-21T04:00:00Z")),
            Some(unix("2026-11-22T02:00:00Z"))
        );
    }

    #[test]
    fn window_follows_the_wall_clock_of_its_zone_across_dst() {
        // 02:00 in Oslo is 01:00 UTC in winter and 00:00 UTC in summer.
        let win = w("0 2 * * *", "1h", "Europe/Oslo");
        assert!(win.open_until(unix("2026-01-10T01:30:00Z")).is_some());
        assert!(win.open_until(unix("2026-07-10T01:30:00Z")).is_none());
        assert!(win.open_until(unix("2026-07-10T00:30:00Z")).is_some());
    }

    #[test]
    fn window_spanning_midnight_is_open_after_midnight() {
        let win = w("0 23 * * SAT", "3h", "UTC");
        // 2026-11-21 is a Saturday.
        assert!(win.open_until(unix("2026-11-22T01:00:00Z")).is_some());
        assert!(win.open_until(unix("2026-11-23T01:00:00Z")).is_none());
    }

    #[test]
    fn bad_pattern_duration_or_zone_is_named() {
        let spec = |s: &str, d: &str, z: &str| WindowSpec {
            schedule: s.into(),
            duration: d.into(),
            time_zone: z.into(),
        };
        let e = Window::compile(&spec("0 25 * * *", "1h", "UTC")).unwrap_err();
        assert!(e.contains("schedule"), "{e}");
        let e = Window::compile(&spec("0 2 * * *", "8d", "UTC")).unwrap_err();
        assert!(e.contains("7 days"), "{e}");
        let e = Window::compile(&spec("0 2 * * *", "soon", "UTC")).unwrap_err();
        assert!(e.contains("duration"), "{e}");
        let e = Window::compile(&spec("0 2 * * *", "1h", "Mars/Olympus")).unwrap_err();
        assert!(e.contains("IANA"), "{e}");
    }

    #[test]
    fn any_open_window_opens_the_set() {
        let set = Windows(vec![
            w("0 2 * * *", "1h", "UTC"),
            w("0 14 * * *", "1h", "UTC"),
        ]);
        assert!(set.open_until(unix("2026-11-21T14:30:00Z")).is_some());
        assert!(set.open_until(unix("2026-11-21T12:00:00Z")).is_none());
        assert_eq!(
            set.next_start(unix("2026-11-21T12:00:00Z")),
            Some(unix("2026-11-21T14:00:00Z"))
        );
    }
}
