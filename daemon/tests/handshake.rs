//! Full TLS handshakes between a stock rustls client and a server whose signatures and key
//! exchanges run on the device (`tlsaccel::handshake`), checked by the device's own counters;
//! and the CPU fallback when the device fails.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConnection, ServerConnection};
use tlsaccel::handshake::{device_provider, PkeEngine};
use tlsaccel_driver::abi::regs::Counter;
use tlsaccel_driver::Device;

struct Identity {
    name: &'static str,
    cert: CertificateDer<'static>,
    key: Vec<u8>,
}

fn ecdsa_identity() -> Identity {
    let issued = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    Identity {
        name: "ECDSA P-256",
        cert: CertificateDer::from(issued.cert.der().to_vec()),
        key: issued.signing_key.serialize_der(),
    }
}

fn rsa_identity() -> Identity {
    let vectors =
        tlsaccel_tests::wycheproof::load_json("rsa_pkcs1_2048_sig_gen_test.json").expect("vectors");
    let der = tlsaccel_tests::wycheproof::hex_field(&vectors["testGroups"][0], "privateKeyPkcs8")
        .expect("key");
    let pkcs8 = PrivatePkcs8KeyDer::from(der.clone());
    let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_RSA_SHA256)
        .expect("RSA key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("self-signed");
    Identity {
        name: "RSA 2048",
        cert: CertificateDer::from(cert.der().to_vec()),
        key: der,
    }
}

/// Runs a handshake in memory and moves a little data each way.
fn connect(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> Result<(), String> {
    let mut server = ServerConnection::new(server).map_err(|e| e.to_string())?;
    let mut client =
        ClientConnection::new(client, ServerName::try_from("localhost").expect("name"))
            .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.is_handshaking() || server.is_handshaking() {
        if Instant::now() > deadline {
            return Err("handshake did not finish".into());
        }
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).map_err(|e| e.to_string())?;
        }
        if !wire.is_empty() {
            server.read_tls(&mut &wire[..]).map_err(|e| e.to_string())?;
            server
                .process_new_packets()
                .map_err(|e| format!("server: {e}"))?;
        }
        let mut wire = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut wire).map_err(|e| e.to_string())?;
        }
        if !wire.is_empty() {
            client.read_tls(&mut &wire[..]).map_err(|e| e.to_string())?;
            client
                .process_new_packets()
                .map_err(|e| format!("client: {e}"))?;
        }
    }
    client
        .writer()
        .write_all(b"ping")
        .map_err(|e| e.to_string())?;
    let mut wire = Vec::new();
    client.write_tls(&mut wire).map_err(|e| e.to_string())?;
    server.read_tls(&mut &wire[..]).map_err(|e| e.to_string())?;
    server.process_new_packets().map_err(|e| e.to_string())?;
    let mut got = [0u8; 4];
    server
        .reader()
        .read_exact(&mut got)
        .map_err(|e| e.to_string())?;
    if &got != b"ping" {
        return Err("data did not arrive".into());
    }
    Ok(())
}

fn server_config(
    provider: &Arc<rustls::crypto::CryptoProvider>,
    identity: &Identity,
    tls13: bool,
) -> Arc<rustls::ServerConfig> {
    let versions: &[&rustls::SupportedProtocolVersion] = if tls13 {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS12]
    };
    Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::clone(provider))
            .with_protocol_versions(versions)
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![identity.cert.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key.clone())),
            )
            .expect("server config"),
    )
}

fn client_config(identity: &Identity, group: rustls::NamedGroup) -> Arc<rustls::ClientConfig> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups.retain(|g| g.name() == group);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(identity.cert.clone()).expect("root");
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

#[test]
fn handshakes_run_their_signatures_and_key_exchanges_on_the_device() {
    let device = Device::open("sim").expect("device");
    let engine = PkeEngine::new(Arc::clone(&device)).expect("engine");
    let provider = Arc::new(device_provider(&engine));
    for identity in [ecdsa_identity(), rsa_identity()] {
        for tls13 in [true, false] {
            for group in [rustls::NamedGroup::X25519, rustls::NamedGroup::secp256r1] {
                let what = format!(
                    "{} TLS 1.{} {group:?}",
                    identity.name,
                    if tls13 { 3 } else { 2 }
                );
                let signatures = device.counter(Counter::Signatures);
                let exchanges = device.counter(Counter::KeyExchanges);
                connect(
                    server_config(&provider, &identity, tls13),
                    client_config(&identity, group),
                )
                .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(
                    device.counter(Counter::Signatures),
                    signatures + 1,
                    "{what}: signature not on the device"
                );
                assert_eq!(
                    device.counter(Counter::KeyExchanges),
                    exchanges + 2,
                    "{what}: key exchange not on the device"
                );
            }
        }
    }
    let stats = engine.stats();
    assert_eq!(
        stats
            .cpu_fallbacks
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_eq!(
        stats
            .device_signatures
            .load(std::sync::atomic::Ordering::Relaxed),
        8
    );
    drop(provider);
    assert_eq!(
        device.counter(Counter::KeySlotsLoaded),
        0,
        "no key is left in a device slot once its configuration is gone"
    );
}

#[test]
fn handshakes_fall_back_to_the_cpu_when_the_device_fails() {
    let device = Device::open("sim").expect("device");
    let engine = PkeEngine::new(Arc::clone(&device)).expect("engine");
    let provider = Arc::new(device_provider(&engine));
    let identity = ecdsa_identity();
    let server = server_config(&provider, &identity, true);
    // Full handshakes every time: a resumed one would make no signature.
    let mut client = (*client_config(&identity, rustls::NamedGroup::X25519)).clone();
    client.resumption = rustls::client::Resumption::disabled();
    let client = Arc::new(client);
    connect(Arc::clone(&server), Arc::clone(&client)).expect("handshake on the device");

    device
        .transport()
        .simulator()
        .expect("in-process")
        .inject(tlsaccel_sim::Fault::Fatal);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !device.is_lost() {
        assert!(
            Instant::now() < deadline,
            "the health watch did not notice the fatal device"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let signatures = device.counter(Counter::Signatures);
    for _ in 0..3 {
        connect(Arc::clone(&server), Arc::clone(&client)).expect("handshake on the CPU");
    }
    assert_eq!(
        device.counter(Counter::Signatures),
        signatures,
        "the failed device signed nothing"
    );
    let fallbacks = engine
        .stats()
        .cpu_fallbacks
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        fallbacks, 6,
        "every signature and key exchange fell back, and was counted"
    );
}
