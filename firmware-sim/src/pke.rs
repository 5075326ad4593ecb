//! The public-key engines' cryptography, through aws-lc-rs: ECDSA and RSA signatures over
//! digests the host computed, and X25519 / P-256 key agreement with keys that never leave
//! the device.

use aws_lc_rs::agreement::{self, UnparsedPublicKey};
use aws_lc_rs::digest::{self, Digest};
use aws_lc_rs::signature::{self, EcdsaKeyPair, RsaKeyPair};
use tlsaccel_abi::{HashAlgorithm, PrivateKeyType, RsaPadding, Status};

/// A private key held in a key slot.
pub(crate) enum PrivateKey {
    Ecdsa(PrivateKeyType, EcdsaKeyPair),
    Rsa(RsaKeyPair),
    KeyExchange(PrivateKeyType, agreement::PrivateKey),
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PrivateKey").field(&self.kind()).finish()
    }
}

impl PrivateKey {
    /// Parses key material of `kind` (PKCS#8 for signing keys, the raw private key for
    /// key exchange).
    pub(crate) fn parse(kind: PrivateKeyType, material: &[u8]) -> Result<Self, Status> {
        let invalid = |_| Status::INVALID_KEY;
        Ok(match kind {
            PrivateKeyType::ECDSA_P256 => Self::Ecdsa(
                kind,
                EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, material)
                    .map_err(invalid)?,
            ),
            PrivateKeyType::ECDSA_P384 => Self::Ecdsa(
                kind,
                EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P384_SHA384_ASN1_SIGNING, material)
                    .map_err(invalid)?,
            ),
            PrivateKeyType::RSA => {
                let key = RsaKeyPair::from_pkcs8(material).map_err(invalid)?;
                if !(2048..=4096).contains(&(key.public_modulus_len() * 8)) {
                    return Err(Status::UNSUPPORTED);
                }
                Self::Rsa(key)
            }
            PrivateKeyType::X25519 => Self::KeyExchange(
                kind,
                agreement::PrivateKey::from_private_key(&agreement::X25519, material)
                    .map_err(invalid)?,
            ),
            PrivateKeyType::ECDH_P256 => Self::KeyExchange(
                kind,
                agreement::PrivateKey::from_private_key(&agreement::ECDH_P256, material)
                    .map_err(invalid)?,
            ),
            _ => return Err(Status::UNSUPPORTED),
        })
    }

    /// A fresh key-exchange key of `kind`.
    pub(crate) fn generate(kind: PrivateKeyType) -> Result<Self, Status> {
        let algorithm = match kind {
            PrivateKeyType::X25519 => &agreement::X25519,
            PrivateKeyType::ECDH_P256 => &agreement::ECDH_P256,
            _ => return Err(Status::UNSUPPORTED),
        };
        agreement::PrivateKey::generate(algorithm)
            .map(|key| Self::KeyExchange(kind, key))
            .map_err(|_| Status::UNSUPPORTED)
    }

    /// The longest signature the key makes: DER ECDSA (72 bytes for P-256, 104 for P-384)
    /// or the RSA modulus length.
    pub(crate) fn max_signature_len(&self) -> usize {
        match self {
            Self::Ecdsa(PrivateKeyType::ECDSA_P256, _) => 72,
            Self::Ecdsa(..) => 104,
            Self::Rsa(key) => key.public_modulus_len(),
            Self::KeyExchange(..) => 0,
        }
    }

    /// The digest length a signing key takes (ECDSA: its curve's hash).
    pub(crate) fn ecdsa_digest_len(&self) -> Option<usize> {
        match self {
            Self::Ecdsa(PrivateKeyType::ECDSA_P256, _) => Some(32),
            Self::Ecdsa(..) => Some(48),
            _ => None,
        }
    }

    pub(crate) fn kind(&self) -> PrivateKeyType {
        match self {
            Self::Ecdsa(kind, _) | Self::KeyExchange(kind, _) => *kind,
            Self::Rsa(_) => PrivateKeyType::RSA,
        }
    }

    /// The public key of a key-exchange key: X25519 32 bytes, P-256 uncompressed point.
    pub(crate) fn key_share(&self) -> Result<Vec<u8>, Status> {
        match self {
            Self::KeyExchange(_, key) => key
                .compute_public_key()
                .map(|public| public.as_ref().to_vec())
                .map_err(|_| Status::INVALID_KEY),
            _ => Err(Status::SLOT_MISMATCH),
        }
    }

    /// Signs `digest` (which must be of the key's hash for ECDSA) and returns the signature
    /// (DER for ECDSA, modulus-sized for RSA).
    pub(crate) fn sign(
        &self,
        digest_bytes: &[u8],
        rsa: Option<(RsaPadding, HashAlgorithm)>,
    ) -> Result<Vec<u8>, Status> {
        match (self, rsa) {
            (Self::Ecdsa(kind, key), None) => {
                let hash = match *kind {
                    PrivateKeyType::ECDSA_P256 => &digest::SHA256,
                    _ => &digest::SHA384,
                };
                let digest = import_digest(hash, digest_bytes)?;
                key.sign_digest(&digest)
                    .map(|sig| sig.as_ref().to_vec())
                    .map_err(|_| Status::LENGTH_ERROR)
            }
            (Self::Rsa(key), Some((padding, hash))) => {
                let (algorithm, encoding): (_, &'static dyn signature::RsaEncoding) =
                    match (padding, hash) {
                        (RsaPadding::PKCS1_V15, HashAlgorithm::SHA256) => {
                            (&digest::SHA256, &signature::RSA_PKCS1_SHA256)
                        }
                        (RsaPadding::PKCS1_V15, HashAlgorithm::SHA384) => {
                            (&digest::SHA384, &signature::RSA_PKCS1_SHA384)
                        }
                        (RsaPadding::PKCS1_V15, HashAlgorithm::SHA512) => {
                            (&digest::SHA512, &signature::RSA_PKCS1_SHA512)
                        }
                        (RsaPadding::PSS, HashAlgorithm::SHA256) => {
                            (&digest::SHA256, &signature::RSA_PSS_SHA256)
                        }
                        (RsaPadding::PSS, HashAlgorithm::SHA384) => {
                            (&digest::SHA384, &signature::RSA_PSS_SHA384)
                        }
                        (RsaPadding::PSS, HashAlgorithm::SHA512) => {
                            (&digest::SHA512, &signature::RSA_PSS_SHA512)
                        }
                        _ => return Err(Status::UNSUPPORTED),
                    };
                let digest = import_digest(algorithm, digest_bytes)?;
                let mut out = vec![0u8; key.public_modulus_len()];
                key.sign_digest(encoding, &digest, &mut out)
                    .map_err(|_| Status::LENGTH_ERROR)?;
                Ok(out)
            }
            _ => Err(Status::SLOT_MISMATCH),
        }
    }

    /// The shared secret with `peer` (X25519: 32 bytes; P-256: uncompressed point; the
    /// result is X25519's output or P-256's x-coordinate). Invalid peer keys, and X25519 keys
    /// of small order (an all-zero secret), are rejected.
    pub(crate) fn derive(&self, peer: &[u8]) -> Result<Vec<u8>, Status> {
        let Self::KeyExchange(kind, key) = self else {
            return Err(Status::SLOT_MISMATCH);
        };
        let algorithm = match *kind {
            PrivateKeyType::X25519 => &agreement::X25519,
            _ => &agreement::ECDH_P256,
        };
        agreement::agree(
            key,
            UnparsedPublicKey::new(algorithm, peer),
            Status::INVALID_PUBLIC_KEY,
            |secret| {
                // RFC 7748 section 6.1: an all-zero X25519 result means a small-order peer
                // key. (For P-256 an x-coordinate of 0 is an ordinary point.)
                if *kind == PrivateKeyType::X25519 && secret.iter().all(|&b| b == 0) {
                    Err(Status::INVALID_PUBLIC_KEY)
                } else {
                    Ok(secret.to_vec())
                }
            },
        )
    }
}

fn import_digest(algorithm: &'static digest::Algorithm, bytes: &[u8]) -> Result<Digest, Status> {
    Digest::import_less_safe(bytes, algorithm).map_err(|_| Status::LENGTH_ERROR)
}

/// The public key of a signing key, for tests.
#[cfg(test)]
pub(crate) fn signing_public_key(key: &PrivateKey) -> Vec<u8> {
    use aws_lc_rs::signature::KeyPair;
    match key {
        PrivateKey::Ecdsa(_, k) => k.public_key().as_ref().to_vec(),
        PrivateKey::Rsa(k) => k.public_key().as_ref().to_vec(),
        PrivateKey::KeyExchange(..) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::rand::SystemRandom;

    #[test]
    fn ecdsa_digest_signatures_verify_independently() {
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(
            &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &SystemRandom::new(),
        )
        .unwrap();
        let key = PrivateKey::parse(PrivateKeyType::ECDSA_P256, pkcs8.as_ref()).unwrap();
        let message = b"server signature context";
        let digest = digest::digest(&digest::SHA256, message);
        let sig = key.sign(digest.as_ref(), None).unwrap();
        let public = signing_public_key(&key);
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, &public)
            .verify(message, &sig)
            .unwrap();
        assert_eq!(key.sign(&[0; 31], None).unwrap_err(), Status::LENGTH_ERROR);
    }

    #[test]
    fn key_exchange_agrees_and_rejects_bad_points() {
        let ours = PrivateKey::generate(PrivateKeyType::ECDH_P256).unwrap();
        let theirs = PrivateKey::generate(PrivateKeyType::ECDH_P256).unwrap();
        let a = ours.derive(&theirs.key_share().unwrap()).unwrap();
        let b = theirs.derive(&ours.key_share().unwrap()).unwrap();
        assert_eq!(a, b);
        let mut off_curve = theirs.key_share().unwrap();
        off_curve[64] ^= 1;
        assert_eq!(
            ours.derive(&off_curve).unwrap_err(),
            Status::INVALID_PUBLIC_KEY
        );
        let x = PrivateKey::generate(PrivateKeyType::X25519).unwrap();
        assert_eq!(
            x.derive(&[0u8; 32]).unwrap_err(),
            Status::INVALID_PUBLIC_KEY
        );
        assert_eq!(
            PrivateKey::parse(PrivateKeyType::ECDSA_P256, b"not a key").unwrap_err(),
            Status::INVALID_KEY
        );
    }
}
