//! Fail points for crash tests (feature `failpoints` only): the QEMU power-cut scenarios set
//! `EDGE_OTA_FAILPOINT=<name>` (or `chunks:<N>`) and the updater stops dead there, printing a
//! marker, so the test can cut the power at an exact step. Without the feature these are
//! no-ops that the compiler removes.

/// Marker printed on stderr when a fail point is reached.
pub const MARKER: &str = "edge-ota: failpoint reached:";

#[cfg(feature = "failpoints")]
fn pause(name: &str) -> ! {
    eprintln!("{MARKER} {name}");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// Stop here if `EDGE_OTA_FAILPOINT` names this step (`name`, or `name@N` for the N-th time
/// the step is reached, e.g. `boot-env-write@2` is the flip after apply's mark-bad).
#[inline]
pub fn hit(_name: &str) {
    #[cfg(feature = "failpoints")]
    {
        use std::sync::atomic::{AtomicU32, Ordering};
        static HITS: AtomicU32 = AtomicU32::new(0);
        let Ok(spec) = std::env::var("EDGE_OTA_FAILPOINT") else {
            return;
        };
        let (name, nth) = match spec.split_once('@') {
            Some((n, k)) => (n, k.parse().unwrap_or(1)),
            None => (spec.as_str(), 1),
        };
        if name == _name && HITS.fetch_add(1, Ordering::Relaxed) + 1 == nth {
            pause(_name);
        }
    }
}

/// A counter shared by the threads that write chunks, ticked once per chunk: with
/// `chunks:<N>`, every writer stops dead once N chunks were written. Without the feature it
/// holds nothing and `tick` is empty.
#[derive(Default)]
pub struct ChunkCountdown {
    #[cfg(feature = "failpoints")]
    left: Option<std::sync::atomic::AtomicU64>,
}

impl ChunkCountdown {
    pub fn from_env() -> Self {
        ChunkCountdown {
            #[cfg(feature = "failpoints")]
            left: std::env::var("EDGE_OTA_FAILPOINT")
                .ok()
                .and_then(|v| v.strip_prefix("chunks:")?.parse().ok())
                .map(std::sync::atomic::AtomicU64::new),
        }
    }

    #[inline]
    pub fn tick(&self) {
        #[cfg(feature = "failpoints")]
        if let Some(left) = &self.left {
            use std::sync::atomic::Ordering;
            // Once at zero it stays there: every later tick, on any thread, stops too.
            if left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_err()
            {
                pause("chunks");
            }
        }
    }
}
