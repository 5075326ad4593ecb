//! TLS server set-up and the handshake engine.
//!
//! A listener's `ServerConfig` picks its certificate by SNI (exact name, then `*.` wildcard,
//! then the default). The handshake runs rustls' unbuffered server API on the connection's
//! task: socket I/O is async, and `Handshake::advance`, the sans-I/O step that drives
//! rustls until it needs the network, runs on a fiber (`tlsaccel-fiber`) when handshakes
//! are offloaded: a signature or key exchange on the device pauses the fiber while the task
//! awaits the device's answer, so no thread waits for the device and no other connection
//! waits for this one. Once rustls reports
//! `WriteTraffic` (the session tickets are written by then), the connection is turned into a
//! `KernelConnection` plus traffic secrets for the record layer.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use rustls::crypto::CryptoProvider;
use rustls::kernel::KernelConnection;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::UnbufferedServerConnection;
use rustls::server::{ClientHello, ResolvesServerCert, ServerConnectionData};
use rustls::sign::CertifiedKey;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{AlertDescription, ExtractedSecrets, HandshakeKind, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config;
use crate::record::Version;

/// Most bytes a client may send before its handshake completes.
const MAX_HANDSHAKE_BYTES: usize = 64 * 1024;

/// Certificates by server name.
#[derive(Debug, Default)]
pub struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` stored as `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl SniResolver {
    /// Loads a listener's certificates; keys go through `provider`'s key provider (the
    /// device's, when there is one).
    pub fn load(
        certificates: &[config::Certificate],
        base: &Path,
        provider: &CryptoProvider,
    ) -> anyhow::Result<Self> {
        let mut resolver = Self::default();
        for cert in certificates {
            let chain_path = base.join(cert.chain.get_ref());
            let key_path = base.join(cert.key.get_ref());
            let chain = CertificateDer::pem_file_iter(&chain_path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .with_context(|| format!("reading certificate chain {}", chain_path.display()))?;
            anyhow::ensure!(
                !chain.is_empty(),
                "{} holds no certificate",
                chain_path.display()
            );
            let key = PrivateKeyDer::from_pem_file(&key_path)
                .with_context(|| format!("reading private key {}", key_path.display()))?;
            let signing = provider
                .key_provider
                .load_private_key(key)
                .with_context(|| format!("loading private key {}", key_path.display()))?;
            let certified = Arc::new(CertifiedKey::new(chain, signing));
            certified
                .keys_match()
                .with_context(|| format!("{} does not match its chain", key_path.display()))?;
            if cert.sni.is_empty() {
                resolver.default = Some(Arc::clone(&certified));
            }
            for name in &cert.sni {
                let name = name.to_ascii_lowercase();
                match name.strip_prefix("*.") {
                    Some(suffix) => resolver
                        .wildcard
                        .insert(suffix.to_owned(), Arc::clone(&certified)),
                    None => resolver.exact.insert(name, Arc::clone(&certified)),
                };
            }
        }
        Ok(resolver)
    }

    fn find(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = name.map(str::to_ascii_lowercase) else {
            return self.default.clone();
        };
        if let Some(key) = self.exact.get(&name) {
            return Some(Arc::clone(key));
        }
        let wildcard = name
            .split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent));
        wildcard.cloned().or_else(|| self.default.clone())
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.find(hello.server_name())
    }
}

/// Resolves through a listener's [`SniResolver`] and remembers the name the client asked for
/// (the unbuffered connection does not expose it).
#[derive(Debug)]
struct Capture {
    inner: Arc<SniResolver>,
    server_name: Arc<Mutex<Option<String>>>,
}

impl ResolvesServerCert for Capture {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name().map(str::to_owned);
        let found = self.inner.find(name.as_deref());
        *self.server_name.lock().unwrap_or_else(|e| e.into_inner()) = name;
        found
    }
}

/// A listener's TLS settings.
#[derive(Debug)]
pub struct ListenerTls {
    /// The config (and its client-certificate verifier) new connections get: replaced when
    /// the client CA or CRL files change.
    current: std::sync::RwLock<Current>,
    versions: Vec<&'static rustls::SupportedProtocolVersion>,
    /// Client certificates, when the listener asks for them.
    pub client_auth: Option<crate::identity::ClientAuth>,
    resolver: Arc<SniResolver>,
    /// Handshakes run on fibers: the provider's signatures and key exchanges may wait for a
    /// device.
    fibers: bool,
}

impl ListenerTls {
    /// Builds the `ServerConfig` of `listener`.
    /// `offloaded`: the provider's signatures and key exchanges go to a device.
    pub fn new(
        listener: &config::Listener,
        base: &Path,
        provider: &Arc<CryptoProvider>,
        offloaded: bool,
        resumption: &Arc<crate::cluster::Resumption>,
        shares_sessions: bool,
    ) -> anyhow::Result<Self> {
        let mut provider = (**provider).clone();
        if !listener.cipher_suites.get_ref().is_empty() {
            provider.cipher_suites.retain(|suite| {
                let name = format!("{:?}", suite.suite());
                listener.cipher_suites.get_ref().contains(&name)
            });
            anyhow::ensure!(
                !provider.cipher_suites.is_empty(),
                "listener {}: none of its cipher_suites is available",
                listener.name.get_ref()
            );
        }
        let versions: Vec<&'static rustls::SupportedProtocolVersion> = listener
            .tls_versions
            .get_ref()
            .iter()
            .map(|v| {
                if v == "1.3" {
                    &rustls::version::TLS13
                } else {
                    &rustls::version::TLS12
                }
            })
            .collect();
        let resolver = Arc::new(SniResolver::load(&listener.certificates, base, &provider)?);
        let provider = Arc::new(provider);
        let client_auth = crate::identity::ClientAuth::new(listener.client_auth.as_ref(), base);
        let verifier = client_auth
            .as_ref()
            .map(|auth| auth.verifier(&provider))
            .transpose()?;
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&versions)?;
        let builder = match &verifier {
            Some(verifier) => builder.with_client_cert_verifier(Arc::clone(verifier)),
            None => builder.with_no_client_auth(),
        };
        let mut config =
            builder.with_cert_resolver(Arc::clone(&resolver) as Arc<dyn ResolvesServerCert>);
        config.enable_secret_extraction = true;
        config.alpn_protocols = listener
            .alpn
            .iter()
            .map(|p| p.as_bytes().to_vec())
            .collect();
        config.max_early_data_size = 0;
        config.ticketer = resumption.ticketer();
        config.session_storage = resumption.session_storage();
        Ok(Self {
            current: std::sync::RwLock::new(Current {
                config: Arc::new(config),
                verifier,
            }),
            versions,
            client_auth,
            resolver,
            fibers: offloaded || shares_sessions,
        })
    }

    fn current(&self) -> Current {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the client CA and CRL files again when they changed since they were last read,
    /// and gives new connections a verifier built from them; connections already made are
    /// left alone. `None`: nothing changed (or no client certificates are asked for);
    /// `Some(Err)`: the files are unusable and the verifier in use stays.
    pub fn reload_client_auth(&self) -> Option<anyhow::Result<()>> {
        let auth = self.client_auth.as_ref()?;
        if !auth.files_changed() {
            return None;
        }
        let old = self.current();
        let provider = Arc::clone(old.config.crypto_provider());
        let verifier = match auth.verifier(&provider) {
            Ok(verifier) => verifier,
            Err(error) => return Some(Err(error)),
        };
        let built = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&self.versions)
            .map(|b| {
                b.with_client_cert_verifier(Arc::clone(&verifier))
                    .with_cert_resolver(Arc::clone(&self.resolver) as Arc<dyn ResolvesServerCert>)
            });
        let mut config = match built {
            Ok(config) => config,
            Err(error) => return Some(Err(error.into())),
        };
        config.enable_secret_extraction = true;
        config.alpn_protocols = old.config.alpn_protocols.clone();
        config.max_early_data_size = old.config.max_early_data_size;
        config.ticketer = Arc::clone(&old.config.ticketer);
        config.session_storage = Arc::clone(&old.config.session_storage);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Current {
            config: Arc::new(config),
            verifier: Some(verifier),
        };
        Some(Ok(()))
    }

    /// The client's identity after a handshake on this listener, or the alert that refuses
    /// the client: a listener that requires a certificate refuses a session without one,
    /// and a resumed session's certificate is checked again against today's CAs and CRLs
    /// (rustls resumes a session without looking at its certificate).
    pub fn client_identity(
        &self,
        established: &Established,
    ) -> Result<Option<Arc<crate::identity::PeerIdentity>>, AlertDescription> {
        let Some(auth) = &self.client_auth else {
            return Ok(None);
        };
        let Some((end_entity, intermediates)) = established.peer_chain.split_first() else {
            return if auth.required() {
                Err(AlertDescription::CertificateRequired)
            } else {
                Ok(None)
            };
        };
        if established.resumed {
            let verifier = self.current().verifier;
            if let Some(verifier) = verifier {
                if let Err(error) = verifier.verify_client_cert(
                    end_entity,
                    intermediates,
                    rustls::pki_types::UnixTime::now(),
                ) {
                    return Err(alert_for(&error));
                }
            }
        }
        Ok(Some(Arc::new(crate::identity::PeerIdentity::from_der(
            end_entity,
        ))))
    }

    /// A config for one connection, whose resolver records the requested server name.
    fn for_connection(&self) -> (Arc<ServerConfig>, Arc<Mutex<Option<String>>>) {
        let server_name = Arc::new(Mutex::new(None));
        let mut config = (*self.current().config).clone();
        config.cert_resolver = Arc::new(Capture {
            inner: Arc::clone(&self.resolver),
            server_name: Arc::clone(&server_name),
        });
        (Arc::new(config), server_name)
    }
}

/// What new connections of a listener get.
#[derive(Debug, Clone)]
struct Current {
    config: Arc<ServerConfig>,
    /// The client-certificate verifier in `config`, when there is one.
    verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
}

/// The alert for a client certificate that fails verification: the one rustls sends for
/// the same error during a handshake.
fn alert_for(error: &rustls::Error) -> AlertDescription {
    match error {
        rustls::Error::InvalidCertificate(e) => AlertDescription::from(e.clone()),
        _ => AlertDescription::BadCertificate,
    }
}

/// When a handshake failed over the client's certificate, the alert that said so.
pub fn client_certificate_refusal(error: &HandshakeError) -> Option<AlertDescription> {
    match error {
        HandshakeError::Tls {
            error: rustls::Error::NoCertificatesPresented,
            ..
        } => Some(AlertDescription::CertificateRequired),
        HandshakeError::Tls {
            error: error @ rustls::Error::InvalidCertificate(_),
            ..
        } => Some(alert_for(error)),
        _ => None,
    }
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS: {error}")]
    Tls {
        error: rustls::Error,
        /// The alert rustls produced for it, if one was sent and could be read (alerts
        /// sent under handshake keys are sent but not readable here).
        alert: Option<AlertDescription>,
    },
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("the client closed the connection during the handshake")]
    Closed,
    #[error("the client sent more than {MAX_HANDSHAKE_BYTES} bytes of handshake")]
    TooLarge,
    #[error("could not encode a handshake message: {0}")]
    Encode(String),
}

impl HandshakeError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            HandshakeError::Tls { .. } => "tls",
            HandshakeError::Io(_) => "io",
            HandshakeError::Closed => "closed",
            HandshakeError::TooLarge => "too_large",
            HandshakeError::Encode(_) => "internal",
        }
    }
}

impl HandshakeError {
    /// The alert the client was sent, when known.
    pub fn alert_sent(&self) -> Option<AlertDescription> {
        match self {
            HandshakeError::Tls { alert, .. } => *alert,
            _ => None,
        }
    }
}

impl From<rustls::Error> for HandshakeError {
    fn from(error: rustls::Error) -> Self {
        HandshakeError::Tls { error, alert: None }
    }
}

/// A completed handshake, handed to the record layer.
pub struct Established {
    pub secrets: ExtractedSecrets,
    pub kernel: KernelConnection<ServerConnectionData>,
    pub version: Version,
    pub suite: String,
    pub resumed: bool,
    pub server_name: Option<String>,
    pub alpn: Option<Vec<u8>>,
    /// Bytes read past the handshake: the start of the record stream.
    pub leftover: Vec<u8>,
    /// Application data rustls already decrypted.
    pub early_plaintext: Vec<u8>,
    /// The client's certificate chain (end entity first), when it sent one or the resumed
    /// session had one.
    pub peer_chain: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for Established {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Established")
            .field("version", &self.version)
            .field("suite", &self.suite)
            .field("resumed", &self.resumed)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Runs `f`, which may block on the device, without stalling the runtime's other tasks
/// (on a multi-threaded runtime; on a current-thread one it simply runs).
pub fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Writes what is still unsent of the handshake (`unsent`) and the records rustls queued
/// after an error (its alert), within a short time. Returns the alert when it was sent in
/// the clear (before handshake keys), so it can be counted.
///
/// `incoming` is what the handshake had offered rustls and not yet discarded: rustls may
/// still refer to it (when no alert was queued and it reads on).
async fn send_pending_alert(
    conn: &mut UnbufferedServerConnection,
    incoming: &mut [u8],
    stream: &mut TcpStream,
    unsent: &[u8],
) -> Option<AlertDescription> {
    let mut out = unsent.to_vec();
    let start = out.len();
    // One call: rustls hands out the alert it queued for the error before it looks at the
    // input again. A second call would deframe once more — the failed record again (and
    // a second fatal alert), or ranges of a flight it no longer holds.
    let encoded = {
        let UnbufferedStatus { state, .. } = conn.process_tls_records(incoming);
        match state {
            Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                let mut record = vec![0; 64];
                match encode.encode(&mut record) {
                    Ok(n) => Some(record[..n].to_vec()),
                    Err(EncodeError::InsufficientSize(size)) => {
                        record.resize(size.required_size, 0);
                        encode
                            .encode(&mut record)
                            .ok()
                            .map(|n| record[..n].to_vec())
                    }
                    Err(_) => None,
                }
            }
            _ => None,
        }
    };
    if let Some(record) = encoded {
        out.extend_from_slice(&record);
    }
    if out.len() == start {
        return None;
    }
    let sent = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
    .await;
    // A plaintext alert record: type 21, two bytes of body.
    if matches!(sent, Ok(Ok(()))) {
        linger(stream).await;
    }
    let alert = &out[start..];
    match (sent, alert) {
        (Ok(Ok(())), [21, 3, _, 0, 2, _, description, ..]) => {
            Some(AlertDescription::from(*description))
        }
        _ => None,
    }
}

/// How long, and for how many bytes, a failed handshake's socket keeps reading after its
/// alert and FIN.
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

/// A lingering close, as nginx's `lingering_close`: reads and discards what the client still
/// sends (the records it sent behind its last flight) until it closes, for a short time. A
/// socket closed with unread bytes answers with a reset, and a reset can make the client's
/// kernel drop the alert it has not read yet.
async fn linger(stream: &mut TcpStream) {
    let _ = tokio::time::timeout(LINGER_TIME, async {
        let mut sink = [0u8; 4096];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// The sans-I/O part of a handshake: rustls' connection and the bytes on their way in and
/// out.
struct Handshake {
    conn: UnbufferedServerConnection,
    incoming: Vec<u8>,
    outgoing: Vec<u8>,
    /// Bytes of `outgoing` waiting to be written.
    pending: usize,
    /// Bytes at the start of `incoming` offered to rustls so far (whole records).
    offered: usize,
    early_plaintext: Vec<u8>,
}

/// How much of `buf` to offer rustls when it has been offered `offered` bytes and wants
/// more: up to the end of the next record, or all of `buf` when that record is not complete
/// yet (rustls then asks for more again). `buf` starts at a record boundary (rustls discards
/// whole records); `offered` may end inside an incomplete record.
fn offer_more(buf: &[u8], offered: usize) -> usize {
    let mut at = 0;
    loop {
        let Some(header) = buf.get(at..at + 5) else {
            return buf.len();
        };
        let end = at + 5 + usize::from(u16::from_be_bytes([header[3], header[4]]));
        if end > buf.len() {
            return buf.len();
        }
        if end > offered {
            return end;
        }
        at = end;
    }
}

/// What a handshake needs from the network next.
enum Next {
    /// Write `outgoing[..pending]`.
    Transmit,
    /// Read more of the client's bytes into `incoming`.
    Input,
    /// The handshake is complete.
    Done,
}

impl Handshake {
    /// Drives rustls until it needs the network: encodes what it produces, collects early
    /// plaintext, and stops at data to transmit, a need for input, or the end. Signatures
    /// and key exchanges happen in here.
    ///
    /// rustls is offered the client's records one at a time (`offered`), so the handshake
    /// ends at the client's Finished: records the client sent behind it stay in `incoming`
    /// for the record session and its limits, instead of being read by rustls as traffic
    /// during the handshake.
    fn advance(&mut self) -> Result<Next, HandshakeError> {
        loop {
            let offered = self.offered;
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut self.incoming[..offered]);
            self.offered = offered - discard;
            let state = match state {
                Ok(state) => state,
                Err(error) => {
                    // rustls may still hold ranges of the records behind the failed one
                    // (a client's Certificate, CertificateVerify and Finished arrive
                    // together): the buffer it is given for the alert must match them.
                    self.incoming.drain(..discard);
                    return Err(HandshakeError::Tls { error, alert: None });
                }
            };
            let next = match state {
                ConnectionState::EncodeTlsData(mut encode) => loop {
                    match encode.encode(&mut self.outgoing[self.pending..]) {
                        Ok(n) => {
                            self.pending += n;
                            break None;
                        }
                        Err(EncodeError::InsufficientSize(size)) => {
                            self.outgoing.resize(self.pending + size.required_size, 0);
                        }
                        Err(other) => return Err(HandshakeError::Encode(other.to_string())),
                    }
                },
                ConnectionState::TransmitTlsData(transmit) => {
                    // rustls only needs to know the bytes are taken; the caller writes them
                    // before anything else happens on this connection.
                    transmit.done();
                    Some(Next::Transmit)
                }
                ConnectionState::BlockedHandshake => {
                    // rustls wants more: the next record if one is here, else the network.
                    let more = offer_more(&self.incoming, offered);
                    if more > offered {
                        self.offered = more - discard;
                        None
                    } else {
                        Some(Next::Input)
                    }
                }
                ConnectionState::ReadTraffic(mut read) => {
                    while let Some(record) = read.next_record() {
                        let record =
                            record.map_err(|error| HandshakeError::Tls { error, alert: None })?;
                        self.early_plaintext.extend_from_slice(record.payload);
                    }
                    None
                }
                ConnectionState::WriteTraffic(_) => Some(Next::Done),
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    return Err(HandshakeError::Closed)
                }
                // Early data is not accepted (max_early_data_size = 0); anything else is new.
                _ => return Err(HandshakeError::Closed),
            };
            self.incoming.drain(..discard);
            if let Some(next) = next {
                return Ok(next);
            }
        }
    }
}

/// Runs the server side of a handshake on `stream`.
///
/// `initial` holds bytes of the client's already read (what followed a PROXY header).
pub async fn handshake(
    stream: &mut TcpStream,
    listener: &ListenerTls,
    mut initial: Vec<u8>,
) -> Result<Established, HandshakeError> {
    let (config, server_name) = listener.for_connection();
    initial.reserve(4096);
    let mut hs = Box::new(Handshake {
        conn: UnbufferedServerConnection::new(config)?,
        incoming: initial,
        outgoing: vec![0; 4096],
        pending: 0,
        offered: 0,
        early_plaintext: Vec::new(),
    });
    loop {
        let next = if listener.fibers {
            let (back, next) = tlsaccel_fiber::run(move || {
                let next = hs.advance();
                (hs, next)
            })
            .await;
            hs = back;
            next
        } else {
            // On the CPU rustls blocks no longer than nginx would.
            hs.advance()
        };
        match next {
            Ok(Next::Transmit) => {
                stream.write_all(&hs.outgoing[..hs.pending]).await?;
                hs.pending = 0;
            }
            Ok(Next::Input) => {
                if hs.incoming.len() >= MAX_HANDSHAKE_BYTES {
                    return Err(HandshakeError::TooLarge);
                }
                hs.incoming.reserve(4096);
                if stream.read_buf(&mut hs.incoming).await? == 0 {
                    return Err(HandshakeError::Closed);
                }
            }
            Ok(Next::Done) => break,
            Err(HandshakeError::Tls { error, .. }) => {
                // rustls queued the alert for this error: it goes out before the close.
                let Handshake {
                    conn,
                    incoming,
                    outgoing,
                    pending,
                    offered,
                    ..
                } = &mut *hs;
                incoming.truncate(*offered);
                let alert = send_pending_alert(conn, incoming, stream, &outgoing[..*pending]).await;
                return Err(HandshakeError::Tls { error, alert });
            }
            Err(other) => return Err(other),
        }
    }
    let Handshake {
        conn,
        incoming,
        early_plaintext,
        ..
    } = *hs;
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => Version::Tls13,
        _ => Version::Tls12,
    };
    let suite = conn
        .negotiated_cipher_suite()
        .map_or_else(|| "unknown".to_owned(), |s| format!("{:?}", s.suite()));
    let resumed = conn.handshake_kind() == Some(HandshakeKind::Resumed);
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let peer_chain = conn
        .peer_certificates()
        .map(<[_]>::to_vec)
        .unwrap_or_default();
    let (secrets, kernel) = conn.dangerous_into_kernel_connection()?;
    let server_name = server_name.lock().unwrap_or_else(|e| e.into_inner()).take();
    Ok(Established {
        secrets,
        kernel,
        version,
        suite,
        resumed,
        server_name,
        alpn,
        leftover: incoming,
        early_plaintext,
        peer_chain,
    })
}

#[cfg(test)]
mod tests {
    use super::offer_more;

    #[test]
    fn the_handshake_is_offered_one_record_at_a_time() {
        // Two records of 3 and 2 bytes, then 4 bytes of a third (its header says 10).
        let mut buf = vec![22, 3, 3, 0, 3, 1, 2, 3, 23, 3, 3, 0, 2, 9, 9];
        buf.extend_from_slice(&[23, 3, 3, 0, 10, 1, 2, 3, 4]);
        assert_eq!(offer_more(&buf, 0), 8, "the first record");
        assert_eq!(offer_more(&buf, 8), 15, "then the second");
        assert_eq!(
            offer_more(&buf, 15),
            buf.len(),
            "an incomplete record: all there is"
        );
        assert_eq!(offer_more(&buf, buf.len()), buf.len(), "nothing more");
        // Offered part of a record that has since arrived whole: up to its end.
        buf.extend_from_slice(&[5, 6, 7, 8, 9, 10, 0xff]);
        assert_eq!(offer_more(&buf, 20), 30);
        assert_eq!(offer_more(&[22, 3], 0), 2, "a partial header");
        assert_eq!(offer_more(&[], 0), 0);
    }
}
