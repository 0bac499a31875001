//! Signing keys (build side): generation, reading private keys, signing a manifest.

use std::path::Path;

use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::Signer;
pub use ed25519_dalek::SigningKey;

use crate::error::{Error, Result};
use crate::signature::{key_id, SignatureEntry, Signatures};

/// Sign `manifest` with each key (ed25519 is deterministic: same inputs, same bytes).
pub fn sign(manifest: &[u8], keys: &[SigningKey]) -> Signatures {
    Signatures {
        signatures: keys
            .iter()
            .map(|k| SignatureEntry {
                key_id: key_id(&k.verifying_key()),
                sig: hex::encode(k.sign(manifest).to_bytes()),
            })
            .collect(),
    }
}

/// Read a private key: PEM PKCS#8 (`-----BEGIN PRIVATE KEY-----`, as `openssl genpkey -algorithm
/// ed25519` writes).
pub fn read_private_key(path: &Path) -> Result<SigningKey> {
    let pem = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading key {}", path.display()), e))?;
    SigningKey::from_pkcs8_pem(&pem).map_err(|e| Error::Key {
        path: path.into(),
        reason: format!("not an ed25519 private key in PEM (PKCS#8) form: {e}"),
    })
}

/// A fresh key pair, PEM-encoded: (private PKCS#8, public SPKI).
pub fn generate_key_pem() -> Result<(String, String)> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed)
        .map_err(|e| Error::io("reading random seed", std::io::Error::other(e.to_string())))?;
    let key = SigningKey::from_bytes(&seed);
    let private = key
        .to_pkcs8_pem(Default::default())
        .map_err(|e| Error::Trust(format!("encoding private key: {e}")))?;
    let public = key
        .verifying_key()
        .to_public_key_pem(Default::default())
        .map_err(|e| Error::Trust(format!("encoding public key: {e}")))?;
    Ok((private.to_string(), public))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip() {
        let (private, public) = generate_key_pem().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), private).unwrap();
        std::fs::write(dir.path().join("k.pub"), public).unwrap();
        let sk = read_private_key(&dir.path().join("k")).unwrap();
        let pk = crate::signature::read_public_key(&dir.path().join("k.pub")).unwrap();
        assert_eq!(sk.verifying_key(), pk);
    }
}
