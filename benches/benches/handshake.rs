//! Handshake offload, each figure next to its CPU baseline from the same run:
//! * public-key operations per second: ECDSA P-256 and RSA-2048 signatures, X25519 key
//!   exchange (generate and derive), through the device's public-key queue with the ring kept
//!   busy, against aws-lc-rs on one core;
//! * full TLS 1.3 handshakes per second, rustls client and server in this process, with the
//!   device provider against the stock aws-lc-rs provider, one at a time and 16 at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::agreement;
use aws_lc_rs::digest;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, RsaKeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tlsaccel::handshake::{device_provider, PkeEngine};
use tlsaccel_benches::{open_device, pipeline, smoke_mode};
use tlsaccel_driver::abi::{HashAlgorithm, PrivateKeyType, RsaPadding};
use tlsaccel_driver::{Device, DmaBuffer, Job, JobOp, QueueConfig};

fn pke_queue(device: &Arc<Device>) -> tlsaccel_driver::QueuePair {
    device
        .queue(QueueConfig {
            size: 256,
            public_key: true,
            ..QueueConfig::default()
        })
        .expect("a public-key queue")
}

/// Signatures per second on the device (64 in flight) for a key loaded from `pkcs8`.
fn device_signs(
    device: &Arc<Device>,
    kind: PrivateKeyType,
    pkcs8: &[u8],
    rsa: Option<(RsaPadding, HashAlgorithm)>,
    digest_len: usize,
    count: u64,
) -> f64 {
    let slot = device.load_private_key(kind, pkcs8).expect("key loads");
    let mut pair = pke_queue(device);
    let mut buffers: Vec<DmaBuffer> = Vec::new();
    let jobs: Vec<Job> = (0..64)
        .map(|i| {
            let digest = device.pool().alloc(digest_len).expect("dma");
            digest.write(0, &vec![i as u8; digest_len]).expect("dma");
            let out = device.pool().alloc(512).expect("dma");
            let (d, o) = (digest.whole(), out.whole());
            buffers.push(digest);
            buffers.push(out);
            let op = match rsa {
                None => JobOp::EcdsaSign {
                    slot: slot.slot_ref(),
                    digest: d,
                    dst: o,
                },
                Some((padding, hash)) => JobOp::RsaSign {
                    slot: slot.slot_ref(),
                    padding,
                    hash,
                    digest: d,
                    dst: o,
                },
            };
            Job { user_data: i, op }
        })
        .collect();
    let rounds = count.div_ceil(64);
    let run = pipeline(&mut pair, &jobs, 16, rounds);
    (rounds * 64) as f64 / run.wall.as_secs_f64()
}

/// X25519 exchanges per second on the device: generate a key pair, derive with a peer key.
fn device_exchanges(device: &Arc<Device>, count: u64) -> f64 {
    let peer = agreement::PrivateKey::generate(&agreement::X25519).expect("peer");
    let peer_public = peer.compute_public_key().expect("peer public");
    let mut pair = pke_queue(device);
    let slots: Vec<_> = (0..32)
        .map(|_| device.reserve_key_slot().expect("slot"))
        .collect();
    let peer_buf = device.pool().alloc(32).expect("dma");
    peer_buf.write(0, peer_public.as_ref()).expect("dma");
    let outs: Vec<DmaBuffer> = (0..64)
        .map(|_| device.pool().alloc(64).expect("dma"))
        .collect();
    let start = Instant::now();
    let mut done = 0u64;
    while done < count {
        // Generate into 32 slots, then derive in each: two doorbells for 32 exchanges.
        let generate: Vec<Job> = slots
            .iter()
            .enumerate()
            .map(|(i, s)| Job {
                user_data: i as u64,
                op: JobOp::KxGenerate {
                    slot: s.slot_ref(),
                    kind: PrivateKeyType::X25519,
                    dst: outs[i].whole(),
                },
            })
            .collect();
        let derive: Vec<Job> = slots
            .iter()
            .enumerate()
            .map(|(i, s)| Job {
                user_data: i as u64,
                op: JobOp::KxDerive {
                    slot: s.slot_ref(),
                    peer: peer_buf.whole(),
                    dst: outs[32 + i].whole(),
                },
            })
            .collect();
        for batch in [&generate, &derive] {
            let mut ok = 0;
            pair.run(batch, Duration::from_secs(10), |c| {
                ok += usize::from(c.result.is_ok())
            })
            .expect("run");
            assert_eq!(ok, batch.len(), "device key exchange failed");
        }
        done += 32;
    }
    done as f64 / start.elapsed().as_secs_f64()
}

fn cpu_rate(count: u64, mut op: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..count {
        op();
    }
    count as f64 / start.elapsed().as_secs_f64()
}

struct Identity {
    cert: CertificateDer<'static>,
    key: Vec<u8>,
}

fn identity() -> Identity {
    let issued = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    Identity {
        cert: CertificateDer::from(issued.cert.der().to_vec()),
        key: issued.signing_key.serialize_der(),
    }
}

fn handshake(server: &Arc<rustls::ServerConfig>, client: &Arc<rustls::ClientConfig>) {
    let mut server = rustls::ServerConnection::new(Arc::clone(server)).expect("server");
    let mut client = rustls::ClientConnection::new(
        Arc::clone(client),
        ServerName::try_from("localhost").expect("name"),
    )
    .expect("client");
    while client.is_handshaking() || server.is_handshaking() {
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).expect("write");
        }
        if !wire.is_empty() {
            server.read_tls(&mut &wire[..]).expect("read");
            server.process_new_packets().expect("server handshake");
        }
        let mut wire = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut wire).expect("write");
        }
        if !wire.is_empty() {
            client.read_tls(&mut &wire[..]).expect("read");
            client.process_new_packets().expect("client handshake");
        }
    }
}

/// Handshakes per second with `threads` handshake threads, `per_thread` each.
fn handshakes(
    provider: Arc<rustls::crypto::CryptoProvider>,
    id: &Identity,
    threads: usize,
    per_thread: usize,
) -> f64 {
    let server = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![id.cert.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key.clone())),
            )
            .expect("server config"),
    );
    let mut client_provider = rustls::crypto::aws_lc_rs::default_provider();
    client_provider
        .kx_groups
        .retain(|g| g.name() == rustls::NamedGroup::X25519);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(id.cert.clone()).expect("root");
    let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(client_provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.resumption = rustls::client::Resumption::disabled();
    let client = Arc::new(client);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let (server, client) = (&server, &client);
            scope.spawn(move || {
                for _ in 0..per_thread {
                    handshake(server, client);
                }
            });
        }
    });
    (threads * per_thread) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let device = open_device();
    let rng = SystemRandom::new();
    let scale = if smoke_mode() { 1 } else { 20 };
    println!(
        "handshake offload ({}; device = simulator engines on this machine's cores)",
        device.info().name
    );

    let ecdsa = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .expect("key");
    let ecdsa_cpu =
        EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, ecdsa.as_ref())
            .expect("key");
    let digest = digest::digest(&digest::SHA256, b"bench");
    let n = 200 * scale;
    let dev = device_signs(
        &device,
        PrivateKeyType::ECDSA_P256,
        ecdsa.as_ref(),
        None,
        32,
        n,
    );
    let cpu = cpu_rate(n, || {
        std::hint::black_box(ecdsa_cpu.sign_digest(&digest).expect("sign"));
    });
    println!(
        "{:>28} {:>10.0}/s device {:>10.0}/s cpu  ratio {:.2}",
        "ECDSA P-256 sign",
        dev,
        cpu,
        dev / cpu
    );

    let rsa = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("rsa");
    let rsa_der: aws_lc_rs::encoding::Pkcs8V1Der<'static> =
        aws_lc_rs::encoding::AsDer::as_der(&rsa).expect("pkcs8");
    let n = 10 * scale;
    let dev = device_signs(
        &device,
        PrivateKeyType::RSA,
        rsa_der.as_ref(),
        Some((RsaPadding::PSS, HashAlgorithm::SHA256)),
        32,
        n,
    );
    let mut sig = vec![0u8; rsa.public_modulus_len()];
    let cpu = cpu_rate(n, || {
        rsa.sign_digest(&signature::RSA_PSS_SHA256, &digest, &mut sig)
            .expect("sign")
    });
    println!(
        "{:>28} {:>10.0}/s device {:>10.0}/s cpu  ratio {:.2}",
        "RSA-2048 PSS sign",
        dev,
        cpu,
        dev / cpu
    );

    let n = 96 * scale;
    let dev = device_exchanges(&device, n);
    let peer = agreement::PrivateKey::generate(&agreement::X25519).expect("peer");
    let peer_public = peer.compute_public_key().expect("public");
    let cpu = cpu_rate(n, || {
        let mine = agreement::PrivateKey::generate(&agreement::X25519).expect("key");
        std::hint::black_box(mine.compute_public_key().expect("public"));
        agreement::agree(
            &mine,
            agreement::UnparsedPublicKey::new(&agreement::X25519, peer_public.as_ref()),
            (),
            |s| Ok(s.len()),
        )
        .expect("agree");
    });
    println!(
        "{:>28} {:>10.0}/s device {:>10.0}/s cpu  ratio {:.2}",
        "X25519 exchange",
        dev,
        cpu,
        dev / cpu
    );

    let id = identity();
    let engine = PkeEngine::new(Arc::clone(&device)).expect("engine");
    let offload = Arc::new(device_provider(&engine));
    let stock = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    for threads in [1usize, 16] {
        let per_thread = (if threads == 1 { 40 } else { 5 }) * scale as usize / 4 + 1;
        let dev = handshakes(Arc::clone(&offload), &id, threads, per_thread);
        let cpu = handshakes(Arc::clone(&stock), &id, threads, per_thread);
        println!(
            "{:>28} {:>10.0}/s device {:>10.0}/s cpu  ratio {:.2}",
            format!("TLS 1.3 handshakes x{threads}"),
            dev,
            cpu,
            dev / cpu
        );
    }
    let stats = engine.stats();
    println!(
        "device signatures {}, device key exchanges {}, CPU fallbacks {}",
        stats
            .device_signatures
            .load(std::sync::atomic::Ordering::Relaxed),
        stats
            .device_key_exchanges
            .load(std::sync::atomic::Ordering::Relaxed),
        stats
            .cpu_fallbacks
            .load(std::sync::atomic::Ordering::Relaxed)
    );
}
