//! Pick kernel modules and their load order from depmod's output (modules.dep, softdeps).

use std::collections::{BTreeMap, BTreeSet};

use super::util::{invalid, Result};

/// Module names as the kernel sees them: `usb-storage` and `usb_storage` are the same module.
pub fn canonical(name: &str) -> String {
    let base = name.rsplit('/').next().unwrap_or(name);
    let base = base
        .strip_suffix(".ko.xz")
        .or_else(|| base.strip_suffix(".ko.zst"))
        .or_else(|| base.strip_suffix(".ko.gz"))
        .or_else(|| base.strip_suffix(".ko"))
        .unwrap_or(base);
    base.replace('-', "_")
}

/// What depmod knows about one kernel release.
#[derive(Debug, Default)]
pub struct ModuleIndex {
    /// canonical name → (relative path, relative paths of all dependencies as listed)
    deps: BTreeMap<String, (String, Vec<String>)>,
    /// canonical names of modules compiled into the kernel
    builtin: BTreeSet<String>,
    /// exact alias → canonical module names providing it
    aliases: BTreeMap<String, Vec<String>>,
    /// canonical name → names (or aliases) to load first
    softdeps: BTreeMap<String, Vec<String>>,
}

impl ModuleIndex {
    /// Parse the text files depmod writes (`modules.dep`, `modules.builtin`, `modules.alias`,
    /// `modules.softdep`); the last three may be empty.
    pub fn parse(dep: &str, builtin: &str, alias: &str, softdep: &str) -> Result<Self> {
        let mut idx = ModuleIndex::default();
        for line in dep.lines().filter(|l| !l.trim().is_empty()) {
            let (path, rest) = line
                .split_once(':')
                .ok_or_else(|| invalid(format!("modules.dep: bad line {line:?}")))?;
            let deps = rest.split_whitespace().map(str::to_string).collect();
            idx.deps.insert(canonical(path), (path.to_string(), deps));
        }
        for line in builtin.lines().filter(|l| !l.trim().is_empty()) {
            idx.builtin.insert(canonical(line.trim()));
        }
        for line in alias.lines() {
            let mut w = line.split_whitespace();
            if let (Some("alias"), Some(a), Some(m)) = (w.next(), w.next(), w.next()) {
                idx.aliases
                    .entry(a.to_string())
                    .or_default()
                    .push(canonical(m));
            }
        }
        for line in softdep.lines() {
            let mut w = line.split_whitespace();
            if let (Some("softdep"), Some(m)) = (w.next(), w.next()) {
                // Only "pre:" entries matter for load order.
                let mut pre = false;
                for t in w {
                    match t {
                        "pre:" => pre = true,
                        "post:" => pre = false,
                        _ if pre => idx
                            .softdeps
                            .entry(canonical(m))
                            .or_default()
                            .push(t.to_string()),
                        _ => {}
                    }
                }
            }
        }
        Ok(idx)
    }

    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&canonical(name))
    }

    pub fn has_module(&self, name: &str) -> bool {
        self.deps.contains_key(&canonical(name))
    }

    /// A softdep names a module or an alias (`crypto-crc32c`); prefer the portable `*_generic`
    /// provider because an accelerated one may not load on the guest's CPU.
    fn resolve_softdep(&self, name: &str) -> Option<String> {
        let c = canonical(name);
        if self.deps.contains_key(&c) {
            return Some(c);
        }
        let providers = self.aliases.get(name)?;
        let mut ps: Vec<&String> = providers
            .iter()
            .filter(|p| self.deps.contains_key(*p))
            .collect();
        ps.sort_by_key(|p| (!p.ends_with("_generic"), p.to_string()));
        ps.first().map(|p| p.to_string())
    }

    /// Relative paths of `roots` and everything they need, dependencies first. Roots that are
    /// built in are skipped; unknown roots are returned in the second list.
    pub fn load_order(&self, roots: &[&str]) -> (Vec<String>, Vec<String>) {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        let mut missing = Vec::new();
        for r in roots {
            if self.is_builtin(r) {
                continue;
            }
            if !self.has_module(r) {
                missing.push(r.to_string());
                continue;
            }
            self.visit(&canonical(r), &mut seen, &mut order);
        }
        (order, missing)
    }

    fn visit(&self, name: &str, seen: &mut BTreeSet<String>, order: &mut Vec<String>) {
        if !seen.insert(name.to_string()) {
            return;
        }
        let Some((path, deps)) = self.deps.get(name) else {
            return;
        };
        if let Some(soft) = self.softdeps.get(name) {
            for s in soft {
                if let Some(m) = self.resolve_softdep(s) {
                    self.visit(&m, seen, order);
                }
            }
        }
        // modules.dep lists the full closure with the deepest dependencies last; visiting in
        // reverse reaches leaves first, and the recursion orders the rest.
        for d in deps.iter().rev() {
            self.visit(&canonical(d), seen, order);
        }
        order.push(path.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/fs/jbd2/jbd2.ko:
kernel/fs/mbcache.ko:
kernel/lib/crc16.ko:
kernel/crypto/crc32c_generic.ko:
kernel/arch/x86/crypto/crc32c-intel.ko:
kernel/drivers/usb/storage/usb-storage.ko: kernel/drivers/scsi/scsi_mod.ko kernel/drivers/scsi/scsi_common.ko
kernel/drivers/scsi/scsi_mod.ko: kernel/drivers/scsi/scsi_common.ko
kernel/drivers/scsi/scsi_common.ko:
";

    fn idx() -> ModuleIndex {
        ModuleIndex::parse(
            DEP,
            "kernel/fs/fat/vfat.ko\n",
            "alias crypto-crc32c crc32c_intel\nalias crypto-crc32c crc32c_generic\n",
            "softdep ext4 pre: crypto-crc32c\nsoftdep jbd2 pre: crypto-crc32c\n",
        )
        .unwrap()
    }

    #[test]
    fn dependencies_come_first() {
        let (order, missing) = idx().load_order(&["virtio_blk", "usb_storage", "vfat", "nope"]);
        assert_eq!(
            order,
            vec![
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/block/virtio_blk.ko",
                "kernel/drivers/scsi/scsi_common.ko",
                "kernel/drivers/scsi/scsi_mod.ko",
                "kernel/drivers/usb/storage/usb-storage.ko",
            ]
        );
        assert_eq!(missing, vec!["nope"]);
    }

    #[test]
    fn softdeps_prefer_generic_providers() {
        let (order, _) = idx().load_order(&["ext4"]);
        assert_eq!(order[0], "kernel/crypto/crc32c_generic.ko");
        assert_eq!(order.last().unwrap(), "kernel/fs/ext4/ext4.ko");
        let pos = |m: &str| order.iter().position(|p| p.ends_with(m)).unwrap();
        assert!(pos("jbd2.ko") < pos("ext4.ko"));
        assert!(pos("crc16.ko") < pos("ext4.ko"));
    }
}
