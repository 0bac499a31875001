//! Trust: ed25519 keys, threshold signature checks over the exact manifest bytes, and the
//! device policy (compatible, expiry, anti-rollback) applied to a verified manifest.

use std::collections::BTreeSet;
use std::path::Path;

use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::bundle::{limits, Manifest};
use crate::error::{Error, IoContext, Result};

/// Short key identifier: the first 8 bytes of blake3 of the raw public key, in hex.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&blake3::hash(key.as_bytes()).as_bytes()[..8])
}

/// One signature in the bundle's signatures block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureEntry {
    pub key_id: String,
    /// 64-byte ed25519 signature, hex.
    pub sig: String,
}

/// The signatures block: a JSON object after the manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signatures {
    pub signatures: Vec<SignatureEntry>,
}

impl Signatures {
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let s: Signatures = serde_json::from_slice(bytes)
            .map_err(|e| Error::Format(format!("signatures block: {e}")))?;
        if s.signatures.len() > limits::MAX_SIGNATURE_COUNT {
            return Err(Error::Limit(format!(
                "{} signatures (limit {})",
                s.signatures.len(),
                limits::MAX_SIGNATURE_COUNT
            )));
        }
        Ok(s)
    }

    /// Sign `manifest` with each key (ed25519 is deterministic: same inputs, same bytes).
    pub fn sign(manifest: &[u8], keys: &[SigningKey]) -> Self {
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
}

/// The keys a device trusts and how many of them must have signed.
#[derive(Debug, Clone)]
pub struct TrustedKeys {
    keys: Vec<(String, VerifyingKey)>,
    threshold: usize,
}

impl TrustedKeys {
    pub fn new(keys: Vec<VerifyingKey>, threshold: usize) -> Result<Self> {
        if keys.is_empty() {
            return Err(Error::Usage("no trusted keys configured".into()));
        }
        if threshold == 0 || threshold > keys.len() {
            return Err(Error::Usage(format!(
                "threshold {threshold} must be between 1 and the number of trusted keys ({})",
                keys.len()
            )));
        }
        let keys = keys.into_iter().map(|k| (key_id(&k), k)).collect();
        Ok(TrustedKeys { keys, threshold })
    }

    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// Check the signatures over the exact manifest bytes. Returns the ids of the trusted keys
    /// that signed. Any signature claiming a trusted key that does not verify is refused, even
    /// when enough others do: a forged signature means someone is tampering.
    pub fn verify(&self, manifest: &[u8], sigs: &Signatures) -> Result<Vec<String>> {
        if sigs.signatures.is_empty() {
            return Err(Error::Unsigned);
        }
        let mut valid = BTreeSet::new();
        let mut unknown = Vec::new();
        for entry in &sigs.signatures {
            let Some((id, key)) = self.keys.iter().find(|(id, _)| *id == entry.key_id) else {
                unknown.push(entry.key_id.clone());
                continue;
            };
            let mut raw = [0u8; 64];
            hex::decode_to_slice(entry.sig.as_bytes(), &mut raw)
                .map_err(|_| Error::BadSignature(id.clone()))?;
            let sig = ed25519_dalek::Signature::from_bytes(&raw);
            key.verify_strict(manifest, &sig)
                .map_err(|_| Error::BadSignature(id.clone()))?;
            valid.insert(id.clone());
        }
        if valid.len() >= self.threshold {
            return Ok(valid.into_iter().collect());
        }
        if valid.is_empty() && !unknown.is_empty() {
            return Err(Error::UnknownKey(unknown.join(", ")));
        }
        Err(Error::BelowThreshold {
            have: valid.len(),
            need: self.threshold,
        })
    }
}

/// What the device requires of a bundle beyond valid signatures.
#[derive(Debug, Clone)]
pub struct Policy {
    pub compatible: String,
    /// Unix seconds.
    pub now: u64,
    pub min_security_version: u64,
}

impl Policy {
    pub fn check(&self, m: &Manifest) -> Result<()> {
        if m.compatible != self.compatible {
            return Err(Error::WrongCompatible {
                bundle: m.compatible.clone(),
                device: self.compatible.clone(),
            });
        }
        if let Some(expires) = m.expires {
            if self.now >= expires {
                return Err(Error::Expired {
                    expires,
                    now: self.now,
                });
            }
        }
        if m.security_version < self.min_security_version {
            return Err(Error::Downgrade {
                bundle: m.security_version,
                minimum: self.min_security_version,
            });
        }
        Ok(())
    }
}

/// Current time in unix seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Read a public key: PEM SubjectPublicKeyInfo (`-----BEGIN PUBLIC KEY-----`, as `openssl pkey
/// -pubout` writes for ed25519).
pub fn read_public_key(path: &Path) -> Result<VerifyingKey> {
    let pem = std::fs::read_to_string(path).ctx(|| format!("reading key {}", path.display()))?;
    VerifyingKey::from_public_key_pem(&pem).map_err(|e| Error::Config {
        path: path.into(),
        reason: format!("not an ed25519 public key in PEM (SPKI) form: {e}"),
    })
}

/// Read a private key: PEM PKCS#8 (`-----BEGIN PRIVATE KEY-----`, as `openssl genpkey -algorithm
/// ed25519` writes).
pub fn read_private_key(path: &Path) -> Result<SigningKey> {
    let pem = std::fs::read_to_string(path).ctx(|| format!("reading key {}", path.display()))?;
    SigningKey::from_pkcs8_pem(&pem).map_err(|e| Error::Config {
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
        .map_err(|e| Error::Format(format!("encoding private key: {e}")))?;
    let public = key
        .verifying_key()
        .to_public_key_pem(Default::default())
        .map_err(|e| Error::Format(format!("encoding public key: {e}")))?;
    Ok((private.to_string(), public))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    #[test]
    fn threshold_two_of_three() {
        let keys = [key(1), key(2), key(3)];
        let trust = TrustedKeys::new(keys.iter().map(|k| k.verifying_key()).collect(), 2).unwrap();
        let m = b"manifest";
        assert!(trust.verify(m, &Signatures::sign(m, &keys[..2])).is_ok());
        assert!(matches!(
            trust.verify(m, &Signatures::sign(m, &keys[..1])),
            Err(Error::BelowThreshold { have: 1, need: 2 })
        ));
    }

    #[test]
    fn same_key_twice_counts_once() {
        let keys = [key(1), key(2)];
        let trust = TrustedKeys::new(keys.iter().map(|k| k.verifying_key()).collect(), 2).unwrap();
        let m = b"manifest";
        let sigs = Signatures::sign(m, &[key(1), key(1)]);
        assert!(matches!(
            trust.verify(m, &sigs),
            Err(Error::BelowThreshold { have: 1, .. })
        ));
    }

    #[test]
    fn unknown_key_is_refused() {
        let trust = TrustedKeys::new(vec![key(1).verifying_key()], 1).unwrap();
        let m = b"manifest";
        assert!(matches!(
            trust.verify(m, &Signatures::sign(m, &[key(9)])),
            Err(Error::UnknownKey(_))
        ));
    }

    #[test]
    fn forged_signature_is_refused_even_above_threshold() {
        let trust =
            TrustedKeys::new(vec![key(1).verifying_key(), key(2).verifying_key()], 1).unwrap();
        let m = b"manifest";
        let mut sigs = Signatures::sign(m, &[key(1), key(2)]);
        sigs.signatures[1].sig = Signatures::sign(b"other", &[key(2)]).signatures[0]
            .sig
            .clone();
        assert!(matches!(
            trust.verify(m, &sigs),
            Err(Error::BadSignature(_))
        ));
    }

    #[test]
    fn pem_round_trip() {
        let (private, public) = generate_key_pem().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), private).unwrap();
        std::fs::write(dir.path().join("k.pub"), public).unwrap();
        let sk = read_private_key(&dir.path().join("k")).unwrap();
        let pk = read_public_key(&dir.path().join("k.pub")).unwrap();
        assert_eq!(sk.verifying_key(), pk);
    }
}
