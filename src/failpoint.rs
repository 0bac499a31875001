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

/// A counter to call once per written chunk: stops after `chunks:<N>` chunks.
pub fn chunk_countdown() -> impl FnMut() {
    #[cfg(feature = "failpoints")]
    let mut left: Option<u64> = std::env::var("EDGE_OTA_FAILPOINT")
        .ok()
        .and_then(|v| v.strip_prefix("chunks:")?.parse().ok());
    move || {
        #[cfg(feature = "failpoints")]
        if let Some(n) = left.as_mut() {
            if *n == 0 {
                pause("chunks");
            }
            *n -= 1;
        }
    }
}
