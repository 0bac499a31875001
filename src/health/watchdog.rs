//! Petting the hardware watchdog until the health verdict, so a hang before the verdict resets
//! the machine and the bootloader's try counter decides.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, IoContext, Result};

/// A thread writing to the watchdog device every `interval` until dropped.
pub struct Petter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    path: PathBuf,
}

impl Petter {
    /// Open the device now (a missing device is an error naming it) and start petting.
    pub fn start(path: &Path, interval: Duration) -> Result<Petter> {
        let mut dev = OpenOptions::new()
            .write(true)
            .open(path)
            .ctx(|| format!("opening watchdog {}", path.display()))?;
        dev.write_all(b"\0")
            .ctx(|| format!("petting watchdog {}", path.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    let _ = dev.write_all(b"\0");
                    std::thread::sleep(interval);
                }
                // Magic close: disarm if the driver allows it (nowayout keeps it armed, and
                // then the system's own watchdog daemon takes over).
                let _ = dev.write_all(b"V");
            })
            .map_err(|e| Error::io("starting watchdog thread", e))?;
        Ok(Petter {
            stop,
            thread: Some(thread),
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Petter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_device_missing_is_a_clear_error() {
        let e = Petter::start(
            Path::new("/nonexistent/watchdog"),
            Duration::from_millis(10),
        )
        .err()
        .unwrap();
        assert!(
            e.to_string()
                .contains("opening watchdog /nonexistent/watchdog"),
            "{e}"
        );
    }

    #[test]
    fn petting_writes_until_stopped_then_magic_close() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("wd");
        std::fs::write(&dev, b"").unwrap();
        let p = Petter::start(&dev, Duration::from_millis(5)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        drop(p);
        let bytes = std::fs::read(&dev).unwrap();
        assert!(bytes.len() >= 3, "petted {} times", bytes.len());
        assert_eq!(bytes.last(), Some(&b'V'));
    }
}
