//! A slot's Kubernetes container images, loaded into containerd so kubelet starts its pods
//! without pulling (an air-gapped node has nothing to pull from).
//!
//! An apply writes each `container-images` payload (an OCI or docker archive) into the slot's
//! `files_dir` under `images/`, and beside them [`INDEX_FILE`]: which archive holds which
//! images, by name and digest, as the signed manifest lists them. [`import_slot`] then runs
//! containerd's own `ctr` (so what is imported is exactly what containerd's tooling shows):
//! import each archive into the configured namespace (`k8s.io`, kubelet's), compare what
//! containerd lists with the signed digests, and pin each image
//! (`io.cri-containerd.pinned=pinned`, so kubelet's image garbage collection keeps it).
//! Importing twice is harmless: containerd stores content by digest and the name is simply
//! pointed at the same target again.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bundle::{ContainerImage, DigestOf};
use crate::config::{Config, ContainerdConfig};
use crate::error::{Error, Result};

/// In a slot's `files_dir`: the archives and the images each holds.
pub const INDEX_FILE: &str = "images.json";

/// The label kubelet's image garbage collection honours.
pub const PINNED_LABEL: &str = "io.cri-containerd.pinned";

/// One archive of a slot, and the images the signed manifest says it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Archive {
    /// Relative to the slot's `files_dir`.
    pub path: String,
    /// Empty for bundles made before manifests listed images: imported, but nothing to check.
    #[serde(default)]
    pub images: Vec<ContainerImage>,
}

/// What [`import_slot`] found in containerd after importing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Imported {
    pub name: String,
    pub digest: String,
    pub pinned: bool,
}

/// Read a slot's index; no file means the slot carries no container images.
pub fn read_index(files_dir: &Path) -> Result<Vec<Archive>> {
    let path = files_dir.join(INDEX_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::State {
            path: path.clone(),
            reason: format!("not a container image index: {e}"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
    }
}

/// Import, check and pin every container image slot `slot` carries. Nothing to do (and no
/// containerd needed) when it carries none.
pub fn import_slot(cfg: &Config, slot: &str) -> Result<Vec<Imported>> {
    let Some(files_dir) = &cfg.slot(slot)?.files_dir else {
        return Ok(Vec::new());
    };
    let archives = read_index(files_dir)?;
    if archives.is_empty() {
        return Ok(Vec::new());
    }
    let c = cfg.containerd.as_ref().ok_or_else(|| {
        Error::Images(format!(
            "slot {slot} carries container images but [containerd] is not configured"
        ))
    })?;
    check_running(c)?;
    Ctr(c).import_all(files_dir, &archives)
}

/// Whether containerd answers on its socket, checked first: `ctr` against a dead socket
/// only says that a dial timed out, after waiting for it.
fn check_running(c: &ContainerdConfig) -> Result<()> {
    std::os::unix::net::UnixStream::connect(&c.address)
        .map(drop)
        .map_err(|e| {
            Error::Images(format!(
                "containerd is not running: nothing answers on {} ({e})",
                c.address.display()
            ))
        })
}

/// containerd's `ctr`, with the configured socket and namespace.
struct Ctr<'a>(&'a ContainerdConfig);

impl Ctr<'_> {
    fn run(&self, args: &[&str], capture: bool) -> Result<Vec<u8>> {
        let mut argv = vec![
            self.0.ctr.display().to_string(),
            "--address".into(),
            self.0.address.display().to_string(),
            "--namespace".into(),
            self.0.namespace.clone(),
        ];
        argv.extend(args.iter().map(|a| a.to_string()));
        crate::process::run(&argv, Duration::from_secs(self.0.timeout_secs), capture)
            .map(|o| o.stdout)
            .map_err(|why| Error::Images(format!("ctr {}: {why}", args.join(" "))))
    }

    fn import_all(&self, files_dir: &Path, archives: &[Archive]) -> Result<Vec<Imported>> {
        for a in archives {
            let path = files_dir.join(&a.path);
            if !path.is_file() {
                return Err(Error::Images(format!(
                    "{} is listed in {} but missing",
                    path.display(),
                    INDEX_FILE
                )));
            }
            let path = path.display().to_string();
            let mut args = vec!["images", "import"];
            if let Some(s) = &self.0.snapshotter {
                args.extend(["--snapshotter", s]);
            }
            args.push(&path);
            self.run(&args, false)?;
        }
        // Check before pinning: an image that is not what was signed must not be kept.
        let listed = self.list()?;
        let mut out = Vec::new();
        for a in archives {
            for want in &a.images {
                let have = listed.iter().find(|l| l.name == want.name).ok_or_else(|| {
                    Error::Images(format!(
                        "{} did not give containerd an image named {}",
                        a.path, want.name
                    ))
                })?;
                let digest = match want.digest_of {
                    DigestOf::Manifest => have.digest.clone(),
                    DigestOf::Config => self.config_digest(&have.digest)?,
                };
                if digest != want.digest {
                    return Err(Error::Images(format!(
                        "image {} from {}: containerd has {} {digest}, the signed manifest says {}",
                        want.name,
                        a.path,
                        want.digest_of.as_str(),
                        want.digest
                    )));
                }
                self.run(
                    &[
                        "images",
                        "label",
                        &want.name,
                        &format!("{PINNED_LABEL}=pinned"),
                    ],
                    false,
                )?;
            }
        }
        for l in self.list()? {
            if archives
                .iter()
                .any(|a| a.images.iter().any(|i| i.name == l.name))
            {
                if !l.pinned {
                    return Err(Error::Images(format!("image {} is not pinned", l.name)));
                }
                out.push(l);
            }
        }
        Ok(out)
    }

    /// `ctr images ls`: name, target digest, pinned.
    fn list(&self) -> Result<Vec<Imported>> {
        let out = self.run(&["images", "ls"], true)?;
        Ok(parse_ls(&String::from_utf8_lossy(&out)))
    }

    /// The configuration digest of the manifest `digest` (docker archives: containerd writes
    /// its own manifest for them, and only the configuration comes through unchanged).
    fn config_digest(&self, manifest: &str) -> Result<String> {
        let raw = self.run(&["content", "get", manifest], true)?;
        #[derive(Deserialize)]
        struct Desc {
            digest: String,
        }
        #[derive(Deserialize)]
        struct M {
            config: Desc,
        }
        serde_json::from_slice::<M>(&raw)
            .map(|m| m.config.digest)
            .map_err(|e| {
                Error::Images(format!(
                    "manifest {manifest} in containerd has no configuration: {e}"
                ))
            })
    }
}

/// Parse `ctr images ls`: a header, then `REF TYPE DIGEST SIZE(2 words) PLATFORMS LABELS`,
/// whitespace-separated; labels are `k=v,k=v` or `-`.
fn parse_ls(text: &str) -> Vec<Imported> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let name = *cols.first()?;
            let digest = cols.iter().find(|c| c.starts_with("sha256:"))?;
            let labels = cols.last()?;
            Some(Imported {
                name: name.to_string(),
                digest: digest.to_string(),
                pinned: labels
                    .split(',')
                    .any(|kv| kv == format!("{PINNED_LABEL}=pinned")),
            })
        })
        .collect()
}

/// Write a slot's index into the directory being filled by an apply (so it is swapped in
/// with the archives it describes, never beside older ones).
pub fn index_json(archives: &[Archive]) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(archives)
        .map_err(|e| Error::Images(format!("encoding the container image index: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ls_output_is_parsed_with_labels() {
        let text = "REF                            TYPE                                    DIGEST                                                                  SIZE    PLATFORMS   LABELS\n\
registry.local/edge/hello:1    application/vnd.oci.image.manifest.v1+json sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa 1.2 KiB linux/amd64 io.cri-containerd.pinned=pinned\n\
docker.io/library/x:2          application/vnd.docker.distribution.manifest.v2+json sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb 3.0 MiB linux/amd64 -\n";
        let l = parse_ls(text);
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].name, "registry.local/edge/hello:1");
        assert!(l[0].digest.starts_with("sha256:aaaa"));
        assert!(l[0].pinned);
        assert_eq!(l[1].name, "docker.io/library/x:2");
        assert!(!l[1].pinned);
    }
}
