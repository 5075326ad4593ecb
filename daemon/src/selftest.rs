//! Known-answer tests of a device: every algorithm in every mode, with results a table can
//! show. The answers are published vectors (the GCM specification's test cases, RFC 8439
//! section 2.8.2, RFC 7748 section 6.1, RFC 5903 section 8.1) and TLS records computed once
//! with OpenSSL from fixed keys; none of them comes from this project's own code. Signatures,
//! being randomized (ECDSA, PSS) or keyed by keys made here, are checked by verifying them on
//! the host.

use std::sync::Arc;
use std::time::Duration;

use tlsaccel_driver::abi::{
    AeadAlgorithm, Capabilities, HashAlgorithm, KeyDirection, PrivateKeyType, RecordProtocol,
    RsaPadding, Status, NONCE_LEN,
};
use tlsaccel_driver::{
    Device, Job, JobError, JobOp, JobOutput, KeyMaterial, QueueConfig, QueuePair,
};

type CheckResult = Result<(), String>;

/// One row of the result table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub algorithm: &'static str,
    pub mode: &'static str,
    /// `Ok` or why the check failed.
    pub result: Result<(), String>,
}

struct AeadKat {
    algorithm: AeadAlgorithm,
    source: &'static str,
    key: &'static str,
    nonce: &'static str,
    aad: &'static str,
    plaintext: &'static str,
    sealed: &'static str,
}

const AEAD_KATS: &[AeadKat] = &[
    AeadKat {
        algorithm: AeadAlgorithm::AES_128_GCM,
        source: "GCM spec test case 2",
        key: "00000000000000000000000000000000",
        nonce: "000000000000000000000000",
        aad: "",
        plaintext: "00000000000000000000000000000000",
        sealed: "0388dace60b6a392f328c2b971b2fe78ab6e47d42cec13bdf53a67b21257bddf",
    },
    AeadKat {
        algorithm: AeadAlgorithm::AES_256_GCM,
        source: "GCM spec test case 14",
        key: "0000000000000000000000000000000000000000000000000000000000000000",
        nonce: "000000000000000000000000",
        aad: "",
        plaintext: "00000000000000000000000000000000",
        sealed: "cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919",
    },
    AeadKat {
        algorithm: AeadAlgorithm::CHACHA20_POLY1305,
        source: "RFC 8439 2.8.2",
        key: "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f",
        nonce: "070000004041424344454647",
        aad: "50515253c0c1c2c3c4c5c6c7",
        plaintext: "4c616469657320616e642047656e746c656d656e206f662074686520636c617373206f66202739393a204966204920636f756c64206f6666657220796f75206f6e6c79206f6e652074697020666f7220746865206675747572652c2073756e73637265656e20776f756c642062652069742e",
        sealed: "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d63dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b3692ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc3ff4def08e4b7a9de576d26586cec64b61161ae10b594f09e26a7e902ecbd0600691",
    },
];

/// Fixed inputs of the record KATs: key byte i is `7i + 1`, IV byte i is `0xa0 + i`, sequence
/// 0x0102030405060708, plaintext below. TLS 1.3 records carry inner type 22 and 3 bytes of
/// padding; TLS 1.2 records type 23.
const RECORD_PLAINTEXT: &[u8] = b"tlsaccel selftest record";
const RECORD_SEQUENCE: u64 = 0x0102_0304_0506_0708;
const TLS13_INNER_TYPE: u8 = 22;
const TLS13_PADDING: u16 = 3;
const TLS12_TYPE: u8 = 23;

struct RecordKat {
    algorithm: AeadAlgorithm,
    tls13: &'static str,
    tls12: &'static str,
}

const RECORD_KATS: &[RecordKat] = &[
    RecordKat {
        algorithm: AeadAlgorithm::AES_128_GCM,
        tls13: "170303002cf8f0ec79d5116be6365a4a36bc3e171eef6c11e877c837025c6e7aeeb501dcc27d5c2ba79aa4ec05db14813c",
        tls12: "1703030030a5a7a5a3adafada3f8f0ec79d5116be6365a4a36bc3e171eef6c11e877c83702f831d865cce14b6934be37420b75eb3b",
    },
    RecordKat {
        algorithm: AeadAlgorithm::AES_256_GCM,
        tls13: "170303002cca44de25e2d6d6a42c1b26998e18aaf91980b7fc9bf432a0c75c7c7179cdb909d4cb8e3d2a9484db25f4cdec",
        tls12: "1703030030a5a7a5a3adafada3ca44de25e2d6d6a42c1b26998e18aaf91980b7fc9bf432a0e9f95bd67df3d090a4da7aaf19836657",
    },
    RecordKat {
        algorithm: AeadAlgorithm::CHACHA20_POLY1305,
        tls13: "170303002c48b6a19e2756dde346cdbcc6072448bed05f5e2a609cccae64f3a39af312d1133a75d1ef068647eb67142903",
        tls12: "170303002848b6a19e2756dde346cdbcc6072448bed05f5e2a609cccaea997e3c2eb45785cbae224fa706d5edc",
    },
];

const JOB_TIMEOUT: Duration = Duration::from_secs(5);

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    hex::decode(s).map_err(|e| format!("bad vector: {e}"))
}

fn name(algorithm: AeadAlgorithm) -> &'static str {
    algorithm.name().unwrap_or("unknown")
}

/// Everything a check needs: the device and one data queue.
struct Tester<'a> {
    device: &'a Arc<Device>,
    pair: QueuePair,
}

impl Tester<'_> {
    fn run(&mut self, op: JobOp) -> Result<Result<JobOutput, JobError>, String> {
        let mut result = Err(JobError::DeviceLost);
        self.pair
            .run(&[Job { user_data: 1, op }], JOB_TIMEOUT, |done| {
                result = done.result
            })
            .map_err(|e| e.to_string())?;
        Ok(result)
    }

    /// Runs `op` reading `input` and returns what it wrote.
    fn transform(
        &mut self,
        input: &[u8],
        aad: &[u8],
        make: impl FnOnce(
            tlsaccel_driver::DmaSpan,
            Option<tlsaccel_driver::DmaSpan>,
            tlsaccel_driver::DmaSpan,
        ) -> JobOp,
    ) -> Result<Result<(Vec<u8>, u8), JobError>, String> {
        let pool = self.device.pool();
        let src = pool.alloc(input.len().max(1)).map_err(|e| e.to_string())?;
        src.write(0, input).map_err(|e| e.to_string())?;
        let aad_buf = pool.alloc(aad.len().max(1)).map_err(|e| e.to_string())?;
        aad_buf.write(0, aad).map_err(|e| e.to_string())?;
        let dst = pool.alloc(input.len() + 512).map_err(|e| e.to_string())?;
        let src_span = src.span(0, input.len()).map_err(|e| e.to_string())?;
        let aad_span = (!aad.is_empty()).then(|| aad_buf.whole());
        let op = make(src_span, aad_span, dst.whole());
        Ok(match self.run(op)? {
            Ok(out) => Ok((
                dst.to_vec(0, out.len as usize).map_err(|e| e.to_string())?,
                out.content_type,
            )),
            Err(e) => Err(e),
        })
    }
}

fn expect_bytes(got: Result<(Vec<u8>, u8), JobError>, want: &[u8]) -> Result<(), String> {
    match got {
        Ok((bytes, _)) if bytes == want => Ok(()),
        Ok((bytes, _)) => Err(format!("output differs: got {}", hex::encode(bytes))),
        Err(e) => Err(e.to_string()),
    }
}

fn expect_auth_failure(got: Result<(Vec<u8>, u8), JobError>) -> Result<(), String> {
    match got {
        Err(e) if e.status() == Some(Status::AUTH_FAILED) => Ok(()),
        Err(e) => Err(format!("expected AUTH_FAILED, got {e}")),
        Ok(_) => Err("a tampered input was accepted".into()),
    }
}

fn aead_checks(t: &mut Tester<'_>, kat: &AeadKat, out: &mut Vec<Check>) {
    let algorithm = name(kat.algorithm);
    let prepared = (|| -> Result<_, String> {
        let key = unhex(kat.key)?;
        let nonce: [u8; NONCE_LEN] = unhex(kat.nonce)?
            .try_into()
            .map_err(|_| "nonce is not 12 bytes".to_string())?;
        let material = KeyMaterial::raw(kat.algorithm, &key).map_err(|e| e.to_string())?;
        let slot = t.device.load_key(&material).map_err(|e| e.to_string())?;
        Ok((
            slot,
            nonce,
            unhex(kat.aad)?,
            unhex(kat.plaintext)?,
            unhex(kat.sealed)?,
        ))
    })();
    let (slot, nonce, aad, plaintext, sealed) = match prepared {
        Ok(p) => p,
        Err(e) => {
            for mode in ["aead seal", "aead open", "aead tampered open"] {
                out.push(Check {
                    algorithm,
                    mode,
                    result: Err(e.clone()),
                });
            }
            return;
        }
    };
    let seal = t
        .transform(&plaintext, &aad, |src, aad, dst| JobOp::AeadSeal {
            slot: slot.slot_ref(),
            nonce,
            aad,
            src,
            dst,
        })
        .and_then(|got| expect_bytes(got, &sealed));
    out.push(Check {
        algorithm,
        mode: "aead seal",
        result: seal.map_err(|e| format!("{e} ({})", kat.source)),
    });
    let open = t
        .transform(&sealed, &aad, |src, aad, dst| JobOp::AeadOpen {
            slot: slot.slot_ref(),
            nonce,
            aad,
            src,
            dst,
        })
        .and_then(|got| expect_bytes(got, &plaintext));
    out.push(Check {
        algorithm,
        mode: "aead open",
        result: open,
    });
    let mut tampered = sealed.clone();
    if let Some(first) = tampered.first_mut() {
        *first ^= 1;
    }
    let tamper = t
        .transform(&tampered, &aad, |src, aad, dst| JobOp::AeadOpen {
            slot: slot.slot_ref(),
            nonce,
            aad,
            src,
            dst,
        })
        .and_then(expect_auth_failure);
    out.push(Check {
        algorithm,
        mode: "aead tampered open",
        result: tamper,
    });
}

fn record_material(
    algorithm: AeadAlgorithm,
    protocol: RecordProtocol,
    direction: KeyDirection,
) -> Result<KeyMaterial, String> {
    let key_len = algorithm.key_len().ok_or("unknown algorithm")?;
    let key: Vec<u8> = (0..key_len).map(|i| (i * 7 + 1) as u8).collect();
    let iv: [u8; NONCE_LEN] = std::array::from_fn(|i| 0xa0 + i as u8);
    KeyMaterial::new(algorithm, protocol, direction, &key, iv, RECORD_SEQUENCE)
        .map_err(|e| e.to_string())
}

fn record_checks(t: &mut Tester<'_>, kat: &RecordKat, out: &mut Vec<Check>) {
    let algorithm = name(kat.algorithm);
    for (protocol, expected_hex, seal_mode, open_mode) in [
        (
            RecordProtocol::TLS13,
            kat.tls13,
            "tls1.3 seal",
            "tls1.3 open",
        ),
        (
            RecordProtocol::TLS12,
            kat.tls12,
            "tls1.2 seal",
            "tls1.2 open",
        ),
    ] {
        let outcome = (|| -> Result<(CheckResult, CheckResult), String> {
            let expected = unhex(expected_hex)?;
            let sealer = t
                .device
                .load_key(&record_material(
                    kat.algorithm,
                    protocol,
                    KeyDirection::SEAL,
                )?)
                .map_err(|e| e.to_string())?;
            let opener = t
                .device
                .load_key(&record_material(
                    kat.algorithm,
                    protocol,
                    KeyDirection::OPEN,
                )?)
                .map_err(|e| e.to_string())?;
            let (s, o, alg) = (sealer.slot_ref(), opener.slot_ref(), kat.algorithm);
            let sealed = t.transform(RECORD_PLAINTEXT, &[], |src, _, dst| match protocol {
                RecordProtocol::TLS13 => JobOp::Tls13Seal {
                    slot: s.clone(),
                    content_type: TLS13_INNER_TYPE,
                    padding: TLS13_PADDING,
                    src,
                    dst,
                },
                _ => JobOp::Tls12Seal {
                    slot: s.clone(),
                    algorithm: alg,
                    content_type: TLS12_TYPE,
                    src,
                    dst,
                },
            })?;
            let seal = expect_bytes(sealed, &expected);
            let open_op = |src, _, dst| match protocol {
                RecordProtocol::TLS13 => JobOp::Tls13Open {
                    slot: o.clone(),
                    src,
                    dst,
                },
                _ => JobOp::Tls12Open {
                    slot: o.clone(),
                    algorithm: alg,
                    src,
                    dst,
                },
            };
            let opened = t.transform(&expected, &[], open_op)?;
            let want_type = if protocol == RecordProtocol::TLS13 {
                TLS13_INNER_TYPE
            } else {
                TLS12_TYPE
            };
            let open = match opened {
                Ok((bytes, ty)) if bytes == RECORD_PLAINTEXT && ty == want_type => Ok(()),
                Ok((bytes, ty)) => Err(format!("opened to type {ty}, {}", hex::encode(bytes))),
                Err(e) => Err(e.to_string()),
            };
            // The opener's sequence has moved on: the same record again must fail.
            let replay = t.transform(&expected, &[], open_op)?;
            let open = open.and_then(|()| {
                expect_auth_failure(replay).map_err(|e| format!("replayed record: {e}"))
            });
            Ok((seal, open))
        })();
        let (seal, open) = match outcome {
            Ok(pair) => pair,
            Err(e) => (Err(e.clone()), Err(e)),
        };
        out.push(Check {
            algorithm,
            mode: seal_mode,
            result: seal,
        });
        out.push(Check {
            algorithm,
            mode: open_mode,
            result: open,
        });
    }
}

/// RFC 7748 section 6.1: Alice's private key, Bob's public key, their shared secret.
const X25519_PRIVATE: &str = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a";
const X25519_PEER: &str = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f";
const X25519_SHARED: &str = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742";
/// RFC 5903 section 8.1 (256-bit random ECP group): the initiator's private scalar, the
/// responder's public point, and the shared x-coordinate.
const P256_PRIVATE: &str = "c88f01f510d9ac3f70a292daa2316de544e9aab8afe84049c62a9c57862d1433";
const P256_PEER: &str = "04d12dfb5289c8d4f81208b70270398c342296970a0bccb74c736fc7554494bf6356fbf3ca366cc23e8157854c13c58d6aac23f046ada30f8353e74f33039872ab";
const P256_SHARED: &str = "d6840f6b42f6edafd13116e0e12565202fef8e9ece7dce03812464d04b9442de";

/// Public-key checks: key agreement against published answers; signatures (randomized, so
/// without a fixed answer) made with keys generated here and verified on the host.
fn public_key_checks(device: &Arc<Device>, out: &mut Vec<Check>) {
    use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
    let mut pair = match device.queue(QueueConfig {
        size: 16,
        public_key: true,
        ..QueueConfig::default()
    }) {
        Ok(pair) => pair,
        Err(e) => {
            out.push(Check {
                algorithm: "-",
                mode: "public-key queue",
                result: Err(e.to_string()),
            });
            return;
        }
    };
    type MakeJob<'a> =
        Box<dyn FnOnce(tlsaccel_driver::DmaSpan, tlsaccel_driver::DmaSpan) -> JobOp + 'a>;
    let mut run = |make: MakeJob<'_>, out_len: usize, input: &[u8]| -> Result<Vec<u8>, String> {
        let src = device
            .pool()
            .alloc(input.len().max(1))
            .map_err(|e| e.to_string())?;
        src.write(0, input).map_err(|e| e.to_string())?;
        let dst = device.pool().alloc(out_len).map_err(|e| e.to_string())?;
        let span = src.span(0, input.len()).map_err(|e| e.to_string())?;
        let op = make(span, dst.whole());
        let mut result = Err(JobError::DeviceLost);
        pair.run(&[Job { user_data: 1, op }], JOB_TIMEOUT, |done| {
            result = done.result
        })
        .map_err(|e| e.to_string())?;
        let output = result.map_err(|e| e.to_string())?;
        dst.to_vec(0, output.len as usize)
            .map_err(|e| e.to_string())
    };

    for (algorithm, kind, private, peer, shared) in [
        (
            "X25519",
            PrivateKeyType::X25519,
            X25519_PRIVATE,
            X25519_PEER,
            X25519_SHARED,
        ),
        (
            "ECDH_P256",
            PrivateKeyType::ECDH_P256,
            P256_PRIVATE,
            P256_PEER,
            P256_SHARED,
        ),
    ] {
        let result = (|| -> Result<(), String> {
            let slot = device
                .load_private_key(kind, &unhex(private)?)
                .map_err(|e| e.to_string())?;
            let got = run(
                Box::new(|peer, dst| JobOp::KxDerive {
                    slot: slot.slot_ref(),
                    peer,
                    dst,
                }),
                32,
                &unhex(peer)?,
            )?;
            if got != unhex(shared)? {
                return Err(format!("shared secret differs: {}", hex::encode(got)));
            }
            Ok(())
        })();
        out.push(Check {
            algorithm,
            mode: "key agreement",
            result,
        });
    }
    let bad_peer = (|| -> Result<(), String> {
        let slot = device
            .load_private_key(PrivateKeyType::X25519, &unhex(X25519_PRIVATE)?)
            .map_err(|e| e.to_string())?;
        match run(
            Box::new(|peer, dst| JobOp::KxDerive {
                slot: slot.slot_ref(),
                peer,
                dst,
            }),
            32,
            &[0u8; 32],
        ) {
            Err(e) if e.contains("INVALID_PUBLIC_KEY") => Ok(()),
            Err(e) => Err(format!("expected INVALID_PUBLIC_KEY, got {e}")),
            Ok(_) => Err("a small-order peer key gave a secret".into()),
        }
    })();
    out.push(Check {
        algorithm: "X25519",
        mode: "bad peer key",
        result: bad_peer,
    });

    let message = b"tlsaccel selftest signature";
    let ecdsa = (|| -> Result<(), String> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .map_err(|_| "key generation failed".to_string())?;
        let public =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref())
                .map_err(|_| "key parse failed".to_string())?
                .public_key()
                .as_ref()
                .to_vec();
        let slot = device
            .load_private_key(PrivateKeyType::ECDSA_P256, pkcs8.as_ref())
            .map_err(|e| e.to_string())?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, message);
        let sig = run(
            Box::new(|digest, dst| JobOp::EcdsaSign {
                slot: slot.slot_ref(),
                digest,
                dst,
            }),
            72,
            digest.as_ref(),
        )?;
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, &public)
            .verify(message, &sig)
            .map_err(|_| "signature does not verify".to_string())
    })();
    out.push(Check {
        algorithm: "ECDSA_P256",
        mode: "sign",
        result: ecdsa,
    });

    let rsa = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
        .map_err(|_| "RSA key generation failed".to_string());
    for (mode, padding, encoding) in [
        (
            "pkcs1 sign",
            RsaPadding::PKCS1_V15,
            &signature::RSA_PKCS1_2048_8192_SHA256,
        ),
        (
            "pss sign",
            RsaPadding::PSS,
            &signature::RSA_PSS_2048_8192_SHA256,
        ),
    ] {
        let result = rsa.as_ref().map_err(Clone::clone).and_then(|key| {
            let der: aws_lc_rs::encoding::Pkcs8V1Der<'static> =
                aws_lc_rs::encoding::AsDer::as_der(key)
                    .map_err(|_| "RSA key export failed".to_string())?;
            let slot = device
                .load_private_key(PrivateKeyType::RSA, der.as_ref())
                .map_err(|e| e.to_string())?;
            let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, message);
            let sig = run(
                Box::new(|digest, dst| JobOp::RsaSign {
                    slot: slot.slot_ref(),
                    padding,
                    hash: HashAlgorithm::SHA256,
                    digest,
                    dst,
                }),
                256,
                digest.as_ref(),
            )?;
            signature::UnparsedPublicKey::new(encoding, key.public_key().as_ref())
                .verify(message, &sig)
                .map_err(|_| "signature does not verify".to_string())
        });
        out.push(Check {
            algorithm: "RSA_2048",
            mode,
            result,
        });
    }
}

/// Runs every known-answer test on `device`.
pub fn run(device: &Arc<Device>) -> Result<Vec<Check>, tlsaccel_driver::DeviceError> {
    let pair = device.queue(QueueConfig {
        size: 64,
        ..QueueConfig::default()
    })?;
    let mut tester = Tester { device, pair };
    let mut checks = Vec::new();
    let nop = tester.run(JobOp::Nop);
    checks.push(Check {
        algorithm: "-",
        mode: "nop",
        result: match nop {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e),
        },
    });
    for kat in AEAD_KATS {
        aead_checks(&mut tester, kat, &mut checks);
    }
    for kat in RECORD_KATS {
        record_checks(&mut tester, kat, &mut checks);
    }
    let public_key = Capabilities::X25519
        | Capabilities::ECDH_P256
        | Capabilities::ECDSA_P256
        | Capabilities::RSA;
    if device.info().capabilities.contains(public_key) {
        public_key_checks(device, &mut checks);
    }
    Ok(checks)
}

/// Formats the checks as a table.
pub fn table(checks: &[Check]) -> String {
    let mut text = format!("{:<20} {:<20} {}\n", "ALGORITHM", "MODE", "RESULT");
    for check in checks {
        let result = match &check.result {
            Ok(()) => "pass".to_string(),
            Err(e) => format!("FAIL: {e}"),
        };
        text.push_str(&format!(
            "{:<20} {:<20} {}\n",
            check.algorithm, check.mode, result
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_check_passes_on_the_simulator() {
        let device = Device::open("sim:queues=3,engines=1,key-slots=64").unwrap();
        let checks = run(&device).unwrap();
        assert_eq!(checks.len(), 1 + 3 * 3 + 3 * 4 + 6);
        let failed: Vec<_> = checks.iter().filter(|c| c.result.is_err()).collect();
        assert!(failed.is_empty(), "{}", table(&checks));
    }

    #[test]
    fn a_device_that_corrupts_tags_fails_the_seal_checks() {
        let device = Device::open("sim:queues=3,engines=1,key-slots=64").unwrap();
        let sim = device.transport().simulator().unwrap();
        sim.inject(tlsaccel_sim::Fault::CorruptNextTag);
        let checks = run(&device).unwrap();
        let failed: Vec<_> = checks.iter().filter(|c| c.result.is_err()).collect();
        assert_eq!(failed.len(), 1, "{}", table(&checks));
        assert_eq!(failed[0].mode, "aead seal");
        assert!(table(&checks).contains("FAIL"));
    }
}
