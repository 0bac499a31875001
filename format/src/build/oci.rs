//! Container image archives, build side: which images an archive holds (a bundle records them
//! in its signed manifest, and the device checks them after importing the archive into
//! containerd), and small, reproducible OCI archives made from a directory, so tests have real
//! images without a registry.
//!
//! Archives are read the way containerd's `ctr images import` reads them (containerd 1.6):
//! a docker archive (`docker save`: `manifest.json` with `RepoTags`) when `manifest.json` is
//! there, else an OCI image layout (`index.json`, each descriptor named by its
//! `io.containerd.image.name` annotation, else by a full reference in
//! `org.opencontainers.image.ref.name`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::{
    ConfigBuilder, Descriptor, ImageConfigurationBuilder, ImageIndex, ImageIndexBuilder,
    ImageManifestBuilder, MediaType, RootFsBuilder, ANNOTATION_REF_NAME, SCHEMA_VERSION,
};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::manifest::{ContainerImage, DigestOf};

/// The annotation containerd names an imported OCI image by (it wins over the OCI one).
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";

/// Files of an archive larger than this are hashed but not kept: index, manifests and configs
/// are a few KiB.
const KEEP_MAX: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Not an archive containerd can import with names, or inconsistent.
    #[error("{}: {reason}", archive.display())]
    Invalid { archive: PathBuf, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, ArchiveError>;

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ArchiveError {
    let context = context.into();
    move |source| ArchiveError::Io { context, source }
}

/// One regular file of an archive: its sha256, and its bytes when small.
struct Member {
    sha256: String,
    bytes: Option<Vec<u8>>,
}

/// The images an archive holds, as containerd will name them, with the digest to compare
/// after the import (the manifest's for OCI layouts, the configuration's for docker archives;
/// see [`DigestOf`]). An archive holding no named image, naming one only by a tag, or naming
/// blobs it lacks is refused: the device could not verify what it imports.
pub fn archive_images(path: &Path) -> Result<Vec<ContainerImage>> {
    let file = File::open(path).map_err(io(format!("opening {}", path.display())))?;
    archive_images_from(BufReader::new(file), path)
}

/// [`archive_images`] of a stream; `path` names it in errors.
pub fn archive_images_from(r: impl Read, path: &Path) -> Result<Vec<ContainerImage>> {
    let invalid = |reason: String| ArchiveError::Invalid {
        archive: path.to_path_buf(),
        reason,
    };
    let members = read_members(r, path)?;
    let json = |name: &str| -> Result<&[u8]> {
        members
            .get(name)
            .and_then(|m| m.bytes.as_deref())
            .ok_or_else(|| invalid(format!("{name} is missing or too large")))
    };
    let images = if members.contains_key("manifest.json") {
        docker_images(json("manifest.json")?, &members, &invalid)?
    } else if members.contains_key("index.json") {
        oci_images(json("index.json")?, &members, &invalid)?
    } else {
        return Err(invalid(
            "neither a docker archive (manifest.json) nor an OCI image layout (index.json)".into(),
        ));
    };
    if images.is_empty() {
        return Err(invalid(
            "holds no named image (containerd would import nothing it can name)".into(),
        ));
    }
    for (i, img) in images.iter().enumerate() {
        ContainerImage::check_name(&img.name).map_err(&invalid)?;
        if images[..i].iter().any(|o| o.name == img.name) {
            return Err(invalid(format!("names image {:?} twice", img.name)));
        }
    }
    Ok(images)
}

fn read_members(r: impl Read, path: &Path) -> Result<BTreeMap<String, Member>> {
    let shown = path.display().to_string();
    let mut ar = tar::Archive::new(r);
    let mut members = BTreeMap::new();
    let entries = ar
        .entries()
        .map_err(io(format!("reading {shown} as a tar archive")))?;
    for e in entries {
        let mut e = e.map_err(io(format!("reading {shown} as a tar archive")))?;
        if !e.header().entry_type().is_file() {
            continue;
        }
        let name = e
            .path()
            .map_err(io(format!("reading a member name in {shown}")))?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        let keep = e.size() <= KEEP_MAX;
        let mut hasher = Sha256::new();
        let mut kept = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = e
                .read(&mut buf)
                .map_err(io(format!("reading {name} in {shown}")))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            if keep {
                kept.extend_from_slice(&buf[..n]);
            }
        }
        members.insert(
            name,
            Member {
                sha256: hex::encode(hasher.finalize()),
                bytes: keep.then_some(kept),
            },
        );
    }
    Ok(members)
}

/// `docker save`'s manifest.json: one entry per image.
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
}

fn docker_images(
    manifest: &[u8],
    members: &BTreeMap<String, Member>,
    invalid: &dyn Fn(String) -> ArchiveError,
) -> Result<Vec<ContainerImage>> {
    let entries: Vec<DockerEntry> =
        serde_json::from_slice(manifest).map_err(|e| invalid(format!("manifest.json: {e}")))?;
    let mut out = Vec::new();
    for e in entries {
        let config = members
            .get(e.config.trim_start_matches("./"))
            .ok_or_else(|| {
                invalid(format!(
                    "manifest.json names config {:?}, which is missing",
                    e.config
                ))
            })?;
        let tags = e.repo_tags.unwrap_or_default();
        if tags.is_empty() {
            return Err(invalid(format!(
                "the image with config {} has no RepoTags: containerd would import it without a name",
                e.config
            )));
        }
        for t in tags {
            out.push(ContainerImage {
                name: normalize_docker_name(&t),
                digest: format!("sha256:{}", config.sha256),
                digest_of: DigestOf::Config,
            });
        }
    }
    Ok(out)
}

fn oci_images(
    index: &[u8],
    members: &BTreeMap<String, Member>,
    invalid: &dyn Fn(String) -> ArchiveError,
) -> Result<Vec<ContainerImage>> {
    let index = ImageIndex::from_reader(index).map_err(|e| invalid(format!("index.json: {e}")))?;
    let mut out = Vec::new();
    for d in index.manifests() {
        let ann = d.annotations().clone().unwrap_or_default();
        let name = match (
            ann.get(ANNOTATION_CONTAINERD_NAME),
            ann.get(ANNOTATION_REF_NAME),
        ) {
            (Some(n), _) => n.clone(),
            // containerd takes a ref name only when it is a whole reference; a bare tag gets
            // an invented `import-<date>` name that nothing could expect.
            (None, Some(r)) if r.contains(['/', ':', '@']) => r.clone(),
            (None, Some(r)) => {
                return Err(invalid(format!(
                    "index.json names an image only by the tag {r:?}: give its full name in {ANNOTATION_CONTAINERD_NAME}"
                )))
            }
            (None, None) => continue,
        };
        let hex = d.as_digest_sha256().ok_or_else(|| {
            invalid(format!(
                "image {name:?}: digest {} is not sha256",
                d.digest()
            ))
        })?;
        match members.get(&format!("blobs/sha256/{hex}")) {
            Some(m) if m.sha256 == hex => {}
            Some(_) => {
                return Err(invalid(format!(
                    "image {name:?}: blob sha256:{hex} does not hash to its name"
                )))
            }
            None => {
                return Err(invalid(format!(
                    "image {name:?}: blob sha256:{hex} is not in the archive"
                )))
            }
        }
        out.push(ContainerImage {
            name,
            digest: format!("sha256:{hex}"),
            digest_of: DigestOf::Manifest,
        });
    }
    Ok(out)
}

/// A docker tag as containerd stores it (`ParseDockerRef`): `hello:1` is
/// `docker.io/library/hello:1`, `org/app` is `docker.io/org/app:latest`; a first component
/// with a dot or a port, or `localhost`, is a registry and stays.
pub fn normalize_docker_name(tag: &str) -> String {
    let (domain, rest) = match tag.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
            (first.to_string(), rest.to_string())
        }
        Some(_) => ("docker.io".to_string(), tag.to_string()),
        None => ("docker.io".to_string(), format!("library/{tag}")),
    };
    let last = rest.rsplit('/').next().unwrap_or_default();
    let tagged = last.contains(':') || rest.contains('@');
    format!("{domain}/{rest}{}", if tagged { "" } else { ":latest" })
}

/// The GOARCH name of the machine this runs on (what an image for it declares).
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// A one-layer OCI image made from a directory.
#[derive(Debug, Clone)]
pub struct OciArchiveSpec {
    /// Its content: the layer is this tree (owner root, modes 0755/0644, times `mtime`).
    pub from: PathBuf,
    /// Full reference, e.g. `registry.local/edge/hello:1`.
    pub name: String,
    /// GOARCH (`amd64`, `arm64`): containerd imports only images for its own platform.
    pub architecture: String,
    /// What a container runs by default (the configuration's `Entrypoint`); may be empty.
    pub entrypoint: Vec<String>,
    /// Modification time of every member, unix seconds.
    pub mtime: u64,
}

/// Write a reproducible OCI image-layout archive of `spec` to `out` (same inputs, same bytes:
/// sorted members, fixed owners, modes and times, JSON with sorted keys, no creation time) and
/// return the image as a bundle records it.
pub fn write_oci_archive(spec: &OciArchiveSpec, out: &mut dyn Write) -> Result<ContainerImage> {
    let invalid = |reason: String| ArchiveError::Invalid {
        archive: spec.from.clone(),
        reason,
    };
    ContainerImage::check_name(&spec.name).map_err(invalid)?;
    let spec_err = |e: oci_spec::OciSpecError| invalid(e.to_string());

    let layer = layer_tar(&spec.from, spec.mtime)?;
    let layer_digest = sha256(&layer);
    let mut config = ConfigBuilder::default().env(vec![
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
    ]);
    if !spec.entrypoint.is_empty() {
        config = config.entrypoint(spec.entrypoint.clone());
    }
    let config = ImageConfigurationBuilder::default()
        .architecture(spec.architecture.as_str())
        .os("linux")
        .config(config.build().map_err(spec_err)?)
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![layer_digest.clone()])
                .build()
                .map_err(spec_err)?,
        )
        .build()
        .map_err(spec_err)?;
    let config = canonical_json(&config);
    let manifest = ImageManifestBuilder::default()
        .schema_version(SCHEMA_VERSION)
        .media_type(MediaType::ImageManifest)
        .config(descriptor(MediaType::ImageConfig, &config)?)
        .layers(vec![descriptor(MediaType::ImageLayer, &layer)?])
        .build()
        .map_err(spec_err)?;
    let manifest = canonical_json(&manifest);
    let mut named = descriptor(MediaType::ImageManifest, &manifest)?;
    let mut ann = std::collections::HashMap::new();
    ann.insert(ANNOTATION_CONTAINERD_NAME.to_string(), spec.name.clone());
    // The tag alone, as containerd's own export writes it, for tools that read only this one.
    let last = spec.name.rsplit('/').next().unwrap_or_default();
    if let Some((_, tag)) = last.split_once(':') {
        ann.insert(ANNOTATION_REF_NAME.to_string(), tag.to_string());
    }
    named.set_annotations(Some(ann));
    let index = ImageIndexBuilder::default()
        .schema_version(SCHEMA_VERSION)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![named])
        .build()
        .map_err(spec_err)?;
    let index = canonical_json(&index);

    let mut blobs: Vec<(String, &[u8])> = [&layer[..], &config[..], &manifest[..]]
        .into_iter()
        .map(|b| (sha256(b), b))
        .collect();
    blobs.sort();
    blobs.dedup_by(|a, b| a.0 == b.0);
    let mut tar = tar::Builder::new(out);
    let w = |e: std::io::Error| ArchiveError::Io {
        context: format!("writing the archive of {}", spec.name),
        source: e,
    };
    append_file(
        &mut tar,
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
        0o644,
        spec.mtime,
    )
    .map_err(w)?;
    append_file(&mut tar, "index.json", &index, 0o644, spec.mtime).map_err(w)?;
    append_dir(&mut tar, "blobs/", spec.mtime).map_err(w)?;
    append_dir(&mut tar, "blobs/sha256/", spec.mtime).map_err(w)?;
    for (digest, bytes) in blobs {
        let hex = digest.trim_start_matches("sha256:");
        append_file(
            &mut tar,
            &format!("blobs/sha256/{hex}"),
            bytes,
            0o644,
            spec.mtime,
        )
        .map_err(w)?;
    }
    tar.into_inner().map_err(w)?.flush().map_err(w)?;
    Ok(ContainerImage {
        name: spec.name.clone(),
        digest: sha256(&manifest),
        digest_of: DigestOf::Manifest,
    })
}

/// [`write_oci_archive`] into a new file at `path` (replaced; not made durable).
pub fn write_oci_archive_file(spec: &OciArchiveSpec, path: &Path) -> Result<ContainerImage> {
    let mut f = std::io::BufWriter::new(
        File::create(path).map_err(io(format!("creating {}", path.display())))?,
    );
    let img = write_oci_archive(spec, &mut f)?;
    f.flush()
        .map_err(io(format!("writing {}", path.display())))?;
    Ok(img)
}

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn descriptor(media_type: MediaType, bytes: &[u8]) -> Result<Descriptor> {
    let digest = sha256(bytes);
    let d =
        oci_spec::image::Digest::try_from(digest.as_str()).map_err(|e| ArchiveError::Invalid {
            archive: PathBuf::new(),
            reason: e.to_string(),
        })?;
    Ok(Descriptor::new(media_type, bytes.len() as u64, d))
}

/// JSON with every object's keys sorted: oci-spec keeps annotations in a `HashMap`, whose
/// order changes from run to run, and a digest covers the exact bytes.
fn canonical_json<T: Serialize>(v: &T) -> Vec<u8> {
    use serde_json::Value;
    fn sorted(v: Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut entries: Vec<(String, Value)> = m.into_iter().collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
            }
            Value::Array(a) => Value::Array(a.into_iter().map(sorted).collect()),
            other => other,
        }
    }
    serde_json::to_vec(&sorted(
        serde_json::to_value(v).expect("OCI types serialize"),
    ))
    .expect("JSON serializes")
}

fn header(kind: tar::EntryType, mode: u32, size: u64, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(mtime);
    h.set_size(size);
    h
}

fn append_file<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    data: &[u8],
    mode: u32,
    mtime: u64,
) -> std::io::Result<()> {
    let mut h = header(tar::EntryType::Regular, mode, data.len() as u64, mtime);
    tar.append_data(&mut h, path, data)
}

fn append_dir<W: Write>(tar: &mut tar::Builder<W>, path: &str, mtime: u64) -> std::io::Result<()> {
    let mut h = header(tar::EntryType::Directory, 0o755, 0, mtime);
    tar.append_data(&mut h, path, std::io::empty())
}

/// The layer: `root`'s tree in path order, directories and executables 0755, other files
/// 0644, symlinks as they are, owner root; anything else (devices, sockets) is refused.
fn layer_tar(root: &Path, mtime: u64) -> Result<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt;
    let mut paths = Vec::new();
    walk(root, Path::new(""), &mut paths)?;
    paths.sort();
    let mut tar = tar::Builder::new(Vec::new());
    for rel in paths {
        let full = root.join(&rel);
        let w = io(format!("adding {} to the layer", full.display()));
        let meta =
            std::fs::symlink_metadata(&full).map_err(io(format!("reading {}", full.display())))?;
        let name = rel.to_string_lossy().to_string();
        if meta.is_dir() {
            append_dir(&mut tar, &format!("{name}/"), mtime).map_err(w)?;
        } else if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&full)
                .map_err(io(format!("reading link {}", full.display())))?;
            let mut h = header(tar::EntryType::Symlink, 0o777, 0, mtime);
            tar.append_link(&mut h, &name, &target).map_err(w)?;
        } else if meta.is_file() {
            let mode = if meta.permissions().mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            };
            let data = std::fs::read(&full).map_err(io(format!("reading {}", full.display())))?;
            append_file(&mut tar, &name, &data, mode, mtime).map_err(w)?;
        } else {
            return Err(ArchiveError::Invalid {
                archive: root.to_path_buf(),
                reason: format!("{} is not a file, directory or symlink", full.display()),
            });
        }
    }
    tar.into_inner()
        .map_err(io(format!("finishing the layer of {}", root.display())))
}

fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let dir = root.join(rel);
    let rd = std::fs::read_dir(&dir).map_err(io(format!("reading {}", dir.display())))?;
    for e in rd {
        let e = e.map_err(io(format!("reading {}", dir.display())))?;
        let r = rel.join(e.file_name());
        let is_dir = e
            .file_type()
            .map_err(io(format!("reading {}", e.path().display())))?
            .is_dir();
        out.push(r.clone());
        if is_dir {
            walk(root, &r, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("bin")).unwrap();
        std::fs::write(d.path().join("bin/hello"), b"#!/bin/sh\necho hello\n").unwrap();
        std::fs::set_permissions(
            d.path().join("bin/hello"),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        std::fs::write(d.path().join("motd"), b"hi\n").unwrap();
        std::os::unix::fs::symlink("motd", d.path().join("greeting")).unwrap();
        d
    }

    fn spec(from: &Path, name: &str) -> OciArchiveSpec {
        OciArchiveSpec {
            from: from.to_path_buf(),
            name: name.into(),
            architecture: "amd64".into(),
            entrypoint: vec!["/bin/hello".into()],
            mtime: 1_700_000_000,
        }
    }

    #[test]
    fn oci_archive_is_reproducible_and_reads_back_with_its_manifest_digest() {
        let d = tree();
        let s = spec(d.path(), "registry.local/edge/hello:1");
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let img = write_oci_archive(&s, &mut a).unwrap();
        // A second tree with other permission bits and times gives the same bytes.
        let d2 = tree();
        std::fs::set_permissions(
            d2.path().join("motd"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        assert_eq!(
            write_oci_archive(&spec(d2.path(), &s.name), &mut b).unwrap(),
            img
        );
        assert_eq!(a, b, "same inputs, different bytes");
        assert_eq!(img.digest_of, DigestOf::Manifest);
        let read = archive_images_from(&a[..], Path::new("a.tar")).unwrap();
        assert_eq!(read, vec![img]);
    }

    #[test]
    fn archive_naming_an_image_only_by_tag_is_refused() {
        let d = tree();
        let mut a = Vec::new();
        write_oci_archive(&spec(d.path(), "registry.local/edge/hello:1"), &mut a).unwrap();
        // Drop the containerd annotation: only the tag "1" remains.
        // Bytes, not text: the layer blobs are not UTF-8.
        let (from, to) = (
            ANNOTATION_CONTAINERD_NAME.as_bytes(),
            b"io.example.other.annot.x".as_slice(),
        );
        assert_eq!(from.len(), to.len());
        let mut patched = a.clone();
        let mut hits = 0;
        for i in 0..=patched.len() - from.len() {
            if &patched[i..i + from.len()] == from {
                patched[i..i + from.len()].copy_from_slice(to);
                hits += 1;
            }
        }
        assert!(hits > 0);
        let e = archive_images_from(&patched[..], Path::new("a.tar")).unwrap_err();
        assert!(e.to_string().contains("only by the tag \"1\""), "{e}");
    }

    #[test]
    fn archive_missing_its_manifest_blob_is_refused() {
        let mut tar = tar::Builder::new(Vec::new());
        let index = br#"{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":3,"annotations":{"io.containerd.image.name":"r.local/x:1"}}]}"#;
        append_file(&mut tar, "index.json", index, 0o644, 0).unwrap();
        let a = tar.into_inner().unwrap();
        let e = archive_images_from(&a[..], Path::new("a.tar")).unwrap_err();
        assert!(e.to_string().contains("is not in the archive"), "{e}");
    }

    #[test]
    fn docker_archive_records_config_digest_under_containerd_names() {
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let mut tar = tar::Builder::new(Vec::new());
        let manifest = br#"[{"Config":"cfg.json","RepoTags":["hello:5","other/z","example.com:5000/x/y:6"],"Layers":[]}]"#;
        append_file(&mut tar, "manifest.json", manifest, 0o644, 0).unwrap();
        append_file(&mut tar, "cfg.json", config, 0o644, 0).unwrap();
        let a = tar.into_inner().unwrap();
        let imgs = archive_images_from(&a[..], Path::new("d.tar")).unwrap();
        let names: Vec<_> = imgs.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "docker.io/library/hello:5",
                "docker.io/other/z:latest",
                "example.com:5000/x/y:6"
            ]
        );
        assert!(imgs
            .iter()
            .all(|i| i.digest_of == DigestOf::Config && i.digest == sha256(config)));
    }

    #[test]
    fn tar_that_is_no_image_archive_is_refused() {
        let mut tar = tar::Builder::new(Vec::new());
        append_file(&mut tar, "random.bin", b"x", 0o644, 0).unwrap();
        let a = tar.into_inner().unwrap();
        let e = archive_images_from(&a[..], Path::new("r.tar")).unwrap_err();
        assert!(e.to_string().contains("neither a docker archive"), "{e}");
    }
}
