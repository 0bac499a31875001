//! A minimal, deterministic writer of the "newc" cpio format the kernel unpacks as initramfs.

use super::tree::{Kind, Tree};
use super::util::Result;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

fn pad4(out: &mut Vec<u8>) {
    while out.len() & 3 != 0 {
        out.push(0);
    }
}

#[allow(clippy::too_many_arguments)]
fn header(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    size: u32,
    rdev: (u32, u32),
    name: &str,
) {
    let fields = [
        ino,
        mode,
        0, // uid: root
        0, // gid: root
        nlink,
        mtime,
        size,
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0, // check (unused in newc)
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
}

/// The whole archive: entries in sorted order, inode numbers counted from 1, every timestamp
/// `mtime`, owner root.
pub fn write(tree: &Tree, mtime: u32) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for (ino, (path, node)) in (1u32..).zip(tree.entries()) {
        match &node.kind {
            Kind::Dir => header(
                &mut out,
                ino,
                S_IFDIR | node.mode,
                2,
                mtime,
                0,
                (0, 0),
                path,
            ),
            Kind::File(src) => {
                let data = src.read()?;
                let size = u32::try_from(data.len()).map_err(|_| {
                    super::util::invalid(format!("{path}: too large for a cpio archive"))
                })?;
                header(
                    &mut out,
                    ino,
                    S_IFREG | node.mode,
                    1,
                    mtime,
                    size,
                    (0, 0),
                    path,
                );
                out.extend_from_slice(&data);
                pad4(&mut out);
            }
            Kind::Symlink(t) => {
                header(
                    &mut out,
                    ino,
                    S_IFLNK | 0o777,
                    1,
                    mtime,
                    t.len() as u32,
                    (0, 0),
                    path,
                );
                out.extend_from_slice(t.as_bytes());
                pad4(&mut out);
            }
            Kind::CharDev(ma, mi) => header(
                &mut out,
                ino,
                S_IFCHR | node.mode,
                1,
                mtime,
                0,
                (*ma, *mi),
                path,
            ),
        }
    }
    header(&mut out, 0, 0, 1, 0, 0, (0, 0), "TRAILER!!!");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let mut t = Tree::new();
        t.file_bytes("init", "#!/bin/sh\n", 0o755).unwrap();
        let a = write(&t, 7).unwrap();
        assert_eq!(&a[..6], b"070701");
        // ino 1, mode 0100755
        assert_eq!(&a[6..22], b"00000001000081ED");
        // header is 110 bytes, then "init\0" padded to 116
        assert_eq!(&a[110..115], b"init\0");
        assert_eq!(&a[116..126], b"#!/bin/sh\n");
        assert_eq!(a.len() % 4, 0);
        assert!(a.windows(10).any(|w| w == b"TRAILER!!!"));
        assert_eq!(a, write(&t, 7).unwrap());
    }

    #[test]
    fn unpacks_with_gnu_cpio() {
        // Cross-check against GNU cpio when it is installed.
        let Ok(cpio) = super::super::util::tool("cpio") else {
            return;
        };
        let mut t = Tree::new();
        t.file_bytes("bin/x", "abc", 0o755).unwrap();
        t.symlink("bin/y", "x").unwrap();
        let a = write(&t, 1_700_000_000).unwrap();
        let list = super::super::util::run_with_input(
            std::process::Command::new(cpio).args(["-it", "--quiet"]),
            Some(&a),
        )
        .unwrap();
        assert_eq!(String::from_utf8(list).unwrap(), "bin\nbin/x\nbin/y\n");
    }
}
