//! Conformance cases for the device's public-key engines: Wycheproof vectors for RSA
//! signatures and X25519 / P-256 key agreement, and device signatures checked by an
//! independent verifier (aws-lc-rs on the host).

use std::sync::Arc;

use anyhow::{anyhow, ensure, Context, Result};
use aws_lc_rs::agreement;
use aws_lc_rs::digest;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use tlsaccel_driver::abi::regs::Counter;
use tlsaccel_driver::abi::{HashAlgorithm, PrivateKeyType, RsaPadding, Status};
use tlsaccel_driver::{Device, JobError, JobOp, KeySlot, QueueConfig, QueuePair};

use crate::conformance::{run_one, Outcome};
use crate::wycheproof::{hex_field, load_json};

fn pke_queue(device: &Arc<Device>) -> Result<QueuePair> {
    Ok(device.queue(QueueConfig {
        size: 64,
        public_key: true,
        ..QueueConfig::default()
    })?)
}

/// Runs a public-key job reading `input`; returns what it wrote.
fn transform(
    device: &Arc<Device>,
    pair: &mut QueuePair,
    input: &[u8],
    out_len: usize,
    make: impl FnOnce(tlsaccel_driver::DmaSpan, tlsaccel_driver::DmaSpan) -> JobOp,
) -> Result<Result<Vec<u8>, JobError>> {
    let src = device.pool().alloc(input.len().max(1))?;
    src.write(0, input)?;
    let dst = device.pool().alloc(out_len)?;
    let op = make(src.span(0, input.len())?, dst.whole());
    Ok(match run_one(pair, op)? {
        Ok(out) => Ok(dst.to_vec(0, out.len as usize)?),
        Err(e) => Err(e),
    })
}

/// Every case of `rsa_pkcs1_2048_sig_gen_test.json` with a hash TLS signs with (SHA-256,
/// SHA-384, SHA-512) reproduced exactly: the device signs the message's digest with PKCS#1
/// v1.5 padding. SHA-1 and SHA-224 groups are counted as skipped: the device does not
/// offer them.
pub fn wycheproof_rsa_pkcs1_signatures(device: &Arc<Device>) -> Result<Outcome> {
    let file = load_json("rsa_pkcs1_2048_sig_gen_test.json")?;
    let mut pair = pke_queue(device)?;
    let (mut checked, mut skipped) = (0, 0);
    for group in file["testGroups"].as_array().context("testGroups")? {
        let tests = group["tests"].as_array().context("tests")?;
        let (hash, algorithm) = match group["sha"].as_str() {
            Some("SHA-256") => (HashAlgorithm::SHA256, &digest::SHA256),
            Some("SHA-384") => (HashAlgorithm::SHA384, &digest::SHA384),
            Some("SHA-512") => (HashAlgorithm::SHA512, &digest::SHA512),
            _ => {
                skipped += tests.len();
                continue;
            }
        };
        let pkcs8 = hex_field(group, "privateKeyPkcs8")?;
        let slot = device.load_private_key(PrivateKeyType::RSA, &pkcs8)?;
        for test in tests {
            let id = test["tcId"].as_u64().unwrap_or(0);
            let digest = digest::digest(algorithm, &hex_field(test, "msg")?);
            let expected = hex_field(test, "sig")?;
            let got = transform(device, &mut pair, digest.as_ref(), 512, |src, dst| {
                JobOp::RsaSign {
                    slot: slot.slot_ref(),
                    padding: RsaPadding::PKCS1_V15,
                    hash,
                    digest: src,
                    dst,
                }
            })?
            .map_err(|e| anyhow!("tcId {id}: {e}"))?;
            ensure!(got == expected, "tcId {id}: signature differs");
            checked += 1;
        }
    }
    ensure!(checked > 0, "no vector ran");
    Ok(Outcome::Passed(format!(
        "{checked} RSA PKCS#1 v1.5 signatures reproduced, {skipped} skipped (SHA-1, SHA-224)"
    )))
}

/// Key agreement vectors: load the private key, derive with the peer's public key. Valid
/// cases give the expected secret; invalid ones are rejected with INVALID_PUBLIC_KEY;
/// "acceptable" ones may be either. `peer_share` turns the vector's public key into the
/// device's input format, or `None` when it cannot be expressed as a key share (counted).
fn key_agreement_file(
    device: &Arc<Device>,
    file: &str,
    kind: PrivateKeyType,
    private_key: impl Fn(&[u8]) -> Option<Vec<u8>>,
    peer_share: impl Fn(&[u8]) -> Option<Vec<u8>>,
) -> Result<Outcome> {
    let json = load_json(file)?;
    let mut pair = pke_queue(device)?;
    let (mut valid, mut rejected, mut acceptable, mut unexpressible) = (0, 0, 0, 0);
    let before = device.counter(Counter::KeySlotsLoaded);
    for group in json["testGroups"].as_array().context("testGroups")? {
        for test in group["tests"].as_array().context("tests")? {
            let id = test["tcId"].as_u64().unwrap_or(0);
            let result = test["result"].as_str().unwrap_or("");
            let Some(private) = private_key(&hex_field(test, "private")?) else {
                unexpressible += 1;
                continue;
            };
            let Some(peer) = peer_share(&hex_field(test, "public")?) else {
                ensure!(
                    result != "valid",
                    "tcId {id}: a valid public key could not be expressed"
                );
                unexpressible += 1;
                continue;
            };
            let slot = device.load_private_key(kind, &private)?;
            let got = transform(device, &mut pair, &peer, 32, |src, dst| JobOp::KxDerive {
                slot: slot.slot_ref(),
                peer: src,
                dst,
            })?;
            let expected = hex_field(test, "shared")?;
            match (result, got) {
                ("valid", Ok(secret)) => {
                    ensure!(secret == expected, "tcId {id}: wrong shared secret");
                    valid += 1;
                }
                ("invalid", Err(e)) if e.status() == Some(Status::INVALID_PUBLIC_KEY) => {
                    rejected += 1
                }
                ("acceptable", Ok(secret)) => {
                    ensure!(secret == expected, "tcId {id}: wrong shared secret");
                    acceptable += 1;
                }
                ("acceptable", Err(e)) if e.status() == Some(Status::INVALID_PUBLIC_KEY) => {
                    acceptable += 1
                }
                (result, got) => return Err(anyhow!("tcId {id} ({result}): device gave {got:?}")),
            }
            drop(slot);
        }
    }
    ensure!(
        device.counter(Counter::KeySlotsLoaded) == before,
        "derivation must leave no key in a slot"
    );
    Ok(Outcome::Passed(format!(
        "{file}: {valid} valid, {rejected} invalid rejected, {acceptable} acceptable, {unexpressible} not expressible as a key share"
    )))
}

/// Every `x25519_test.json` case.
pub fn wycheproof_x25519(device: &Arc<Device>) -> Result<Outcome> {
    key_agreement_file(
        device,
        "x25519_test.json",
        PrivateKeyType::X25519,
        |private| (private.len() == 32).then(|| private.to_vec()),
        |public| (public.len() == 32).then(|| public.to_vec()),
    )
}

/// DER prefix of a P-256 SubjectPublicKeyInfo with an uncompressed point.
const P256_SPKI_PREFIX: &str = "3059301306072a8648ce3d020106082a8648ce3d030107034200";

/// Every `ecdh_secp256r1_test.json` case whose public key is a P-256 SPKI with an
/// uncompressed point (the form a TLS key share has); the others are counted.
pub fn wycheproof_ecdh_p256(device: &Arc<Device>) -> Result<Outcome> {
    let prefix = hex::decode(P256_SPKI_PREFIX)?;
    key_agreement_file(
        device,
        "ecdh_secp256r1_test.json",
        PrivateKeyType::ECDH_P256,
        |private| {
            // Big-endian scalar, sometimes with a leading zero byte or shorter than 32.
            let trimmed: Vec<u8> = private.iter().copied().skip_while(|&b| b == 0).collect();
            (trimmed.len() <= 32).then(|| {
                let mut scalar = vec![0u8; 32 - trimmed.len()];
                scalar.extend_from_slice(&trimmed);
                scalar
            })
        },
        |public| {
            let point = public.strip_prefix(prefix.as_slice())?;
            (point.len() == 65 && point[0] == 4).then(|| point.to_vec())
        },
    )
}

/// ECDSA P-256/P-384 and RSA-PSS signatures made by the device verify with aws-lc-rs on
/// the host; the device's signature counter moves.
pub fn device_signatures_verify_independently(device: &Arc<Device>) -> Result<Outcome> {
    let mut pair = pke_queue(device)?;
    let rng = SystemRandom::new();
    let signatures_before = device.counter(Counter::Signatures);
    let message = b"TLS 1.3, server CertificateVerify";
    let mut made = 0;
    for (kind, signing, verifying, hash) in [
        (
            PrivateKeyType::ECDSA_P256,
            &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &signature::ECDSA_P256_SHA256_ASN1,
            &digest::SHA256,
        ),
        (
            PrivateKeyType::ECDSA_P384,
            &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
            &signature::ECDSA_P384_SHA384_ASN1,
            &digest::SHA384,
        ),
    ] {
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(signing, &rng).map_err(|_| anyhow!("keygen"))?;
        let public = EcdsaKeyPair::from_pkcs8(signing, pkcs8.as_ref())
            .map_err(|_| anyhow!("key"))?
            .public_key()
            .as_ref()
            .to_vec();
        let slot = device.load_private_key(kind, pkcs8.as_ref())?;
        for round in 0..4u8 {
            let mut text = message.to_vec();
            text.push(round);
            let digest = digest::digest(hash, &text);
            let sig = transform(device, &mut pair, digest.as_ref(), 128, |src, dst| {
                JobOp::EcdsaSign {
                    slot: slot.slot_ref(),
                    digest: src,
                    dst,
                }
            })?
            .map_err(|e| anyhow!("{kind:?} sign: {e}"))?;
            signature::UnparsedPublicKey::new(verifying, &public)
                .verify(&text, &sig)
                .map_err(|_| anyhow!("{kind:?}: device signature does not verify"))?;
            made += 1;
        }
    }

    let file = load_json("rsa_pkcs1_2048_sig_gen_test.json")?;
    let pkcs8 = hex_field(&file["testGroups"][0], "privateKeyPkcs8")?;
    let public = RsaKeyPair::from_pkcs8(&pkcs8)
        .map_err(|_| anyhow!("RSA key"))?
        .public_key()
        .as_ref()
        .to_vec();
    let slot = device.load_private_key(PrivateKeyType::RSA, &pkcs8)?;
    let digest = digest::digest(&digest::SHA256, message);
    let mut previous = Vec::new();
    for _ in 0..2 {
        let sig = transform(device, &mut pair, digest.as_ref(), 256, |src, dst| {
            JobOp::RsaSign {
                slot: slot.slot_ref(),
                padding: RsaPadding::PSS,
                hash: HashAlgorithm::SHA256,
                digest: src,
                dst,
            }
        })?
        .map_err(|e| anyhow!("RSA-PSS sign: {e}"))?;
        signature::UnparsedPublicKey::new(&signature::RSA_PSS_2048_8192_SHA256, &public)
            .verify(message, &sig)
            .map_err(|_| anyhow!("RSA-PSS: device signature does not verify"))?;
        ensure!(sig != previous, "PSS signatures must be randomized");
        previous = sig;
        made += 1;
    }
    ensure!(
        device.counter(Counter::Signatures) - signatures_before == made,
        "the device's signature counter did not count every signature"
    );
    // A digest of the wrong length for the key is refused, not signed.
    let ecdsa = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| anyhow!("keygen"))?;
    let slot = device.load_private_key(PrivateKeyType::ECDSA_P256, ecdsa.as_ref())?;
    let wrong = transform(device, &mut pair, &[0u8; 48], 128, |src, dst| {
        JobOp::EcdsaSign {
            slot: slot.slot_ref(),
            digest: src,
            dst,
        }
    })?;
    ensure!(
        wrong.as_ref().err().and_then(|e| e.status()) == Some(Status::LENGTH_ERROR),
        "a 48-byte digest for a P-256 key gave {wrong:?}"
    );
    ensure!(
        device
            .load_private_key(PrivateKeyType::RSA, b"garbage")
            .is_err(),
        "garbage key material was accepted"
    );
    Ok(Outcome::Passed(format!(
        "{made} device signatures verified on the host"
    )))
}

/// Key pairs generated on the device agree with the host's, and the private half never
/// leaves: after the derivation the slot is empty.
pub fn device_key_exchange_agrees_with_the_host(device: &Arc<Device>) -> Result<Outcome> {
    let mut pair = pke_queue(device)?;
    let before = device.counter(Counter::KeySlotsLoaded);
    for (kind, algorithm) in [
        (PrivateKeyType::X25519, &agreement::X25519),
        (PrivateKeyType::ECDH_P256, &agreement::ECDH_P256),
    ] {
        let slot: KeySlot = device.reserve_key_slot()?;
        let share_len = kind.key_share_len().context("key share length")?;
        let device_share = transform(device, &mut pair, &[], share_len, |_, dst| {
            JobOp::KxGenerate {
                slot: slot.slot_ref(),
                kind,
                dst,
            }
        })?
        .map_err(|e| anyhow!("{kind:?} generate: {e}"))?;
        ensure!(device.counter(Counter::KeySlotsLoaded) == before + 1);
        let host = agreement::PrivateKey::generate(algorithm).map_err(|_| anyhow!("host key"))?;
        let host_public = host
            .compute_public_key()
            .map_err(|_| anyhow!("host public"))?;
        let host_secret = agreement::agree(
            &host,
            agreement::UnparsedPublicKey::new(algorithm, &device_share),
            anyhow!("host agreement"),
            |s| Ok(s.to_vec()),
        )?;
        let device_secret = transform(device, &mut pair, host_public.as_ref(), 32, |src, dst| {
            JobOp::KxDerive {
                slot: slot.slot_ref(),
                peer: src,
                dst,
            }
        })?
        .map_err(|e| anyhow!("{kind:?} derive: {e}"))?;
        ensure!(device_secret == host_secret, "{kind:?}: secrets differ");
        ensure!(
            device.counter(Counter::KeySlotsLoaded) == before,
            "{kind:?}: the private key stayed in its slot after the derivation"
        );
        let again = transform(device, &mut pair, host_public.as_ref(), 32, |src, dst| {
            JobOp::KxDerive {
                slot: slot.slot_ref(),
                peer: src,
                dst,
            }
        })?;
        ensure!(
            again.as_ref().err().and_then(|e| e.status()) == Some(Status::SLOT_EMPTY),
            "{kind:?}: a second derivation gave {again:?}"
        );
    }
    Ok(Outcome::Passed(
        "X25519 and P-256 key pairs generated and used once".into(),
    ))
}

/// A burst of RSA signatures on the public-key queue does not hold up record crypto: a seal
/// submitted after the burst completes before the device could have worked through one
/// fetched burst of signatures.
pub fn public_key_bursts_do_not_hold_up_records(device: &Arc<Device>) -> Result<Outcome> {
    let file = load_json("rsa_pkcs1_2048_sig_gen_test.json")?;
    let pkcs8 = hex_field(&file["testGroups"][0], "privateKeyPkcs8")?;
    let rsa = device.load_private_key(PrivateKeyType::RSA, &pkcs8)?;
    let mut pke = device.queue(QueueConfig {
        size: 256,
        public_key: true,
        ..QueueConfig::default()
    })?;
    let mut records = device.queue(QueueConfig {
        size: 16,
        ..QueueConfig::default()
    })?;
    let aead = device.load_key(&tlsaccel_driver::KeyMaterial::raw(
        tlsaccel_driver::abi::AeadAlgorithm::AES_128_GCM,
        &[1; 16],
    )?)?;
    let digest = device.pool().alloc(32)?;
    let outputs: Vec<_> = (0..8)
        .map(|_| device.pool().alloc(256))
        .collect::<Result<_, _>>()?;
    let burst: Vec<tlsaccel_driver::Job> = (0..200u64)
        .map(|i| tlsaccel_driver::Job {
            user_data: i,
            op: JobOp::RsaSign {
                slot: rsa.slot_ref(),
                padding: RsaPadding::PKCS1_V15,
                hash: HashAlgorithm::SHA256,
                digest: digest.whole(),
                dst: outputs[i as usize % 8].whole(),
            },
        })
        .collect();
    ensure!(pke.submit(&burst)? == burst.len());
    let plain = device.pool().alloc(64)?;
    let sealed = device.pool().alloc(80)?;
    let record = run_one(
        &mut records,
        JobOp::AeadSeal {
            slot: aead.slot_ref(),
            nonce: [0; 12],
            aad: None,
            src: plain.whole(),
            dst: sealed.whole(),
        },
    )?;
    ensure!(record.is_ok(), "the record job failed: {record:?}");
    let mut signed = 0usize;
    pke.poll(|c| signed += usize::from(c.result.is_ok()));
    let queued_when_sealed = burst.len() - signed;
    // An engine shared by both queues would finish a whole fetched burst of signatures (32
    // descriptors) before it reached the record queue.
    ensure!(
        signed < 32,
        "{signed} signatures finished before the record job: records waited behind handshakes"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while pke.outstanding() > 0 {
        ensure!(
            std::time::Instant::now() < deadline,
            "the signature burst did not finish"
        );
        pke.poll(|c| signed += usize::from(c.result.is_ok()));
    }
    ensure!(
        signed == burst.len(),
        "{signed} of {} signatures succeeded",
        burst.len()
    );
    Ok(Outcome::Passed(format!(
        "a record sealed while {queued_when_sealed} of 200 RSA signatures were still queued"
    )))
}

/// RSA 3072 and 4096 keys (made by the system's `openssl`) load, and their PSS signatures
/// verify on the host; a 1024-bit key is refused.
pub fn rsa_key_sizes(device: &Arc<Device>) -> Result<Outcome> {
    let mut pair = pke_queue(device)?;
    let mut checked = Vec::new();
    for (bits, accepted) in [(3072u32, true), (4096, true), (1024, false)] {
        // genpkey's DER is PKCS#1; the device takes PKCS#8.
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:{bits} | openssl pkcs8 -topk8 -nocrypt -outform DER"
            ))
            .output();
        let der = match out {
            Ok(out) if out.status.success() => out.stdout,
            _ => {
                return Ok(Outcome::Skipped(
                    "needs the openssl command to make RSA keys".into(),
                ))
            }
        };
        let loaded = device.load_private_key(PrivateKeyType::RSA, &der);
        if !accepted {
            ensure!(loaded.is_err(), "a {bits}-bit RSA key was accepted");
            continue;
        }
        let slot = loaded.with_context(|| format!("{bits}-bit key"))?;
        let public = RsaKeyPair::from_pkcs8(&der)
            .map_err(|_| anyhow!("host cannot read the {bits}-bit key"))?
            .public_key()
            .as_ref()
            .to_vec();
        let message = b"CertificateVerify";
        let digest = digest::digest(&digest::SHA384, message);
        let sig = transform(device, &mut pair, digest.as_ref(), 512, |src, dst| {
            JobOp::RsaSign {
                slot: slot.slot_ref(),
                padding: RsaPadding::PSS,
                hash: HashAlgorithm::SHA384,
                digest: src,
                dst,
            }
        })?
        .map_err(|e| anyhow!("{bits}-bit sign: {e}"))?;
        ensure!(
            sig.len() * 8 == bits as usize,
            "{bits}-bit key made a {}-byte signature",
            sig.len()
        );
        signature::UnparsedPublicKey::new(&signature::RSA_PSS_2048_8192_SHA384, &public)
            .verify(message, &sig)
            .map_err(|_| anyhow!("{bits}-bit device signature does not verify"))?;
        checked.push(bits);
    }
    Ok(Outcome::Passed(format!(
        "RSA {checked:?} signed and verified; 1024 refused"
    )))
}
