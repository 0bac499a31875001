//! A file-backed environment for tests and simulation: the same A/B protocol as GRUB and
//! U-Boot, stored as `KEY=value` lines, replaced atomically.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::{BootError, EnvStore};

pub struct FileEnv {
    path: PathBuf,
}

impl FileEnv {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileEnv { path: path.into() }
    }
}

impl EnvStore for FileEnv {
    fn load(&self) -> Result<BTreeMap<String, String>, BootError> {
        let text = std::fs::read_to_string(&self.path).map_err(|e| BootError::io(&self.path, e))?;
        let mut vars = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line.split_once('=').ok_or_else(|| BootError::Corrupt {
                path: self.path.clone(),
                reason: format!("line {} has no '='", n + 1),
            })?;
            vars.insert(k.to_string(), v.to_string());
        }
        Ok(vars)
    }

    fn store(&self, vars: &BTreeMap<String, String>) -> Result<(), BootError> {
        let mut text = String::from("# edge-ota boot environment (file backend)\n");
        for (k, v) in vars {
            if k.contains(['=', '\n']) || v.contains('\n') {
                return Err(BootError::Invalid(format!("cannot store {k:?}={v:?}")));
            }
            text.push_str(&format!("{k}={v}\n"));
        }
        super::write_atomic(&self.path, text.as_bytes())
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}
