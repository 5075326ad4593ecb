//! A real rustls client talking to a server whose record layer the device takes over: an
//! in-memory handshake, then the server's traffic secrets are extracted so the device can
//! seal what the client reads and open what the client writes.

use std::io::{Read, Write};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use rustls::crypto::aws_lc_rs;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConnection, ConnectionTrafficSecrets, ServerConnection};
use tlsaccel_driver::abi::AeadAlgorithm;

/// TLS protocol versions the suite covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

/// One direction's traffic key, as extracted from rustls.
#[derive(Debug, Clone)]
pub struct TrafficKey {
    pub algorithm: AeadAlgorithm,
    pub key: Vec<u8>,
    pub iv: [u8; 12],
    pub sequence: u64,
}

/// A client connected to an extracted server.
#[derive(Debug)]
pub struct Peer {
    pub client: ClientConnection,
    /// The server's sending key (what the client decrypts).
    pub server_tx: TrafficKey,
    /// The server's receiving key (what the client encrypts).
    pub server_rx: TrafficKey,
    pub version: TlsVersion,
}

/// The suite names the conformance suite runs for each version.
pub const SUITES: [AeadAlgorithm; 3] = [
    AeadAlgorithm::AES_128_GCM,
    AeadAlgorithm::AES_256_GCM,
    AeadAlgorithm::CHACHA20_POLY1305,
];

fn suite_for(
    version: TlsVersion,
    algorithm: AeadAlgorithm,
) -> Result<rustls::SupportedCipherSuite> {
    use aws_lc_rs::cipher_suite as cs;
    Ok(match (version, algorithm) {
        (TlsVersion::Tls13, AeadAlgorithm::AES_128_GCM) => cs::TLS13_AES_128_GCM_SHA256,
        (TlsVersion::Tls13, AeadAlgorithm::AES_256_GCM) => cs::TLS13_AES_256_GCM_SHA384,
        (TlsVersion::Tls13, AeadAlgorithm::CHACHA20_POLY1305) => cs::TLS13_CHACHA20_POLY1305_SHA256,
        (TlsVersion::Tls12, AeadAlgorithm::AES_128_GCM) => {
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        }
        (TlsVersion::Tls12, AeadAlgorithm::AES_256_GCM) => {
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        }
        (TlsVersion::Tls12, AeadAlgorithm::CHACHA20_POLY1305) => {
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        }
        _ => bail!("no suite for {algorithm:?}"),
    })
}

fn traffic_key(sequence: u64, secrets: ConnectionTrafficSecrets) -> Result<TrafficKey> {
    let (algorithm, key, iv) = match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (AeadAlgorithm::AES_128_GCM, key, iv),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (AeadAlgorithm::AES_256_GCM, key, iv),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (AeadAlgorithm::CHACHA20_POLY1305, key, iv)
        }
        _ => bail!("unexpected traffic secret kind"),
    };
    Ok(TrafficKey {
        algorithm,
        key: key.as_ref().to_vec(),
        iv: iv.as_ref().try_into().context("IV is not 12 bytes")?,
        sequence,
    })
}

/// Moves whatever `from` has to send into `to` and lets `to` process it.
fn pump_to_client(server: &mut ServerConnection, client: &mut ClientConnection) -> Result<bool> {
    let mut wire = Vec::new();
    while server.wants_write() {
        server.write_tls(&mut wire)?;
    }
    if wire.is_empty() {
        return Ok(false);
    }
    client.read_tls(&mut &wire[..])?;
    client.process_new_packets()?;
    Ok(true)
}

fn pump_to_server(client: &mut ClientConnection, server: &mut ServerConnection) -> Result<bool> {
    let mut wire = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut wire)?;
    }
    if wire.is_empty() {
        return Ok(false);
    }
    server.read_tls(&mut &wire[..])?;
    server.process_new_packets()?;
    Ok(true)
}

/// Runs a handshake for `version` and `algorithm` and extracts the server's secrets.
pub fn connect(version: TlsVersion, algorithm: AeadAlgorithm) -> Result<Peer> {
    let issued = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let cert = CertificateDer::from(issued.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(issued.signing_key.serialize_der()));
    let mut provider = aws_lc_rs::default_provider();
    provider.cipher_suites = vec![suite_for(version, algorithm)?];
    let provider = Arc::new(provider);
    let versions: &[&rustls::SupportedProtocolVersion] = match version {
        TlsVersion::Tls12 => &[&rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let mut server_config = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)?;
    server_config.enable_secret_extraction = true;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut server = ServerConnection::new(Arc::new(server_config))?;
    let mut client =
        ClientConnection::new(Arc::new(client_config), ServerName::try_from("localhost")?)?;
    for _ in 0..20 {
        let moved =
            pump_to_server(&mut client, &mut server)? | pump_to_client(&mut server, &mut client)?;
        if !moved && !client.is_handshaking() && !server.is_handshaking() {
            break;
        }
    }
    if client.is_handshaking() || server.is_handshaking() {
        bail!("handshake did not finish");
    }
    let secrets = server
        .dangerous_extract_secrets()
        .map_err(|e| anyhow!("secret extraction failed: {e}"))?;
    Ok(Peer {
        client,
        server_tx: traffic_key(secrets.tx.0, secrets.tx.1)?,
        server_rx: traffic_key(secrets.rx.0, secrets.rx.1)?,
        version,
    })
}

impl Peer {
    /// Feeds records sealed by the device to the client; returns the plaintext it read.
    pub fn client_receive(&mut self, records: &[u8]) -> Result<Vec<u8>> {
        let mut plain = Vec::new();
        for record in split_records(records)? {
            let mut input = &record[..];
            while !input.is_empty() {
                self.client.read_tls(&mut input)?;
            }
            self.client
                .process_new_packets()
                .map_err(|e| anyhow!("client rejected a device record: {e}"))?;
            match self.client.reader().read_to_end(&mut plain) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(plain)
    }

    /// Has the client send `data`; returns the records it wrote, split one per entry.
    pub fn client_send(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.client.writer().write_all(data)?;
        let mut wire = Vec::new();
        while self.client.wants_write() {
            self.client.write_tls(&mut wire)?;
        }
        split_records(&wire)
    }
}

/// Splits a byte stream into whole TLS records.
pub fn split_records(mut wire: &[u8]) -> Result<Vec<Vec<u8>>> {
    let mut records = Vec::new();
    while !wire.is_empty() {
        if wire.len() < 5 {
            bail!("truncated record header");
        }
        let len = usize::from(u16::from_be_bytes([wire[3], wire[4]]));
        let total = 5 + len;
        if wire.len() < total {
            bail!("truncated record");
        }
        records.push(wire[..total].to_vec());
        wire = &wire[total..];
    }
    Ok(records)
}
