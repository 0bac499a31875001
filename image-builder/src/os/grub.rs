//! GRUB for BIOS without grub-install: build core.img, patch boot.img and core.img's block list
//! for their place on the disk (what grub-bios-setup would do), and write grubenv.

use std::fs;
use std::path::Path;

use super::util::{command, invalid, run, tool, IoContext, Result};

/// The A/B script installed as /grub/grub.cfg on the boot partition.
pub const GRUB_CFG: &str = include_str!("../../../bootloader/grub/grub.cfg");

/// Modules built into core.img: everything the early config and grub.cfg use, so booting
/// never depends on loading modules from disk (the boot partition carries them anyway).
pub const CORE_MODULES: &[&str] = &[
    "biosdisk",
    "part_gpt",
    "part_msdos",
    "ext2",
    "search",
    "search_fs_uuid",
    "configfile",
    "normal",
    "serial",
    "terminal",
    "loadenv",
    "test",
    "true",
    "echo",
    "regexp",
    "linux",
    "boot",
    "reboot",
    "halt",
    "sleep",
    "minicmd",
    "ls",
    "cat",
];

/// Embedded config: serial console, find the boot partition by filesystem UUID; GRUB then
/// enters normal mode and runs $prefix/grub.cfg. Runs in GRUB's rescue parser: simple
/// commands only. Output goes to the serial port only: SeaBIOS already mirrors the BIOS
/// console there, and both together interleave every line twice.
pub fn early_config(boot_fs_uuid: &str) -> String {
    format!(
        "serial --unit=0 --speed=115200\n\
         terminal_input serial console\n\
         terminal_output serial\n\
         search --no-floppy --fs-uuid --set=root {boot_fs_uuid}\n\
         set prefix=($root)/grub\n"
    )
}

/// Run grub-mkimage for i386-pc with the early config; returns core.img.
pub fn build_core(grub_dir: &Path, boot_fs_uuid: &str, scratch: &Path) -> Result<Vec<u8>> {
    fs::create_dir_all(scratch).ctx(|| format!("creating {}", scratch.display()))?;
    let cfg = scratch.join("early.cfg");
    fs::write(&cfg, early_config(boot_fs_uuid)).ctx(|| format!("writing {}", cfg.display()))?;
    let core = scratch.join("core.img");
    run(command(tool("grub-mkimage")?)
        .args(["-O", "i386-pc", "-C", "auto"])
        .arg("-d")
        .arg(grub_dir)
        .arg("-c")
        .arg(&cfg)
        .args(["-p", "/grub", "-o"])
        .arg(&core)
        .args(CORE_MODULES))?;
    fs::read(&core).ctx(|| format!("reading {}", core.display()))
}

// Offsets in boot.img and diskboot.img (GRUB's include/grub/i386/pc/boot.h).
/// LBA (u64) of core.img's first sector.
const BOOT_KERNEL_SECTOR: usize = 0x5c;
/// Two-byte jump that skips forcing the boot drive to 0x80 when the BIOS passes a bad one.
const BOOT_DRIVE_CHECK: usize = 0x66;
/// End of the MBR boot code; the disk signature and partition table follow.
pub const MBR_CODE_END: usize = 0x1b8;
/// First block list entry in core.img's first sector: start LBA (u64), sectors (u16), segment.
const BLOCKLIST_START: usize = 0x200 - 12;
const BLOCKLIST_LEN: usize = 0x200 - 4;
/// The entry below it: must stay all zero (terminator).
const BLOCKLIST_TERMINATOR: usize = 0x200 - 24;

/// The MBR boot code for a core.img starting at `core_lba` (what grub-bios-setup writes).
pub fn patch_boot_img(boot_img: &[u8], core_lba: u64) -> Result<[u8; MBR_CODE_END]> {
    if boot_img.len() != 512 || boot_img[510..] != [0x55, 0xaa] {
        return Err(invalid("boot.img: not a 512-byte boot sector"));
    }
    let mut code = [0u8; MBR_CODE_END];
    code.copy_from_slice(&boot_img[..MBR_CODE_END]);
    code[BOOT_KERNEL_SECTOR..BOOT_KERNEL_SECTOR + 8].copy_from_slice(&core_lba.to_le_bytes());
    // A hard disk: always use drive 0x80 if the BIOS hands over something else.
    if code[BOOT_DRIVE_CHECK] != 0xeb {
        return Err(invalid(
            "boot.img: unexpected code at the drive check (not GRUB 2?)",
        ));
    }
    code[BOOT_DRIVE_CHECK] = 0x90;
    code[BOOT_DRIVE_CHECK + 1] = 0x90;
    Ok(code)
}

/// Pad core.img to whole sectors and point its block list at the sectors that follow its
/// first one, contiguous from `core_lba + 1`.
pub fn patch_core_img(core: &mut Vec<u8>, core_lba: u64) -> Result<()> {
    if core.len() < 1024 {
        return Err(invalid("core.img: too small"));
    }
    core.resize(core.len().div_ceil(512) * 512, 0);
    let sectors = core.len() / 512;
    let rest = u16::try_from(sectors - 1)
        .map_err(|_| invalid(format!("core.img: {sectors} sectors is too large")))?;
    if core[BLOCKLIST_TERMINATOR..BLOCKLIST_START]
        .iter()
        .any(|&b| b != 0)
    {
        return Err(invalid("core.img: unexpected data before the block list"));
    }
    core[BLOCKLIST_START..BLOCKLIST_START + 8].copy_from_slice(&(core_lba + 1).to_le_bytes());
    core[BLOCKLIST_LEN..BLOCKLIST_LEN + 2].copy_from_slice(&rest.to_le_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_boot_and_core() {
        let mut boot = vec![0u8; 512];
        boot[510] = 0x55;
        boot[511] = 0xaa;
        boot[0x66] = 0xeb;
        boot[0x67] = 0x05;
        let code = patch_boot_img(&boot, 2048).unwrap();
        assert_eq!(&code[0x5c..0x64], &2048u64.to_le_bytes());
        assert_eq!(&code[0x66..0x68], &[0x90, 0x90]);

        let mut core = vec![0u8; 1500];
        core[0x1fe] = 0x20;
        core[0x1ff] = 0x08;
        patch_core_img(&mut core, 2048).unwrap();
        assert_eq!(core.len(), 1536);
        assert_eq!(&core[0x1f4..0x1fc], &2049u64.to_le_bytes());
        assert_eq!(&core[0x1fc..0x1fe], &2u16.to_le_bytes());
        assert_eq!(&core[0x1fe..0x200], &[0x20, 0x08]);
    }

    #[test]
    fn installed_grub_images_have_the_expected_layout() {
        let dir = Path::new("/usr/lib/grub/i386-pc");
        let (Ok(boot), Ok(diskboot)) = (
            fs::read(dir.join("boot.img")),
            fs::read(dir.join("diskboot.img")),
        ) else {
            eprintln!("skipped: grub-pc-bin not installed");
            return;
        };
        patch_boot_img(&boot, 2048).unwrap();
        // diskboot.img's default block list: start 2, segment 0x820.
        assert_eq!(&diskboot[0x1f4..0x1fc], &2u64.to_le_bytes());
        assert_eq!(&diskboot[0x1fe..0x200], &0x820u16.to_le_bytes());
    }
}
