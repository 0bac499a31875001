//! The device configuration (src/config.rs): `Config::parse` (TOML, then the checks of slots,
//! trust, tries and health probes) on UTF-8 input.
#![no_main]

use std::path::Path;

use edge_ota::config::{bounds, Config};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(c) = Config::parse(text, Path::new("fuzz.toml")) else {
        return;
    };
    // What parse promises to the rest of the updater.
    assert!(c.slots.len() >= 2);
    for s in &c.slots {
        assert!(c.slot(&s.name).is_ok());
        assert!(!s.name.is_empty() && s.name.len() <= 16);
        assert!(s.device.is_some() != s.partlabel.is_some());
    }
    assert!(!c.trust.keys.is_empty() && c.trust.keys.len() <= bounds::KEYS);
    assert!(c.trust.threshold >= 1 && c.trust.threshold <= c.trust.keys.len());
    assert!(bounds::TRIES.contains(&c.tries));
    assert!(bounds::DEADLINE_SECS.contains(&c.health.deadline_secs));
    assert!(bounds::INTERVAL_MS.contains(&c.health.interval_ms));
    assert!(c.health.probes.len() <= bounds::PROBES);
    assert!(c.health.required() <= c.health.probes.len());
});
