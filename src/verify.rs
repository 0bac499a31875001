//! The device's policy for a bundle whose signatures passed (signatures themselves are checked
//! by the shared format crate): compatible string, expiry against a clock that cannot be set
//! back below what the device has already seen, and the anti-rollback floor.

use crate::bundle::Manifest;
use crate::error::{Error, Result};

/// When this updater was built (see build.rs): a clock earlier than this is wrong.
pub const BUILD_TIME: u64 = match u64::from_str_radix(env!("EDGE_OTA_BUILD_TIME"), 10) {
    Ok(t) => t,
    Err(_) => 0,
};

/// The system clock in unix seconds. A clock that cannot be read (or reads before 1970) is an
/// error, never time 0: time 0 would make every expiry check pass.
pub fn unix_now() -> Result<u64> {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|e| Error::Clock(format!("the system clock reads before 1970 ({e})")))
}

/// The time to judge expiry by: the later of the clock and the newest time this device has
/// already seen (bundle creation times, its own build). An edge device's clock is often wrong
/// (no RTC battery, no NTP yet); one set back must not make an expired bundle valid again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrustedTime {
    pub now: u64,
    /// The clock was behind what the device has seen; `now` is that bound instead.
    pub clock_behind: bool,
}

impl TrustedTime {
    pub fn new(clock: u64, newest_seen: u64) -> Self {
        // (Not `max`: a build without a recorded time has BUILD_TIME 0.)
        let floor = [newest_seen, BUILD_TIME].into_iter().max().unwrap_or(0);
        TrustedTime {
            now: clock.max(floor),
            clock_behind: clock < floor,
        }
    }
}

/// What the device requires of a verified bundle.
#[derive(Debug, Clone)]
pub struct Policy {
    pub compatible: String,
    pub time: TrustedTime,
    pub min_security_version: u64,
}

impl Policy {
    pub fn check(&self, m: &Manifest) -> Result<()> {
        if m.compatible != self.compatible {
            return Err(Error::WrongCompatible {
                bundle: m.compatible.clone(),
                device: self.compatible.clone(),
            });
        }
        if let Some(expires) = m.expires {
            if self.time.now >= expires {
                return Err(Error::Expired {
                    expires,
                    now: self.time.now,
                    clock_behind: self.time.clock_behind,
                });
            }
        }
        if m.security_version < self.min_security_version {
            return Err(Error::Downgrade {
                bundle: m.security_version,
                minimum: self.min_security_version,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_set_back_cannot_revive_an_expired_bundle() {
        let t = TrustedTime::new(1_000, 2_000_000_000);
        assert_eq!(t.now, 2_000_000_000);
        assert!(t.clock_behind);
        let t = TrustedTime::new(3_000_000_000, 2_000_000_000);
        assert_eq!(t.now, 3_000_000_000);
        assert!(!t.clock_behind);
    }

    #[test]
    fn build_time_bounds_the_clock() {
        let t = TrustedTime::new(0, 0);
        assert_eq!(t.now, BUILD_TIME);
        assert!(t.clock_behind);
        assert!(t.now > 1_600_000_000, "build.rs recorded no build time");
    }
}
