//! Trust: ed25519 public keys and threshold signature checks over the exact manifest bytes.

use std::collections::BTreeSet;
use std::path::Path;

use ed25519_dalek::pkcs8::DecodePublicKey;
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::manifest::limits;

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
            .map_err(|e| Error::Malformed(format!("signatures block: {e}")))?;
        if s.signatures.len() > limits::MAX_SIGNATURE_COUNT {
            return Err(Error::Limit(format!(
                "{} signatures (limit {})",
                s.signatures.len(),
                limits::MAX_SIGNATURE_COUNT
            )));
        }
        Ok(s)
    }
}

/// The keys a device trusts and how many of them must have signed.
#[derive(Debug, Clone)]
pub struct TrustedKeys {
    keys: Vec<(String, VerifyingKey)>,
    threshold: usize,
}

impl TrustedKeys {
    /// `keys` must be distinct: a threshold counts distinct keys, and the same key listed twice
    /// would let one signer meet a threshold of two.
    pub fn new(keys: Vec<VerifyingKey>, threshold: usize) -> Result<Self> {
        if keys.is_empty() {
            return Err(Error::Trust("no trusted keys configured".into()));
        }
        for (i, k) in keys.iter().enumerate() {
            if keys[..i].contains(k) {
                return Err(Error::Trust(format!(
                    "key {} is listed twice: a threshold counts distinct keys",
                    key_id(k)
                )));
            }
        }
        if threshold == 0 || threshold > keys.len() {
            return Err(Error::Trust(format!(
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

/// Read a public key: PEM SubjectPublicKeyInfo (`-----BEGIN PUBLIC KEY-----`, as `openssl pkey
/// -pubout` writes for ed25519).
pub fn read_public_key(path: &Path) -> Result<VerifyingKey> {
    let pem = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading key {}", path.display()), e))?;
    VerifyingKey::from_public_key_pem(&pem).map_err(|e| Error::Key {
        path: path.into(),
        reason: format!("not an ed25519 public key in PEM (SPKI) form: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    fn sign(m: &[u8], keys: &[SigningKey]) -> Signatures {
        Signatures {
            signatures: keys
                .iter()
                .map(|k| SignatureEntry {
                    key_id: key_id(&k.verifying_key()),
                    sig: hex::encode(k.sign(m).to_bytes()),
                })
                .collect(),
        }
    }

    #[test]
    fn same_key_listed_twice_in_trust_is_refused() {
        let e = TrustedKeys::new(vec![key(1).verifying_key(), key(1).verifying_key()], 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("listed twice"), "{e}");
    }

    #[test]
    fn threshold_two_of_three() {
        let keys = [key(1), key(2), key(3)];
        let trust = TrustedKeys::new(keys.iter().map(|k| k.verifying_key()).collect(), 2).unwrap();
        let m = b"manifest";
        assert!(trust.verify(m, &sign(m, &keys[..2])).is_ok());
        assert!(matches!(
            trust.verify(m, &sign(m, &keys[..1])),
            Err(Error::BelowThreshold { have: 1, need: 2 })
        ));
    }

    #[test]
    fn same_key_twice_counts_once() {
        let keys = [key(1), key(2)];
        let trust = TrustedKeys::new(keys.iter().map(|k| k.verifying_key()).collect(), 2).unwrap();
        let m = b"manifest";
        let sigs = sign(m, &[key(1), key(1)]);
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
            trust.verify(m, &sign(m, &[key(9)])),
            Err(Error::UnknownKey(_))
        ));
    }

    #[test]
    fn forged_signature_is_refused_even_above_threshold() {
        let trust =
            TrustedKeys::new(vec![key(1).verifying_key(), key(2).verifying_key()], 1).unwrap();
        let m = b"manifest";
        let mut sigs = sign(m, &[key(1), key(2)]);
        sigs.signatures[1].sig = sign(b"other", &[key(2)]).signatures[0].sig.clone();
        assert!(matches!(
            trust.verify(m, &sigs),
            Err(Error::BadSignature(_))
        ));
    }
}
