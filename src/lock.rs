//! One exclusive lock for every command that changes the device (apply, health, mark-*,
//! init-boot-env, repair, later the agent): they all read-modify-write the boot environment
//! and the state file, and two at once would lose one's change. `flock(2)` on
//! `<state_dir>/lock`, held until the command ends (the kernel drops it when the process dies,
//! so a crash never leaves it stuck). The holder writes who it is into the file, for the
//! message the next one prints.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, IoContext, Result};

/// File name of the lock in the state directory.
pub const LOCK_FILE: &str = "lock";

/// Who holds the lock (written into the lock file by the holder).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub command: String,
    /// Unix seconds.
    pub since: u64,
}

/// The held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct OpLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl OpLock {
    /// Take the lock for `command`. When it is held: fail at once, or with `wait` keep trying
    /// until it is free or `wait` has passed.
    pub fn acquire(state_dir: &Path, command: &str, wait: Option<Duration>) -> Result<OpLock> {
        std::fs::create_dir_all(state_dir)
            .ctx(|| format!("creating state directory {}", state_dir.display()))?;
        let path = state_dir.join(LOCK_FILE);
        let deadline = wait.map(|w| Instant::now() + w);
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .ctx(|| format!("opening lock {}", path.display()))?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(mut lock) => {
                    let me = Holder {
                        pid: std::process::id(),
                        command: command.to_string(),
                        since: crate::verify::unix_now().unwrap_or(0),
                    };
                    // Informational only: a failure to record it must not stop the command.
                    let _ = lock.set_len(0).and_then(|_| {
                        lock.seek(SeekFrom::Start(0))?;
                        lock.write_all(serde_json::to_string(&me).unwrap_or_default().as_bytes())
                    });
                    return Ok(OpLock { _lock: lock, path });
                }
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    if deadline.is_some_and(|d| Instant::now() < d) {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                    return Err(Error::Busy(describe_holder(&path, wait)));
                }
                Err((_, e)) => {
                    return Err(Error::io(format!("locking {}", path.display()), e.into()))
                }
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn describe_holder(path: &Path, waited: Option<Duration>) -> String {
    let mut text = String::new();
    let holder = File::open(path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .ok()
        .and_then(|_| serde_json::from_str::<Holder>(&text).ok());
    let who = match holder {
        Some(h) => format!("pid {}, `{}`, since {}", h.pid, h.command, h.since),
        None => "holder unknown".into(),
    };
    match waited {
        Some(w) => format!("{who}; waited {} s", w.as_secs()),
        None => format!("{who}; retry later or pass --wait"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_with_the_first_ones_name() {
        let dir = tempfile::tempdir().unwrap();
        let _a = OpLock::acquire(dir.path(), "apply", None).unwrap();
        let e = OpLock::acquire(dir.path(), "health", None).unwrap_err();
        let msg = e.to_string();
        assert_eq!(e.exit_code(), 23);
        assert!(
            msg.contains(&format!("pid {}, `apply`", std::process::id())),
            "{msg}"
        );
    }

    #[test]
    fn lock_is_free_again_after_drop() {
        let dir = tempfile::tempdir().unwrap();
        drop(OpLock::acquire(dir.path(), "apply", None).unwrap());
        assert!(OpLock::acquire(dir.path(), "apply", None).is_ok());
    }

    #[test]
    fn wait_gives_up_after_its_time() {
        let dir = tempfile::tempdir().unwrap();
        let _a = OpLock::acquire(dir.path(), "apply", None).unwrap();
        let t = Instant::now();
        let e = OpLock::acquire(dir.path(), "apply", Some(Duration::from_millis(300))).unwrap_err();
        assert!(t.elapsed() >= Duration::from_millis(300));
        assert!(e.to_string().contains("waited"), "{e}");
    }
}
