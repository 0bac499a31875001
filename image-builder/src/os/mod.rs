//! `kernel`, `initramfs`, `rootfs` and `disk`: build the bootable test OS (BIOS GRUB A/B disk).
//!
//! Every step is reproducible (fixed epoch, GUIDs derived from a seed, sorted file lists) and
//! cached: an output is rebuilt only when the hash of its inputs, or of the output itself,
//! differs from the stamp written next to it. Layout and boot flow: docs/images.md.

mod cpio;
mod disk;
mod ext4;
mod grub;
mod initramfs;
mod kernel;
mod modules;
mod rootfs;
mod tree;
mod util;

use std::path::PathBuf;

pub use util::OsError;

// Subcommands that build the OS images, flattened into the tool's top-level commands (a doc
// comment here would replace the tool's own description in --help).
#[derive(clap::Subcommand, Debug)]
pub enum OsCommand {
    /// Download the Debian kernel package, verify it against apt's index, and extract
    /// `vmlinuz` plus the modules the test OS needs (virtio, USB storage, FAT, softdog, ...).
    Kernel {
        /// Output directory (vmlinuz, kernel.json, load-order, lib/modules/<release>/).
        #[arg(long)]
        out: PathBuf,
        /// Kernel flavour: the metapackage `linux-image-<flavour>` is resolved with apt-cache.
        /// `cloud-amd64` boots fastest under TCG but has no USB support at all; `amd64` has
        /// USB (for `-device qemu-xhci -device usb-storage`) and boots about 3.5 s slower.
        #[arg(long, default_value = "cloud-amd64")]
        flavour: String,
        /// Exact package to use instead of resolving the flavour (e.g.
        /// `linux-image-6.1.0-56-amd64`); its candidate version is used.
        #[arg(long)]
        package: Option<String>,
        /// Take the candidate from this apt suite (`apt-cache -t`), e.g. `bookworm-backports`.
        #[arg(long)]
        suite: Option<String>,
        /// Scratch directory for the .deb and its unpacked tree [default: <out>.work].
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// Rebuild even if the output is up to date.
        #[arg(long)]
        force: bool,
    },
    /// Build the initramfs (gzip newc cpio): busybox, the kernel's modules and an /init that
    /// mounts the slot named by `root=PARTLABEL=...` read-only and switches to it.
    Initramfs {
        /// Directory written by `kernel`.
        #[arg(long)]
        kernel: PathBuf,
        /// Output file (initrd.img).
        #[arg(long)]
        out: PathBuf,
        /// A statically linked busybox.
        #[arg(long, default_value = "/bin/busybox")]
        busybox: PathBuf,
        /// Rebuild even if the output is up to date.
        #[arg(long)]
        force: bool,
    },
    /// Build a slot's root filesystem: a byte-reproducible ext4 image made with `mke2fs -d`.
    Rootfs {
        /// Directory written by `kernel` (vmlinuz and modules).
        #[arg(long)]
        kernel: PathBuf,
        /// The initramfs written by `initramfs`.
        #[arg(long)]
        initramfs: PathBuf,
        /// The edge-ota binary, installed as /usr/bin/edge-ota with the libraries ldd lists.
        #[arg(long = "edge-ota")]
        edge_ota: PathBuf,
        /// Installed as /etc/edge-ota/config.toml.
        #[arg(long)]
        config: PathBuf,
        /// The OS version (VERSION_ID in /etc/os-release).
        #[arg(long)]
        version: String,
        /// Test behaviour of the slot's init.
        #[arg(long, value_enum, default_value_t = rootfs::Variant::Normal)]
        variant: rootfs::Variant,
        /// Output image file.
        #[arg(long)]
        out: PathBuf,
        /// Image size in MiB.
        #[arg(long)]
        size: u64,
        /// Extra content, `HOST_PATH=IMAGE_PATH` (a file or a directory tree); repeatable.
        #[arg(long = "add", value_name = "SRC=DEST")]
        add: Vec<String>,
        /// An executable, `HOST_PATH=IMAGE_PATH`, with the shared libraries ldd lists (at the
        /// paths the loader expects), e.g. containerd; repeatable.
        #[arg(long = "add-bin", value_name = "SRC=DEST")]
        add_bin: Vec<String>,
        /// A statically linked busybox.
        #[arg(long, default_value = "/bin/busybox")]
        busybox: PathBuf,
        /// Seed for the filesystem UUID and directory hash seed.
        #[arg(long, default_value = "edge-ota")]
        seed: String,
        /// Rebuild even if the output is up to date.
        #[arg(long)]
        force: bool,
    },
    /// Build the GPT disk: bios, boot (GRUB, grub.cfg, two grubenv copies), rootfs-A, rootfs-B, data.
    Disk {
        /// Root filesystem image for slot A.
        #[arg(long)]
        slot_a: PathBuf,
        /// Root filesystem image for slot B [default: B stays zeroed and is marked bad].
        #[arg(long)]
        slot_b: Option<PathBuf>,
        /// Output disk image.
        #[arg(long)]
        out: PathBuf,
        /// Size of each rootfs slot in MiB.
        #[arg(long, default_value_t = 256)]
        slot_size: u64,
        /// Size of the data partition in MiB.
        #[arg(long, default_value_t = 256)]
        data_size: u64,
        /// Size of the boot partition in MiB.
        #[arg(long, default_value_t = 16)]
        boot_size: u64,
        /// The A/B GRUB script [default: bootloader/grub/grub.cfg, built into the tool].
        #[arg(long)]
        grub_cfg: Option<PathBuf>,
        /// GRUB's i386-pc directory (boot.img, modules).
        #[arg(long, default_value = "/usr/lib/grub/i386-pc")]
        grub_dir: PathBuf,
        /// Seed for the disk, partition and filesystem GUIDs.
        #[arg(long, default_value = "edge-ota")]
        seed: String,
        /// Version of slot A's image, recorded as provisioned in the state file.
        #[arg(long)]
        slot_a_version: Option<String>,
        /// Security version of slot A's image: the anti-rollback floor starts there.
        #[arg(long, default_value_t = 0)]
        slot_a_security_version: u64,
        /// Rebuild even if the output is up to date.
        #[arg(long)]
        force: bool,
    },
}

/// Run one OS image subcommand.
pub fn run(cmd: OsCommand) -> Result<(), OsError> {
    match cmd {
        OsCommand::Kernel {
            out,
            flavour,
            package,
            suite,
            work_dir,
            force,
        } => kernel::build(&kernel::KernelOpts {
            work_dir: work_dir.unwrap_or_else(|| util::sibling(&out, "work")),
            out,
            flavour,
            package,
            suite,
            force,
        }),
        OsCommand::Initramfs {
            kernel,
            out,
            busybox,
            force,
        } => initramfs::build(&kernel, &busybox, &out, force),
        OsCommand::Rootfs {
            kernel,
            initramfs,
            edge_ota,
            config,
            version,
            variant,
            out,
            size,
            add,
            add_bin,
            busybox,
            seed,
            force,
        } => rootfs::build(&rootfs::RootfsOpts {
            kernel,
            initramfs,
            edge_ota,
            config,
            version,
            variant,
            out,
            size_mib: size,
            add,
            add_bin,
            busybox,
            seed,
            force,
        }),
        OsCommand::Disk {
            slot_a,
            slot_b,
            out,
            slot_size,
            data_size,
            boot_size,
            grub_cfg,
            grub_dir,
            seed,
            slot_a_version,
            slot_a_security_version,
            force,
        } => disk::build(&disk::DiskOpts {
            slot_a,
            slot_b,
            out,
            slot_mib: slot_size,
            data_mib: data_size,
            boot_mib: boot_size,
            grub_cfg,
            grub_dir,
            seed,
            force,
            slot_a_version,
            slot_a_security_version,
        }),
    }
}
