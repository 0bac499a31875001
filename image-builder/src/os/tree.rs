//! An in-memory description of a filesystem tree, written out as a cpio archive or a directory.
//!
//! Keeping the tree in memory (sorted, with explicit modes) instead of copying files around
//! makes the content independent of the host's umask, directory order and timestamps.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::util::{invalid, walk, IoContext, Result};

/// Where a regular file's bytes come from.
#[derive(Debug, Clone)]
pub enum Source {
    Path(PathBuf),
    Bytes(Vec<u8>),
}

impl Source {
    pub fn read(&self) -> Result<Vec<u8>> {
        match self {
            Source::Path(p) => fs::read(p).ctx(|| format!("reading {}", p.display())),
            Source::Bytes(b) => Ok(b.clone()),
        }
    }
}

#[derive(Debug, Clone)]
pub enum Kind {
    Dir,
    File(Source),
    Symlink(String),
    /// Character device (major, minor): only representable in cpio archives.
    CharDev(u32, u32),
}

#[derive(Debug, Clone)]
pub struct Node {
    pub kind: Kind,
    /// Permission bits (e.g. 0o755), without the file type.
    pub mode: u32,
}

/// Paths are relative to the root, `/`-separated, without a leading slash.
#[derive(Debug, Default, Clone)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
}

fn norm(path: &str) -> Result<String> {
    let p = path.trim_start_matches('/').trim_end_matches('/');
    if p.is_empty() || p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(invalid(format!("bad path in image: {path:?}")));
    }
    Ok(p.to_string())
}

impl Tree {
    pub fn new() -> Self {
        Tree::default()
    }

    /// Add a directory and any missing parents (mode 0755).
    pub fn dir(&mut self, path: &str) -> Result<()> {
        self.dir_mode(path, 0o755)
    }

    pub fn dir_mode(&mut self, path: &str, mode: u32) -> Result<()> {
        let p = norm(path)?;
        let mut cur = String::new();
        let comps: Vec<&str> = p.split('/').collect();
        for (i, c) in comps.iter().enumerate() {
            if !cur.is_empty() {
                cur.push('/');
            }
            cur.push_str(c);
            let last = i + 1 == comps.len();
            match self.nodes.get_mut(&cur) {
                Some(Node {
                    kind: Kind::Dir,
                    mode: m,
                }) => {
                    if last {
                        *m = mode;
                    }
                }
                Some(_) => {
                    return Err(invalid(format!(
                        "{cur:?} is both a directory and a file in the image"
                    )))
                }
                None => {
                    self.nodes.insert(
                        cur.clone(),
                        Node {
                            kind: Kind::Dir,
                            mode: if last { mode } else { 0o755 },
                        },
                    );
                }
            }
        }
        Ok(())
    }

    fn put(&mut self, path: &str, node: Node) -> Result<()> {
        let p = norm(path)?;
        if let Some((parent, _)) = p.rsplit_once('/') {
            self.dir_parents(parent)?;
        }
        if let Some(Node {
            kind: Kind::Dir, ..
        }) = self.nodes.get(&p)
        {
            return Err(invalid(format!(
                "{p:?} is both a directory and a file in the image"
            )));
        }
        self.nodes.insert(p, node);
        Ok(())
    }

    /// Create missing parents without touching the mode of existing ones.
    fn dir_parents(&mut self, parent: &str) -> Result<()> {
        if matches!(
            self.nodes.get(parent),
            Some(Node {
                kind: Kind::Dir,
                ..
            })
        ) {
            return Ok(());
        }
        self.dir(parent)
    }

    pub fn file(&mut self, path: &str, src: Source, mode: u32) -> Result<()> {
        self.put(
            path,
            Node {
                kind: Kind::File(src),
                mode,
            },
        )
    }

    pub fn file_bytes(&mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) -> Result<()> {
        self.file(path, Source::Bytes(data.into()), mode)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.put(
            path,
            Node {
                kind: Kind::Symlink(target.to_string()),
                mode: 0o777,
            },
        )
    }

    pub fn chardev(&mut self, path: &str, major: u32, minor: u32, mode: u32) -> Result<()> {
        self.put(
            path,
            Node {
                kind: Kind::CharDev(major, minor),
                mode,
            },
        )
    }

    /// Copy a host file or directory tree to `dest`, keeping the executable bit of files and
    /// symlink targets; everything else gets canonical modes (0755/0644).
    pub fn add_host(&mut self, src: &Path, dest: &str) -> Result<()> {
        let md = fs::symlink_metadata(src).ctx(|| format!("reading {}", src.display()))?;
        if md.is_dir() {
            self.dir(dest)?;
            let mut rels = Vec::new();
            walk(src, Path::new(""), &mut rels)?;
            for rel in rels {
                let p = src.join(&rel);
                let rel = rel
                    .to_str()
                    .ok_or_else(|| invalid(format!("{}: path is not UTF-8", p.display())))?;
                self.add_one(&p, &format!("{}/{}", dest.trim_end_matches('/'), rel))?;
            }
            Ok(())
        } else {
            self.add_one(src, dest)
        }
    }

    fn add_one(&mut self, p: &Path, dest: &str) -> Result<()> {
        let md = fs::symlink_metadata(p).ctx(|| format!("reading {}", p.display()))?;
        let ft = md.file_type();
        if ft.is_dir() {
            self.dir(dest)
        } else if ft.is_symlink() {
            let t = fs::read_link(p).ctx(|| format!("reading link {}", p.display()))?;
            let t = t
                .to_str()
                .ok_or_else(|| invalid(format!("{}: link target is not UTF-8", p.display())))?
                .to_string();
            self.symlink(dest, &t)
        } else if ft.is_file() {
            let mode = if md.permissions().mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            };
            self.file(dest, Source::Path(p.to_path_buf()), mode)
        } else {
            Err(invalid(format!(
                "{}: only files, directories and symlinks can be added",
                p.display()
            )))
        }
    }

    /// Entries in sorted order (parents always before their children).
    pub fn entries(&self) -> impl Iterator<Item = (&String, &Node)> {
        self.nodes.iter()
    }

    /// Write the tree into an empty directory (for `mke2fs -d`).
    pub fn materialize(&self, root: &Path) -> Result<()> {
        fs::create_dir_all(root).ctx(|| format!("creating {}", root.display()))?;
        for (path, node) in &self.nodes {
            let dst = root.join(path);
            match &node.kind {
                Kind::Dir => {
                    fs::create_dir(&dst).ctx(|| format!("creating {}", dst.display()))?;
                }
                Kind::File(Source::Path(src)) => {
                    fs::copy(src, &dst)
                        .ctx(|| format!("copying {} to {}", src.display(), dst.display()))?;
                }
                Kind::File(Source::Bytes(b)) => {
                    fs::write(&dst, b).ctx(|| format!("writing {}", dst.display()))?;
                }
                Kind::Symlink(t) => {
                    std::os::unix::fs::symlink(t, &dst)
                        .ctx(|| format!("creating link {}", dst.display()))?;
                }
                Kind::CharDev(..) => {
                    return Err(invalid(format!(
                        "{path}: device nodes cannot be written to a directory without root"
                    )))
                }
            }
            if !matches!(node.kind, Kind::Symlink(_)) {
                fs::set_permissions(&dst, fs::Permissions::from_mode(node.mode))
                    .ctx(|| format!("setting mode of {}", dst.display()))?;
            }
        }
        Ok(())
    }

    /// Every path, for fix-ups after `mke2fs -d`.
    pub fn paths(&self) -> impl Iterator<Item = &String> {
        self.nodes.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_created_and_sorted_first() {
        let mut t = Tree::new();
        t.file_bytes("a/b/c", "x", 0o644).unwrap();
        t.dir_mode("a", 0o700).unwrap();
        let v: Vec<_> = t.entries().map(|(p, n)| (p.clone(), n.mode)).collect();
        assert_eq!(
            v,
            vec![
                ("a".into(), 0o700),
                ("a/b".into(), 0o755),
                ("a/b/c".into(), 0o644)
            ]
        );
        assert!(t.dir("a/b/c").is_err());
        assert!(t.file_bytes("../x", "", 0o644).is_err());
    }
}
