//! One QEMU virtual machine driven over its serial console: wait for markers, run shell
//! commands and read their exit codes, cut the power.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Serial output so far, shared with the reader thread.
#[derive(Default)]
struct Console {
    text: Mutex<String>,
    grew: Condvar,
}

pub struct Vm {
    name: String,
    child: Child,
    stdin: ChildStdin,
    console: Arc<Console>,
    /// Output before this byte has been consumed by earlier waits.
    cursor: usize,
    commands: u32,
    pub log: PathBuf,
    qmp: Option<PathBuf>,
}

/// How to start a VM.
pub struct VmConfig<'a> {
    pub name: &'a str,
    pub disk: &'a Path,
    /// A raw image attached as a USB stick.
    pub usb: Option<&'a Path>,
    /// A virtio NIC on QEMU's user network: the guest reaches the host's 127.0.0.1 as
    /// 10.0.2.2.
    pub net: bool,
    /// A virtio NIC on this existing tap device (a LAN the test builds), with no DHCP.
    pub tap: Option<&'a str>,
    pub log_dir: &'a Path,
    /// Record every write, discard and flush the guest makes to `disk` in this file (QEMU's
    /// `blklogwrites` driver, Linux dm-log-writes format; `qemu_tests::blklog` reads it). The
    /// file is created or emptied at start. `None`: the plain `cache=writeback` disk.
    pub disk_log: Option<&'a Path>,
    /// A USB (xHCI) controller even without a stick, so one can be plugged in later.
    pub usb_controller: bool,
    /// QEMU's machine protocol on this Unix socket ([`Qmp`]): hot-plugging devices.
    pub qmp: Option<&'a Path>,
}

impl Default for VmConfig<'_> {
    fn default() -> Self {
        VmConfig {
            name: "vm",
            disk: Path::new(""),
            usb: None,
            net: false,
            tap: None,
            log_dir: Path::new(""),
            disk_log: None,
            usb_controller: false,
            qmp: None,
        }
    }
}

/// A path as one value of a QEMU option list (commas doubled).
fn qemu_opt_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

impl Vm {
    pub fn start(cfg: &VmConfig) -> Vm {
        let mut cmd = Command::new("qemu-system-x86_64");
        // TCG only: the nested KVM here is unusable (see shared HOST-NOTES). A machine with a
        // real KVM may opt in with EDGE_OTA_QEMU_ACCEL=kvm.
        let accel = std::env::var("EDGE_OTA_QEMU_ACCEL").unwrap_or_else(|_| "tcg".into());
        cmd.args(["-accel", &accel, "-cpu", "max", "-m", "512", "-smp", "1"])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-serial",
                "stdio",
            ]);
        match cfg.disk_log {
            None => {
                cmd.arg("-drive").arg(format!(
                    "file={},if=virtio,format=raw,cache=writeback",
                    qemu_opt_path(cfg.disk)
                ));
            }
            Some(log) => {
                // log-append=off writes the log from its start: an emptied file leaves no stale
                // entries behind the new ones for a reader to mistake.
                std::fs::File::create(log)
                    .unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
                cmd.arg("-blockdev")
                    .arg(format!(
                        "driver=file,filename={},node-name=edgebase",
                        qemu_opt_path(cfg.disk)
                    ))
                    .arg("-blockdev")
                    .arg(format!(
                        "driver=file,filename={},node-name=edgelog",
                        qemu_opt_path(log)
                    ))
                    .arg("-blockdev")
                    .arg(
                        "driver=blklogwrites,file=edgebase,log=edgelog,log-append=off,\
                         node-name=edgelogged",
                    )
                    // No merging of adjacent guest requests: a merged request can carry
                    // IOV_MAX (1024) buffers, blklogwrites adds its entry header as one more,
                    // and the log write then fails, which the guest sees as an I/O error
                    // (seen here on 2 MiB merged writes). Merging only batches requests on
                    // the host; what the guest writes and flushes is unchanged.
                    .args([
                        "-device",
                        "virtio-blk-pci,drive=edgelogged,request-merging=off",
                    ]);
            }
        }
        if cfg.net {
            cmd.args(["-nic", "user,model=virtio-net-pci"]);
        }
        if let Some(tap) = cfg.tap {
            cmd.arg("-nic").arg(format!(
                "tap,ifname={tap},script=no,downscript=no,model=virtio-net-pci"
            ));
        }
        if cfg.usb.is_some() || cfg.usb_controller {
            cmd.args(["-device", "qemu-xhci,id=xhci"]);
        }
        if let Some(qmp) = cfg.qmp {
            let _ = std::fs::remove_file(qmp);
            cmd.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", qemu_opt_path(qmp)));
        }
        if let Some(usb) = cfg.usb {
            cmd.arg("-drive")
                .arg(format!(
                    "if=none,id=usbstick,format=raw,file={}",
                    usb.display()
                ))
                .args(["-device", "usb-storage,bus=xhci.0,drive=usbstick"]);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("starting qemu-system-x86_64");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let console = Arc::new(Console::default());
        std::fs::create_dir_all(cfg.log_dir).unwrap();
        let log = cfg.log_dir.join(format!("{}.serial.log", cfg.name));
        let mut log_file = std::fs::File::create(&log).unwrap();
        let echo = std::env::var_os("EDGE_OTA_QEMU_ECHO").is_some();
        let c = console.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut shown = Shown::default();
            loop {
                let n = match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let _ = log_file.write_all(&buf[..n]);
                if echo {
                    let _ = std::io::stderr().write_all(shown.feed(&buf[..n]).as_bytes());
                }
                c.text
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
                c.grew.notify_all();
            }
            c.grew.notify_all();
        });
        Vm {
            name: cfg.name.to_string(),
            child,
            stdin,
            console,
            cursor: 0,
            commands: 0,
            log,
            qmp: cfg.qmp.map(Path::to_path_buf),
        }
    }

    /// Wait until `pattern` appears after the cursor; move the cursor past it. Returns the
    /// output from the old cursor to the end of the match.
    pub fn wait_for(&mut self, pattern: &str, timeout: Duration) -> String {
        match self.wait_any(&[pattern], timeout) {
            Ok((_, text)) => text,
            Err(tail) => panic!(
                "{}: {pattern:?} not seen within {timeout:?}; last output:\n{tail}\n(full log {})",
                self.name,
                self.log.display()
            ),
        }
    }

    /// Wait for whichever of `patterns` comes first: (index, text up to its end), or the
    /// output tail on timeout or VM exit.
    pub fn wait_any(
        &mut self,
        patterns: &[&str],
        timeout: Duration,
    ) -> Result<(usize, String), String> {
        let deadline = Instant::now() + timeout;
        let mut text = self.console.text.lock().unwrap();
        loop {
            let hay = &text[self.cursor..];
            let hit = patterns
                .iter()
                .enumerate()
                .filter_map(|(i, p)| hay.find(p).map(|at| (at, i, p.len())))
                .min();
            if let Some((at, i, len)) = hit {
                let out = hay[..at + len].to_string();
                self.cursor += at + len;
                return Ok((i, out));
            }
            let now = Instant::now();
            let exited = matches!(self.child.try_wait(), Ok(Some(_)));
            if now >= deadline || exited {
                let tail: String = {
                    let t = &text[self.cursor..];
                    t[t.len().saturating_sub(3000)..].to_string()
                };
                return Err(tail);
            }
            text = self
                .console
                .grew
                .wait_timeout(text, (deadline - now).min(Duration::from_millis(500)))
                .unwrap()
                .0;
        }
    }

    /// Type a line on the console.
    pub fn send(&mut self, line: &str) {
        self.stdin.write_all(line.as_bytes()).unwrap();
        self.stdin.write_all(b"\n").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Run a shell command in the guest; returns (exit code, its output).
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> (i32, String) {
        self.commands += 1;
        let n = self.commands;
        // The terminal echoes the command line; the quotes split the marker there, so only
        // the shell's output of it can match.
        self.send(&format!("{cmd}; echo \"@@\"\"rc-{n}=$?@@\""));
        let start = format!("@@rc-{n}=");
        let out = self.wait_for(&start, timeout);
        let rest = self.wait_for("@@", Duration::from_secs(10));
        let code = rest
            .trim_end_matches("@@")
            .trim()
            .parse()
            .unwrap_or_else(|_| {
                panic!("{}: exit status of `{cmd}` unreadable: {rest:?}", self.name)
            });
        // Drop the echoed command line (and the terminal's carriage returns) from the output.
        let echo = format!("\"@@\"\"rc-{n}=");
        let body = out
            .trim_end_matches(start.as_str())
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .filter(|l| !l.contains(&echo) && !l.is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        (code, body)
    }

    /// Run and require success.
    pub fn ok(&mut self, cmd: &str, timeout: Duration) -> String {
        let (code, out) = self.run(cmd, timeout);
        assert_eq!(code, 0, "{}: `{cmd}` exited {code}:\n{out}", self.name);
        out
    }

    /// The guest's `edge-ota --json status`.
    pub fn status(&mut self) -> serde_json::Value {
        let out = self.ok("edge-ota --json status", Duration::from_secs(60));
        let json = &out[out.find('{').expect("status JSON")..=out.rfind('}').expect("status JSON")];
        serde_json::from_str(json).unwrap_or_else(|e| panic!("status JSON: {e}:\n{out}"))
    }

    /// Orderly power-off from the guest shell (filesystems unmounted and synced), then stop
    /// QEMU: what the host reads from the disk afterwards is what the guest wrote.
    pub fn shutdown(mut self, timeout: Duration) {
        self.send("poweroff");
        self.wait_for("reboot: Power down", timeout);
        self.power_cut();
    }

    /// Cut the power: kill QEMU hard, no guest shutdown.
    pub fn power_cut(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Plug a raw disk image in as a USB stick named `id`, as a person would with the machine
    /// running (QMP `blockdev-add`, then `device_add usb-storage` on the xHCI bus). Needs
    /// `qmp` and `usb_controller` in the [`VmConfig`].
    pub fn plug_usb_stick(&mut self, id: &str, image: &Path) {
        let path = self
            .qmp
            .as_deref()
            .expect("plug_usb_stick needs VmConfig::qmp");
        let mut qmp = Qmp::connect(path, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{}: QMP: {e}", self.name));
        let node = format!("{id}-node");
        let steps = [
            (
                "blockdev-add",
                serde_json::json!({
                    "node-name": node,
                    "driver": "raw",
                    "file": {"driver": "file", "filename": image.display().to_string()},
                }),
            ),
            (
                "device_add",
                serde_json::json!({
                    "driver": "usb-storage", "id": id, "bus": "xhci.0", "drive": node,
                }),
            ),
        ];
        for (command, args) in steps {
            qmp.execute(command, args)
                .unwrap_or_else(|e| panic!("{}: QMP {command}: {e}", self.name));
        }
    }

    /// Output seen so far (whole console).
    pub fn output(&self) -> String {
        self.console.text.lock().unwrap().clone()
    }
}

/// A client of QEMU's machine protocol (QMP): JSON objects, one per line, over a Unix
/// socket. A few lines of serde_json do; the protocol needs no more than the greeting, the
/// capabilities handshake and `execute`, with asynchronous events skipped.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connect (QEMU creates the socket as it starts: wait for it up to `timeout`) and leave
    /// capabilities negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("connecting to {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("no QMP greeting: {greeting}"));
        }
        qmp.execute("qmp_capabilities", serde_json::json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<serde_json::Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QEMU closed the QMP socket".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("{e}: {line:?}")),
            Err(e) => Err(format!("reading QMP: {e}")),
        }
    }

    /// Run `command` with `arguments`; its `return` value, or QEMU's error as text.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let req = serde_json::json!({ "execute": command, "arguments": arguments });
        self.writer
            .write_all(format!("{req}\n").as_bytes())
            .map_err(|e| format!("writing QMP: {e}"))?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("{command}: {e}"));
            }
            // An event ({"event": ...}): not the answer.
        }
    }
}

/// What the echoed console shows a person: the harness's own protocol (the `; echo "@@"...`
/// it appends to each command, and the `@@rc-N=...@@` line that answers it) is left out.
/// Partial lines are shown at once unless they might still become protocol.
#[derive(Default)]
struct Shown {
    partial: String,
}

impl Shown {
    fn feed(&mut self, bytes: &[u8]) -> String {
        self.partial.push_str(&String::from_utf8_lossy(bytes));
        let mut out = String::new();
        while let Some(nl) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=nl).collect();
            out.push_str(&Self::filter(&line));
        }
        if !self.partial.contains([';', '@']) {
            out.push_str(&std::mem::take(&mut self.partial));
        }
        out
    }

    fn filter(line: &str) -> String {
        if line.trim_start().starts_with("@@rc-") {
            return String::new();
        }
        match line.find("; echo \"@@\"\"rc-") {
            Some(at) => {
                let ending = &line[line.trim_end_matches(['\r', '\n']).len()..];
                format!("{}{ending}", &line[..at])
            }
            None => line.to_string(),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::Shown;

    #[test]
    fn console_shown_to_a_person_has_no_harness_protocol() {
        let mut s = Shown::default();
        let mut out = s.feed(b"edge# edge-ota status; echo \"@@\"");
        out += &s.feed(b"\"rc-3=$?@@\"\r\nbooted: A\r\n@@rc-3=0@@\r\nedge# ");
        assert_eq!(out, "edge# edge-ota status\r\nbooted: A\r\nedge# ");
    }
}
