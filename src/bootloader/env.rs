//! The A/B boot protocol over a key/value environment, shared by GRUB, U-Boot and the file
//! backend (bootloader/grub/grub.cfg and bootloader/u-boot/boot.cmd implement the boot side).
//!
//! `EDGE_ORDER` lists slots; per slot `EDGE_<S>_STATE` is `good`, `trying` or `bad` and
//! `EDGE_<S>_TRIES` the tries left while trying. At boot the loader takes the first slot in
//! order that is good, or trying with tries left (decrementing them). [`select_and_count`] is
//! that boot-time algorithm in Rust, used to simulate boots in tests.

use std::collections::BTreeMap;

use super::{BootError, Bootloader, EnvStore, SlotBootState};

pub const ORDER: &str = "EDGE_ORDER";
/// The anti-rollback floor's bootloader-side copy (the boot scripts never read it).
pub const FLOOR: &str = "EDGE_FLOOR";
/// Largest tries value the boot scripts can count down (they decrement with an if-chain).
pub const MAX_TRIES: u32 = 9;

fn state_key(slot: &str) -> String {
    format!("EDGE_{slot}_STATE")
}
fn tries_key(slot: &str) -> String {
    format!("EDGE_{slot}_TRIES")
}

/// A [`Bootloader`] over any [`EnvStore`].
pub struct EnvBootloader<S: EnvStore> {
    store: S,
}

impl<S: EnvStore> EnvBootloader<S> {
    pub fn new(store: S) -> Self {
        EnvBootloader { store }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    fn corrupt(&self, reason: String) -> BootError {
        BootError::Corrupt {
            path: self.store.describe().into(),
            reason,
        }
    }

    fn load_checked(&self) -> Result<(BTreeMap<String, String>, Vec<String>), BootError> {
        let vars = self.store.load()?;
        let order: Vec<String> = vars
            .get(ORDER)
            .ok_or_else(|| self.corrupt(format!("{ORDER} is missing")))?
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if order.is_empty() {
            return Err(self.corrupt(format!("{ORDER} is empty")));
        }
        Ok((vars, order))
    }

    fn parse_state(
        &self,
        vars: &BTreeMap<String, String>,
        slot: &str,
    ) -> Result<SlotBootState, BootError> {
        let st = vars
            .get(&state_key(slot))
            .ok_or_else(|| self.corrupt(format!("{} is missing", state_key(slot))))?;
        let tries = || -> Result<u32, BootError> {
            let t = vars
                .get(&tries_key(slot))
                .ok_or_else(|| self.corrupt(format!("{} is missing", tries_key(slot))))?;
            t.parse::<u32>()
                .ok()
                .filter(|n| *n <= MAX_TRIES)
                .ok_or_else(|| {
                    self.corrupt(format!("{}={t:?} is not 0..{MAX_TRIES}", tries_key(slot)))
                })
        };
        match st.as_str() {
            "good" => Ok(SlotBootState::Good),
            "bad" => Ok(SlotBootState::Bad),
            "trying" => Ok(SlotBootState::Trying {
                tries_left: tries()?,
            }),
            other => Err(self.corrupt(format!(
                "{}={other:?} (expected good, trying or bad)",
                state_key(slot)
            ))),
        }
    }

    fn update(
        &mut self,
        slot: &str,
        f: impl FnOnce(&mut BTreeMap<String, String>, &mut Vec<String>),
    ) -> Result<(), BootError> {
        let (mut vars, mut order) = self.load_checked()?;
        if !order.iter().any(|s| s == slot) {
            return Err(BootError::UnknownSlot(slot.to_string()));
        }
        f(&mut vars, &mut order);
        vars.insert(ORDER.into(), order.join(" "));
        self.store.store(&vars)
    }

    /// Write a fresh environment: `slots` in order, `good` confirmed, the others bad.
    pub fn initial_vars(slots: &[String], good: &str) -> BTreeMap<String, String> {
        let mut vars = BTreeMap::new();
        let mut order: Vec<String> = slots.to_vec();
        order.sort_by_key(|s| s != good);
        vars.insert(ORDER.into(), order.join(" "));
        vars.insert(FLOOR.into(), "0".into());
        for s in slots {
            vars.insert(state_key(s), if s == good { "good" } else { "bad" }.into());
            vars.insert(tries_key(s), "0".into());
        }
        vars
    }

    /// What the boot script does at power-on: pick a slot and use up one try. Returns the slot
    /// booted, or `None` when nothing is bootable (the script then boots the first in order as
    /// a last resort). Used to simulate boots on the file backend.
    pub fn select_and_count(&mut self) -> Result<Option<String>, BootError> {
        let (mut vars, order) = self.load_checked()?;
        for slot in &order {
            match self.parse_state(&vars, slot)? {
                SlotBootState::Good => return Ok(Some(slot.clone())),
                SlotBootState::Trying { tries_left } if tries_left > 0 => {
                    vars.insert(tries_key(slot), (tries_left - 1).to_string());
                    self.store.store(&vars)?;
                    return Ok(Some(slot.clone()));
                }
                _ => {}
            }
        }
        Ok(None)
    }
}

impl<S: EnvStore> Bootloader for EnvBootloader<S> {
    fn order(&self) -> Result<Vec<String>, BootError> {
        Ok(self.load_checked()?.1)
    }

    fn set_primary(&mut self, slot: &str, tries: u32) -> Result<(), BootError> {
        if tries == 0 || tries > MAX_TRIES {
            return Err(BootError::Invalid(format!(
                "tries {tries} must be 1..{MAX_TRIES}"
            )));
        }
        self.update(slot, |vars, order| {
            order.retain(|s| s != slot);
            order.insert(0, slot.to_string());
            vars.insert(state_key(slot), "trying".into());
            vars.insert(tries_key(slot), tries.to_string());
        })
    }

    fn mark_good(&mut self, slot: &str) -> Result<(), BootError> {
        self.update(slot, |vars, _| {
            vars.insert(state_key(slot), "good".into());
            vars.insert(tries_key(slot), "0".into());
        })
    }

    fn mark_bad(&mut self, slot: &str) -> Result<(), BootError> {
        self.update(slot, |vars, _| {
            vars.insert(state_key(slot), "bad".into());
            vars.insert(tries_key(slot), "0".into());
        })
    }

    fn slot_state(&self, slot: &str) -> Result<SlotBootState, BootError> {
        let (vars, order) = self.load_checked()?;
        if !order.iter().any(|s| s == slot) {
            return Err(BootError::UnknownSlot(slot.to_string()));
        }
        self.parse_state(&vars, slot)
    }

    fn floor(&self) -> Result<Option<u64>, BootError> {
        let vars = self.store.load()?;
        match vars.get(FLOOR) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| self.corrupt(format!("{FLOOR}={v:?} is not a number"))),
        }
    }

    fn set_floor(&mut self, floor: u64) -> Result<(), BootError> {
        let (mut vars, _) = self.load_checked()?;
        vars.insert(FLOOR.into(), floor.to_string());
        self.store.store(&vars)
    }

    fn describe(&self) -> String {
        self.store.describe()
    }

    fn check(&self) -> Vec<String> {
        self.store.check()
    }

    fn repair(&mut self) -> Result<Vec<String>, BootError> {
        self.store.repair()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootloader::file::FileEnv;

    fn fresh() -> (tempfile::TempDir, EnvBootloader<FileEnv>) {
        let dir = tempfile::tempdir().unwrap();
        let env = FileEnv::new(dir.path().join("bootenv"));
        let vars = EnvBootloader::<FileEnv>::initial_vars(&["A".into(), "B".into()], "A");
        env.store(&vars).unwrap();
        (dir, EnvBootloader::new(env))
    }

    #[test]
    fn new_slot_boots_for_its_tries_then_falls_back() {
        let (_d, mut bl) = fresh();
        bl.set_primary("B", 2).unwrap();
        assert_eq!(bl.select_and_count().unwrap().as_deref(), Some("B"));
        assert_eq!(bl.select_and_count().unwrap().as_deref(), Some("B"));
        assert_eq!(
            bl.slot_state("B").unwrap(),
            SlotBootState::Trying { tries_left: 0 }
        );
        assert_eq!(bl.select_and_count().unwrap().as_deref(), Some("A"));
        assert_eq!(bl.order().unwrap(), vec!["B", "A"]);
    }

    #[test]
    fn good_slot_boots_without_using_tries() {
        let (_d, mut bl) = fresh();
        bl.set_primary("B", 1).unwrap();
        assert_eq!(bl.select_and_count().unwrap().as_deref(), Some("B"));
        bl.mark_good("B").unwrap();
        for _ in 0..5 {
            assert_eq!(bl.select_and_count().unwrap().as_deref(), Some("B"));
        }
    }

    #[test]
    fn bad_slot_is_skipped() {
        let (_d, mut bl) = fresh();
        bl.set_primary("B", 3).unwrap();
        bl.mark_bad("B").unwrap();
        assert_eq!(bl.next_boot().unwrap().as_deref(), Some("A"));
    }

    #[test]
    fn unknown_slot_name_is_refused() {
        let (_d, mut bl) = fresh();
        assert!(matches!(bl.mark_good("C"), Err(BootError::UnknownSlot(_))));
        assert!(matches!(bl.slot_state("C"), Err(BootError::UnknownSlot(_))));
    }

    #[test]
    fn garbage_state_value_is_corrupt_not_defaulted() {
        let (_d, bl) = fresh();
        let mut vars = bl.store().load().unwrap();
        vars.insert("EDGE_B_STATE".into(), "maybe".into());
        bl.store().store(&vars).unwrap();
        assert!(matches!(bl.slot_state("B"), Err(BootError::Corrupt { .. })));
    }

    #[test]
    fn missing_order_is_corrupt() {
        let (_d, bl) = fresh();
        let mut vars = bl.store().load().unwrap();
        vars.remove(ORDER);
        bl.store().store(&vars).unwrap();
        assert!(matches!(bl.order(), Err(BootError::Corrupt { .. })));
    }
}
