//! Running another program with a time limit: health probe commands, the agent's reboot
//! hooks, containerd's `ctr`. One implementation, so every caller kills a hung child and
//! names the command in its error the same way.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a finished command printed.
pub struct Output {
    pub stdout: Vec<u8>,
}

/// How much of a failing command's stderr goes into the error (its last line is what
/// usually says why).
const STDERR_KEEP: usize = 4096;

/// Run `argv` with `limit`: stdin empty; stdout captured when `capture` (else discarded);
/// stderr captured and its last line quoted when the command fails. A child still running
/// at the limit is killed. The error is one line naming the program.
pub fn run(argv: &[String], limit: Duration, capture: bool) -> Result<Output, String> {
    let (prog, args) = argv.split_first().ok_or("empty command")?;
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(if capture {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {prog}: {e}"))?;
    // Readers on threads: a child filling a pipe nobody drains would never exit.
    let drain = |r: Option<Box<dyn Read + Send>>, keep: usize| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let mut chunk = [0u8; 8192];
                while let Ok(n) = r.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.len() > keep {
                        buf.drain(..buf.len() - keep);
                    }
                }
            }
            buf
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
        usize::MAX,
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
        STDERR_KEEP,
    );
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() >= limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{prog} timed out after {}s; killed",
                    limit.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for {prog}: {e}")),
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    if status.success() {
        return Ok(Output { stdout });
    }
    let why = String::from_utf8_lossy(&stderr);
    match why.lines().rev().find(|l| !l.trim().is_empty()) {
        Some(line) => Err(format!("{prog} exited with {status}: {}", line.trim())),
        None => Err(format!("{prog} exited with {status}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn output_is_captured_and_failure_quotes_the_last_stderr_line() {
        let o = run(
            &argv(&["sh", "-c", "echo hello"]),
            Duration::from_secs(10),
            true,
        )
        .unwrap();
        assert_eq!(o.stdout, b"hello\n");
        let e = run(
            &argv(&["sh", "-c", "echo one >&2; echo two >&2; exit 3"]),
            Duration::from_secs(10),
            false,
        )
        .err()
        .unwrap();
        assert!(e.contains("exit status: 3") && e.ends_with(": two"), "{e}");
    }

    #[test]
    fn hung_command_is_killed_at_the_limit() {
        let t = Instant::now();
        let e = run(&argv(&["sleep", "30"]), Duration::from_millis(300), false)
            .err()
            .unwrap();
        assert!(e.contains("killed"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn large_output_does_not_deadlock() {
        let o = run(
            &argv(&["sh", "-c", "head -c 1000000 /dev/zero"]),
            Duration::from_secs(20),
            true,
        )
        .unwrap();
        assert_eq!(o.stdout.len(), 1_000_000);
    }
}
