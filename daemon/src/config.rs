//! The daemon's configuration: TOML, strictly validated.
//!
//! Every table refuses unknown keys; every error names the file, the line and the key, and
//! says what is wrong. [`Config::parse`] checks syntax, types and meaning (names unique,
//! references resolvable, addresses and limits sane) without touching the file system;
//! [`Config::load`] also checks that the certificate and key files it names can be read.
//! `examples/tlsaccel.toml` documents every key.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

/// A configuration that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {message}")]
    Read { file: PathBuf, message: String },
    #[error("{file}:{line}:{column}: {message}")]
    Syntax {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{file}:{line}: {key}: {message}")]
    Invalid {
        file: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Threads that run connections (default: one per core). Handshake crypto that waits
    /// on the device runs on extra blocking threads.
    pub worker_threads: Option<Spanned<u32>>,
    /// On SIGTERM, how long open connections may finish before they are closed.
    #[serde(default = "default_drain")]
    pub drain_timeout_ms: Spanned<u64>,
    /// Where clients connect.
    #[serde(default, rename = "listener")]
    pub listeners: Vec<Listener>,
    /// Accelerators to use, in order of preference.
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceSection>,
    /// When record crypto goes to the device and when it stays on the CPU.
    #[serde(default)]
    pub offload: Offload,
    /// How much a connected peer may do that costs us work but carries no data.
    #[serde(default)]
    pub peer_limits: PeerLimits,
    /// Groups of backend servers.
    #[serde(default, rename = "pool")]
    pub pools: Vec<Pool>,
    /// Which pool serves which SNI name / ALPN protocol on which listener.
    #[serde(default, rename = "route")]
    pub routes: Vec<Route>,
    /// Metrics and status endpoint.
    pub admin: Option<Admin>,
    /// Session resumption: ticket keys and the session cache.
    #[serde(default)]
    pub resumption: Resumption,
    /// HTTP mode: priority levels, highest first.
    #[serde(default, rename = "priority")]
    pub priorities: Vec<Priority>,
    /// HTTP mode's shared settings.
    #[serde(default)]
    pub http: HttpSettings,
    /// The audit log of access decisions (off without this section).
    pub audit: Option<Audit>,
}

/// `[audit]`: one JSON line per access decision (docs/identity.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Audit {
    /// The file, relative to this file; appended to, renamed to `<file>.<UTC time>` when
    /// full. Either this or `syslog`.
    pub file: Option<Spanned<String>>,
    /// A local syslog socket (`/dev/log`): each record one RFC 5424 datagram.
    pub syslog: Option<Spanned<String>>,
    /// Records held in memory for the writer at most.
    #[serde(default = "default_audit_queue")]
    pub queue: Spanned<u32>,
    /// Rotate once the file is this large.
    #[serde(default = "default_audit_max_bytes")]
    pub max_bytes: Spanned<u64>,
    /// A full queue: `block` (the decision waits for room) or `refuse` (the client is
    /// refused: `internal_error` alert or 503).
    #[serde(default = "default_audit_on_full")]
    pub on_full: Spanned<AuditOnFull>,
}

/// What an access decision does when the audit queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditOnFull {
    Block,
    Refuse,
}

/// `[http]`: the buffer pool that holds request bodies while a server is chosen and
/// answers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// The pool's smallest size (it halves down to this when little is in use).
    #[serde(default = "default_buffer_min")]
    pub buffer_pool_min_kib: Spanned<u64>,
    /// Its cap: requests that do not fit wait, then get 503.
    #[serde(default = "default_buffer_max")]
    pub buffer_pool_max_kib: Spanned<u64>,
    /// How long a request waits for room at the cap.
    #[serde(default = "default_buffer_wait")]
    pub buffer_wait_ms: Spanned<u64>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            buffer_pool_min_kib: default_buffer_min(),
            buffer_pool_max_kib: default_buffer_max(),
            buffer_wait_ms: default_buffer_wait(),
        }
    }
}

fn default_buffer_min() -> Spanned<u64> {
    spanned(1024)
}
fn default_buffer_max() -> Spanned<u64> {
    spanned(256 * 1024)
}
fn default_buffer_wait() -> Spanned<u64> {
    spanned(1000)
}

/// An HTTP-mode priority level (the order in the file is the order of priority).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Priority {
    pub name: Spanned<String>,
    /// Client addresses (CIDR ranges or single addresses) of this level. A client is of the
    /// first level that names it or that names no clients (a catch-all); of the last level
    /// when none does. A level below a catch-all is for listeners that pin it.
    #[serde(default = "no_suites")]
    pub clients: Spanned<Vec<String>>,
    /// When a pool's response time passes this, requests of this level and the levels below
    /// it are held back; absent: never on this level's account.
    pub response_time_ms: Option<Spanned<u64>>,
    /// Longest a held-back request waits for a place before it is answered 503.
    #[serde(default = "default_max_wait")]
    pub max_wait_ms: Spanned<u64>,
}

/// A TLS listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: Spanned<String>,
    /// `ip:port`.
    pub address: Spanned<String>,
    /// Certificates, chosen by SNI; one without `sni` is the default.
    #[serde(default, rename = "certificate")]
    pub certificates: Vec<Certificate>,
    /// ALPN protocols offered, in preference order.
    #[serde(default)]
    pub alpn: Vec<String>,
    /// `"1.2"` and/or `"1.3"`.
    #[serde(default = "default_versions")]
    pub tls_versions: Spanned<Vec<String>>,
    /// Cipher suites offered, by IANA name (`TLS13_AES_128_GCM_SHA256`,
    /// `TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384`, ...); empty: every suite.
    #[serde(default = "no_suites")]
    pub cipher_suites: Spanned<Vec<String>>,
    /// The pool for connections no route matches.
    pub default_pool: Option<Spanned<String>>,
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_ms: Spanned<u64>,
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_ms: Spanned<u64>,
    #[serde(default = "default_max_connections")]
    pub max_connections: Spanned<u32>,
    /// TCP keepalive idle time; 0 turns keepalive off.
    #[serde(default = "default_keepalive")]
    pub tcp_keepalive_s: Spanned<u32>,
    /// Clamp the TCP maximum segment size (bytes).
    pub tcp_mss: Option<Spanned<u32>>,
    /// Sources (CIDR ranges) whose connections start with a PROXY protocol v1 or v2 header
    /// (a load balancer in front); from any other source a PROXY header is refused.
    #[serde(default = "no_suites")]
    pub accept_proxy_from: Spanned<Vec<String>>,
    /// `l4` (default): the decrypted bytes go to one backend connection as they are.
    /// `http`: HTTP/1.1 and HTTP/2 are served here and each request is routed.
    #[serde(default = "l4_mode")]
    pub mode: Spanned<ListenerMode>,
    /// `false`: plain HTTP (HTTP mode only, no certificate).
    #[serde(default = "default_true")]
    pub tls: Spanned<bool>,
    /// HTTP mode: the priority level of every request on this listener, whoever the
    /// client (a plain listener is usually given a low one).
    pub priority: Option<Spanned<String>>,
    /// HTTP mode: rules every request must pass before it is routed.
    pub inspect: Option<Inspect>,
    /// HTTP mode: an in-memory cache of GET/HEAD responses (RFC 9111, as a shared cache).
    pub cache: Option<CacheSettings>,
    /// Client certificates (mTLS): asked for, required, checked against CAs and CRLs.
    pub client_auth: Option<ClientAuth>,
    /// Who may use the default pool (connections or requests no route matches); empty:
    /// everyone.
    #[serde(default)]
    pub acl: Vec<AclRule>,
}

/// `[listener.client_auth]`: client certificates (docs/identity.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientAuth {
    /// `none`, `optional` (asked for; a client without one is let in, one with a bad one
    /// is refused) or `required`.
    pub mode: Spanned<ClientAuthMode>,
    /// PEM files of the CAs a client certificate must chain to, relative to this file.
    #[serde(default = "no_suites")]
    pub ca: Spanned<Vec<String>>,
    /// PEM files of CRLs (RFC 5280) checked for every certificate of the chain.
    #[serde(default = "no_suites")]
    pub crl: Spanned<Vec<String>>,
    /// A certificate whose issuer no CRL covers: `deny` (default when CRLs are given) or
    /// `allow`.
    #[serde(default = "deny_unknown")]
    pub unknown_revocation: Spanned<UnknownRevocation>,
    /// HTTP mode: the client's certificate also as URL-encoded PEM (`Cert=`) in
    /// `X-Forwarded-Client-Cert`.
    #[serde(default = "default_false")]
    pub forward_certificate: Spanned<bool>,
}

/// Whether a listener asks for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMode {
    None,
    Optional,
    Required,
}

/// What a client certificate whose revocation status is unknown gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownRevocation {
    Deny,
    Allow,
}

/// `[listener.inspect]`: HTTP mode's request rules (each optional).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inspect {
    /// Allowed methods; others get 405 with `Allow`. Empty: any.
    #[serde(default = "no_suites")]
    pub methods: Spanned<Vec<String>>,
    /// Regular expressions (Rust `regex` syntax) on the path; when given, a path must match
    /// one, else 403.
    #[serde(default = "no_suites")]
    pub allow_paths: Spanned<Vec<String>>,
    /// A path matching one of these gets 403.
    #[serde(default = "no_suites")]
    pub deny_paths: Spanned<Vec<String>>,
    /// More header fields than this: 431.
    pub max_header_fields: Option<Spanned<u32>>,
    /// Header names and values longer than this in all: 431.
    pub max_header_bytes: Option<Spanned<u32>>,
    /// A body longer than this: 413.
    pub max_body_bytes: Option<Spanned<u64>>,
}

/// `[listener.cache]`: HTTP mode's response cache.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSettings {
    /// Bytes of cached responses (bodies and heads) at most.
    pub max_bytes: Spanned<u64>,
    /// A response with a longer body is not stored.
    #[serde(default = "default_cache_object")]
    pub max_object_bytes: Spanned<u64>,
}

fn default_cache_object() -> Spanned<u64> {
    spanned(1024 * 1024)
}

/// A certificate chain and its key, PEM files relative to the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    /// Server names this certificate answers (`*.example.com` allowed); none: the default.
    #[serde(default)]
    pub sni: Vec<String>,
    pub chain: Spanned<PathBuf>,
    pub key: Spanned<PathBuf>,
}

/// An accelerator.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSection {
    /// `sim`, `vfio:0000:03:00.0`, `vfio-user:/path`.
    pub address: Spanned<String>,
    /// Data queues to use.
    #[serde(default = "default_queues")]
    pub queues: Spanned<u32>,
}

/// Record-offload policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Offload {
    /// A connection's direction moves onto the device at its first record of at least this
    /// many bytes; smaller ones stay on the CPU (per-job overhead dominates them). 16385,
    /// the default, keeps every record on the CPU; 0 sends every record to the device.
    #[serde(default = "default_threshold")]
    pub cpu_below_bytes: Spanned<u32>,
    /// Most records per doorbell.
    #[serde(default = "default_batch")]
    pub batch_max: Spanned<u32>,
    /// Longest a record waits for its batch to fill.
    #[serde(default = "default_batch_latency")]
    pub batch_latency_us: Spanned<u32>,
    /// A TLS 1.3 connection updates its sending key after this many records (AES-GCM's
    /// limit is 2^24.5 full records per key; ChaCha20-Poly1305 has none worth reaching).
    #[serde(default = "default_rekey")]
    pub rekey_after_records: Spanned<u64>,
}

impl Default for Offload {
    fn default() -> Self {
        Self {
            cpu_below_bytes: default_threshold(),
            batch_max: default_batch(),
            batch_latency_us: default_batch_latency(),
            rekey_after_records: default_rekey(),
        }
    }
}

/// Limits on what a peer may send after the handshake without carrying data. The defaults
/// are rustls' own (and BoringSSL's); a peer over a limit gets an `unexpected_message` alert.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerLimits {
    /// KeyUpdates in a row without application data between them (TLS 1.3).
    #[serde(default = "default_key_updates")]
    pub key_updates_without_data: Spanned<u32>,
    /// Warning alerts over the whole connection (TLS 1.2; TLS 1.3 has only `user_canceled`).
    #[serde(default = "default_warning_alerts")]
    pub warning_alerts: Spanned<u32>,
    /// Empty application-data records in a row.
    #[serde(default = "default_empty_records")]
    pub empty_records: Spanned<u32>,
    /// TLS 1.2 renegotiation requests refused with a warning before the next is fatal.
    #[serde(default = "default_renegotiations")]
    pub renegotiation_requests: Spanned<u32>,
}

impl Default for PeerLimits {
    fn default() -> Self {
        Self {
            key_updates_without_data: default_key_updates(),
            warning_alerts: default_warning_alerts(),
            empty_records: default_empty_records(),
            renegotiation_requests: default_renegotiations(),
        }
    }
}

fn default_key_updates() -> Spanned<u32> {
    spanned(32)
}
fn default_warning_alerts() -> Spanned<u32> {
    spanned(4)
}
fn default_empty_records() -> Spanned<u32> {
    spanned(32)
}
fn default_renegotiations() -> Spanned<u32> {
    spanned(1)
}

/// Load-balancing algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    RoundRobin,
    LeastConnections,
    PowerOfTwoChoices,
    /// HTTP mode: the server with the lowest peak-EWMA response time times its requests in
    /// flight (plus one); like `least_connections` in L4 mode.
    LeastResponseTime,
}

/// A group of backend servers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    pub name: Spanned<String>,
    /// `host:port` of each server.
    pub servers: Spanned<Vec<String>>,
    #[serde(default = "default_balance")]
    pub balance: Balance,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: Spanned<u64>,
    /// Connect attempts after a failed one: servers not tried yet first, then the same again.
    #[serde(default = "default_retries")]
    pub retries: Spanned<u32>,
    pub health_check: Option<HealthCheck>,
    /// Re-encrypt to the backend.
    pub tls: Option<BackendTls>,
    /// A PROXY protocol header to each server before anything else: `v2` (with the TLS
    /// values) or `off`.
    #[serde(default)]
    pub proxy_protocol: ProxyProtocol,
    /// HTTP mode: statuses that send an idempotent request on to another server.
    #[serde(default = "default_retry_on")]
    pub retry_on: Spanned<Vec<u16>>,
    /// HTTP mode: retries allowed, as a percentage of the pool's requests (plus a few per
    /// second), so a failing pool is not hammered.
    #[serde(default = "default_retry_budget")]
    pub retry_budget_percent: Spanned<u32>,
    /// HTTP mode: request body bytes held so the request can be sent again; a longer (or
    /// unknown-length) body is streamed and its request is not sent twice.
    #[serde(default = "default_retry_body")]
    pub retry_body_bytes: Spanned<u32>,
    /// HTTP mode: the version spoken to the servers: `"1.1"` (default; kept-alive
    /// connections) or `"2"` (one multiplexed connection per server: h2c with prior
    /// knowledge, or ALPN `h2` with `[pool.tls]`).
    #[serde(default = "default_http_version")]
    pub http_version: Spanned<String>,
}

fn default_http_version() -> Spanned<String> {
    spanned("1.1".to_owned())
}

/// PROXY protocol to a pool's servers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxyProtocol {
    #[default]
    Off,
    V2,
}

/// Active health checks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(default = "default_health_interval")]
    pub interval_ms: Spanned<u64>,
    /// An HTTP GET of this path must answer 2xx; without it, a TCP connect is the check.
    pub http_path: Option<Spanned<String>>,
}

/// TLS to the backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendTls {
    /// Server name to send and verify.
    pub server_name: Spanned<String>,
    /// PEM CA bundle; the system roots when absent.
    pub ca: Option<Spanned<PathBuf>>,
}

/// A routing rule; the first that matches wins.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub listener: Spanned<String>,
    pub sni: Option<String>,
    pub alpn: Option<String>,
    /// HTTP mode: the request's host (without its port), matched without case.
    pub host: Option<Spanned<String>>,
    /// HTTP mode: the request path starts with this.
    pub path_prefix: Option<Spanned<String>>,
    pub pool: Spanned<String>,
    /// Who may use this route (docs/identity.md); empty: everyone.
    #[serde(default)]
    pub acl: Vec<AclRule>,
}

/// One access rule (`[[route.acl]]`, `[[listener.acl]]`): its action applies to a client
/// that matches every field given (a list matches when any entry does). The first
/// matching rule decides; no match denies.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    pub action: Spanned<AclAction>,
    /// DNS SANs: a name, or `*.` and a name for one label in front of it; no case.
    #[serde(default)]
    pub san_dns: Vec<String>,
    /// URI SANs, exactly.
    #[serde(default)]
    pub san_uri: Vec<String>,
    /// Email SANs; no case.
    #[serde(default)]
    pub san_email: Vec<String>,
    /// The subject as an RFC 4514 string (`CN=alice,O=Example`).
    #[serde(default)]
    pub subject: Vec<String>,
    /// The issuer, the same way.
    #[serde(default)]
    pub issuer: Vec<String>,
    /// Serial numbers in hex (`:` and leading zeros allowed).
    #[serde(default)]
    pub serial: Vec<String>,
    /// SHA-256 fingerprints of the certificate's DER, in hex (`:` allowed).
    #[serde(default)]
    pub sha256: Vec<String>,
    /// Client addresses or CIDR ranges (the one a trusted PROXY header gave, if any).
    #[serde(default = "no_suites")]
    pub source: Spanned<Vec<String>>,
}

/// What an access rule does to the clients it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AclAction {
    Allow,
    Deny,
}

/// What a listener does with the decrypted stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerMode {
    #[default]
    L4,
    Http,
}

/// Where session-ticket keys come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TicketKeySource {
    /// Made in this process and rotated every `rotate_every_s`: sessions resume on this node
    /// (across reloads, not across restarts).
    Random,
    /// Read from `key_files` (nginx or HAProxy format) and re-read when they change: every
    /// node given the same files resumes every other node's tickets.
    File,
    /// One random key per rotation period for the whole cluster, kept in Redis sealed under
    /// the cluster key (`[resumption.redis]`).
    Redis,
}

/// Where sessions for session-ID resumption are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionStore {
    /// In this process only.
    Memory,
    /// In this process and in Redis, sealed under the cluster key: any node resumes them.
    Redis,
}

/// The cluster's Redis.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSection {
    /// `redis://[user:password@]host:port[/db]`, `rediss://` for TLS, or
    /// `redis+unix:///path`.
    pub url: Spanned<String>,
    /// A file holding the AUTH password (instead of one in the URL).
    pub password_file: Option<Spanned<PathBuf>>,
    /// PEM roots that verify a `rediss://` server (default: the web PKI roots).
    pub ca: Option<Spanned<PathBuf>>,
    /// At least 32 random bytes, the same on every node: what is stored in Redis is
    /// sealed under keys derived from it.
    pub cluster_key_file: Spanned<PathBuf>,
    #[serde(default = "default_key_prefix")]
    pub key_prefix: Spanned<String>,
    /// Longest a handshake (or the key refresh) waits for Redis.
    #[serde(default = "default_redis_timeout")]
    pub timeout_ms: Spanned<u64>,
}

fn default_key_prefix() -> Spanned<String> {
    spanned("tlsaccel:".into())
}
fn default_redis_timeout() -> Spanned<u64> {
    spanned(50)
}
fn default_session_store() -> Spanned<SessionStore> {
    spanned(SessionStore::Memory)
}

/// Session resumption.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resumption {
    /// Send session tickets (TLS 1.3 NewSessionTicket; TLS 1.2 to clients that ask).
    /// Without them, sessions resume through the session cache only.
    #[serde(default = "default_true")]
    pub tickets: Spanned<bool>,
    #[serde(default = "default_ticket_keys")]
    pub ticket_keys: Spanned<TicketKeySource>,
    /// Key files, relative to this file (`ticket_keys = "file"`).
    #[serde(default = "no_files")]
    pub key_files: Spanned<Vec<PathBuf>>,
    #[serde(default = "default_key_file_format")]
    pub key_file_format: Spanned<crate::cluster::KeyFileFormat>,
    /// How often the key files are checked for changes.
    #[serde(default = "default_key_file_check")]
    pub key_file_check_ms: Spanned<u64>,
    /// The lifetime announced with each ticket, and how long a key that stopped sealing
    /// still opens tickets.
    #[serde(default = "default_ticket_lifetime")]
    pub ticket_lifetime_s: Spanned<u32>,
    /// How long a key that stopped sealing still opens tickets (default: the ticket
    /// lifetime). Tickets under older keys get a full handshake.
    pub retired_key_window_s: Option<Spanned<u32>>,
    /// How often a random key is replaced.
    #[serde(default = "default_rotate_every")]
    pub rotate_every_s: Spanned<u32>,
    /// Sessions kept for resumption by session ID (TLS 1.2, and TLS 1.3 when tickets are
    /// off); 0 keeps none.
    #[serde(default = "default_cache_size")]
    pub cache_size: Spanned<u32>,
    /// This node's name in the tickets it seals (metrics tell sessions from other nodes);
    /// default: the host name.
    pub node: Option<Spanned<String>>,
    #[serde(default = "default_session_store")]
    pub session_store: Spanned<SessionStore>,
    /// Needed by `ticket_keys = "redis"` and `session_store = "redis"`.
    pub redis: Option<RedisSection>,
}

impl Default for Resumption {
    fn default() -> Self {
        Self {
            tickets: default_true(),
            ticket_keys: default_ticket_keys(),
            key_files: spanned(Vec::new()),
            key_file_format: default_key_file_format(),
            key_file_check_ms: default_key_file_check(),
            ticket_lifetime_s: default_ticket_lifetime(),
            retired_key_window_s: None,
            rotate_every_s: default_rotate_every(),
            cache_size: default_cache_size(),
            node: None,
            session_store: default_session_store(),
            redis: None,
        }
    }
}

fn no_files() -> Spanned<Vec<PathBuf>> {
    spanned(Vec::new())
}
fn default_true() -> Spanned<bool> {
    spanned(true)
}
fn default_audit_queue() -> Spanned<u32> {
    spanned(65_536)
}
fn default_audit_max_bytes() -> Spanned<u64> {
    spanned(100 * 1024 * 1024)
}
fn default_audit_on_full() -> Spanned<AuditOnFull> {
    spanned(AuditOnFull::Block)
}
fn default_false() -> Spanned<bool> {
    spanned(false)
}
fn deny_unknown() -> Spanned<UnknownRevocation> {
    spanned(UnknownRevocation::Deny)
}
fn default_ticket_keys() -> Spanned<TicketKeySource> {
    spanned(TicketKeySource::Random)
}
fn default_key_file_format() -> Spanned<crate::cluster::KeyFileFormat> {
    spanned(crate::cluster::KeyFileFormat::Nginx)
}
fn default_key_file_check() -> Spanned<u64> {
    spanned(1_000)
}
fn default_ticket_lifetime() -> Spanned<u32> {
    spanned(7_200)
}
fn default_rotate_every() -> Spanned<u32> {
    spanned(3_600)
}
fn default_cache_size() -> Spanned<u32> {
    spanned(20_000)
}

/// The admin endpoint (plain HTTP; bind it to loopback or a management network).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub address: Spanned<String>,
}

fn spanned<T>(value: T) -> Spanned<T> {
    Spanned::new(0..0, value)
}
fn default_versions() -> Spanned<Vec<String>> {
    spanned(vec!["1.2".into(), "1.3".into()])
}
fn default_handshake_timeout() -> Spanned<u64> {
    spanned(10_000)
}
fn default_idle_timeout() -> Spanned<u64> {
    spanned(300_000)
}
fn default_max_connections() -> Spanned<u32> {
    spanned(10_000)
}
fn default_max_wait() -> Spanned<u64> {
    spanned(1000)
}
fn l4_mode() -> Spanned<ListenerMode> {
    spanned(ListenerMode::L4)
}
fn no_suites() -> Spanned<Vec<String>> {
    spanned(Vec::new())
}
fn default_drain() -> Spanned<u64> {
    spanned(30_000)
}
fn default_keepalive() -> Spanned<u32> {
    spanned(60)
}
fn default_rekey() -> Spanned<u64> {
    spanned(1 << 23)
}
fn default_queues() -> Spanned<u32> {
    spanned(4)
}
/// Above the largest record: records stay on the CPU unless configured otherwise. On the
/// machines measured so far (`cargo bench --bench proxy`, docs/daemon.md) no record size
/// costs the host less on the device than AES-GCM on the CPU; handshakes still go to the
/// device.
fn default_threshold() -> Spanned<u32> {
    spanned(16_385)
}
fn default_batch() -> Spanned<u32> {
    spanned(32)
}
fn default_batch_latency() -> Spanned<u32> {
    // Batches form by themselves under load (what queues while the device works goes in
    // the next doorbell); waiting costs a lone connection a round trip's worth per batch.
    spanned(0)
}
fn default_balance() -> Balance {
    Balance::RoundRobin
}
fn default_connect_timeout() -> Spanned<u64> {
    spanned(2_000)
}
fn default_retries() -> Spanned<u32> {
    spanned(2)
}
fn default_retry_on() -> Spanned<Vec<u16>> {
    spanned(vec![502, 503, 504])
}
fn default_retry_budget() -> Spanned<u32> {
    spanned(20)
}
fn default_retry_body() -> Spanned<u32> {
    spanned(64 * 1024)
}
fn default_health_interval() -> Spanned<u64> {
    spanned(2_000)
}

/// Turns spans into lines and collects errors.
struct Checker<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Checker<'_> {
    fn line(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count()
            + 1
    }

    /// Every entry of `ranges` is an address or a CIDR range.
    fn ranges(&self, ranges: &Spanned<Vec<String>>, key: &str) -> Result<(), ConfigError> {
        for range in ranges.get_ref() {
            if range.parse::<ipnet::IpNet>().is_err() && range.parse::<std::net::IpAddr>().is_err()
            {
                return Err(self.invalid(
                    ranges,
                    key,
                    format!("{range:?} is not an address or a CIDR range (10.0.0.0/8)"),
                ));
            }
        }
        Ok(())
    }

    fn invalid<T>(
        &self,
        at: &Spanned<T>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_owned(),
            line: self.line(at.span().start),
            key: key.into(),
            message: message.into(),
        }
    }

    fn socket_address(&self, value: &Spanned<String>, key: &str) -> Result<(), ConfigError> {
        value
            .get_ref()
            .parse::<SocketAddr>()
            .map(|_| ())
            .map_err(|_| {
                self.invalid(
                    value,
                    key,
                    format!("{:?} is not an ip:port address", value.get_ref()),
                )
            })
    }

    fn range<T: PartialOrd + Copy + std::fmt::Display>(
        &self,
        value: &Spanned<T>,
        key: &str,
        low: T,
        high: T,
    ) -> Result<(), ConfigError> {
        let v = *value.get_ref();
        if v < low || v > high {
            return Err(self.invalid(value, key, format!("{v} is outside {low}..={high}")));
        }
        Ok(())
    }
}

impl Config {
    /// Parses and checks `text`, read from `file` (used in messages and to resolve relative
    /// paths). Touches no file.
    pub fn parse(text: &str, file: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let start = e.span().map_or(0, |s| s.start);
            let before = &text[..start.min(text.len())];
            ConfigError::Syntax {
                file: file.to_owned(),
                line: before.bytes().filter(|&b| b == b'\n').count() + 1,
                column: before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1,
                message: e.message().to_string(),
            }
        })?;
        config.check(&Checker { file, text })?;
        Ok(config)
    }

    /// Reads, parses and checks `file`, and checks that every certificate and key file it
    /// names can be read.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError::Read {
            file: file.to_owned(),
            message: e.to_string(),
        })?;
        let config = Self::parse(&text, file)?;
        let checker = Checker { file, text: &text };
        let base = file.parent().unwrap_or(Path::new("."));
        for (l, listener) in config.listeners.iter().enumerate() {
            for (c, cert) in listener.certificates.iter().enumerate() {
                for (path, what) in [(&cert.chain, "chain"), (&cert.key, "key")] {
                    let full = base.join(path.get_ref());
                    if let Err(e) = std::fs::metadata(&full).and_then(|m| {
                        if m.is_file() {
                            Ok(())
                        } else {
                            Err(std::io::ErrorKind::InvalidInput.into())
                        }
                    }) {
                        return Err(checker.invalid(
                            path,
                            format!("listener[{l}].certificate[{c}].{what}"),
                            format!("cannot read {}: {e}", full.display()),
                        ));
                    }
                }
            }
        }
        for (l, listener) in config.listeners.iter().enumerate() {
            let Some(auth) = &listener.client_auth else {
                continue;
            };
            for (files, what) in [(&auth.ca, "ca"), (&auth.crl, "crl")] {
                for name in files.get_ref() {
                    let full = base.join(name);
                    if let Err(message) = crate::identity::check_pem(&full, what) {
                        return Err(checker.invalid(
                            files,
                            format!("listener[{l}].client_auth.{what}"),
                            message,
                        ));
                    }
                }
            }
        }
        if let Some(redis) = &config.resumption.redis {
            let files = [
                Some(&redis.cluster_key_file),
                redis.password_file.as_ref(),
                redis.ca.as_ref(),
            ];
            for (path, key) in files
                .into_iter()
                .zip(["cluster_key_file", "password_file", "ca"])
            {
                let Some(path) = path else { continue };
                let full = base.join(path.get_ref());
                let problem = match std::fs::read(&full) {
                    Err(e) => Some(format!("cannot read {}: {e}", full.display())),
                    Ok(bytes) if key == "cluster_key_file" && bytes.len() < 32 => Some(format!(
                        "{} holds {} bytes; a cluster key needs at least 32 (openssl rand 32 > cluster.key)",
                        full.display(),
                        bytes.len()
                    )),
                    Ok(_) => None,
                };
                if let Some(message) = problem {
                    return Err(checker.invalid(path, format!("resumption.redis.{key}"), message));
                }
            }
        }
        for (i, path) in config.resumption.key_files.get_ref().iter().enumerate() {
            let full = base.join(path);
            if let Err(e) = std::fs::read(&full) {
                return Err(checker.invalid(
                    &config.resumption.key_files,
                    format!("resumption.key_files[{i}]"),
                    format!("cannot read {}: {e}", full.display()),
                ));
            }
        }
        Ok(config)
    }

    fn check(&self, c: &Checker<'_>) -> Result<(), ConfigError> {
        let mut pools = HashSet::new();
        for (i, pool) in self.pools.iter().enumerate() {
            let key = |k: &str| format!("pool[{i}].{k}");
            if !pools.insert(pool.name.get_ref().as_str()) {
                return Err(c.invalid(&pool.name, key("name"), "another pool has this name"));
            }
            if pool.servers.get_ref().is_empty() {
                return Err(c.invalid(
                    &pool.servers,
                    key("servers"),
                    "a pool needs at least one server",
                ));
            }
            for server in pool.servers.get_ref() {
                if server
                    .rsplit_once(':')
                    .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
                {
                    return Err(c.invalid(
                        &pool.servers,
                        key("servers"),
                        format!("{server:?} is not host:port"),
                    ));
                }
            }
            c.range(
                &pool.connect_timeout_ms,
                &key("connect_timeout_ms"),
                1,
                60_000,
            )?;
            c.range(&pool.retries, &key("retries"), 0, 16)?;
            c.range(
                &pool.retry_budget_percent,
                &key("retry_budget_percent"),
                0,
                100,
            )?;
            c.range(
                &pool.retry_body_bytes,
                &key("retry_body_bytes"),
                0,
                16 << 20,
            )?;
            if let Some(code) = pool
                .retry_on
                .get_ref()
                .iter()
                .find(|c| !(500..=599).contains(*c))
            {
                return Err(c.invalid(
                    &pool.retry_on,
                    key("retry_on"),
                    format!("{code} is not a 5xx status"),
                ));
            }
            if let Some(health) = &pool.health_check {
                c.range(
                    &health.interval_ms,
                    &key("health_check.interval_ms"),
                    100,
                    3_600_000,
                )?;
                if let Some(path) = &health.http_path {
                    if !path.get_ref().starts_with('/') {
                        return Err(c.invalid(
                            path,
                            key("health_check.http_path"),
                            "must start with /",
                        ));
                    }
                }
            }
        }
        let pool_ref = |name: &Spanned<String>, key: String| {
            if pools.contains(name.get_ref().as_str()) {
                Ok(())
            } else {
                Err(c.invalid(name, key, format!("no pool is named {:?}", name.get_ref())))
            }
        };
        let http = &self.http;
        let (min, max) = (
            *http.buffer_pool_min_kib.get_ref(),
            *http.buffer_pool_max_kib.get_ref(),
        );
        if !(16..=64 * 1024 * 1024).contains(&max) {
            return Err(c.invalid(
                &http.buffer_pool_max_kib,
                "http.buffer_pool_max_kib",
                "16 (one chunk) to 67108864 (64 GiB)",
            ));
        }
        if min == 0 || min > max {
            return Err(c.invalid(
                &http.buffer_pool_min_kib,
                "http.buffer_pool_min_kib",
                format!("1 to buffer_pool_max_kib ({max})"),
            ));
        }
        if *http.buffer_wait_ms.get_ref() > 60_000 {
            return Err(c.invalid(
                &http.buffer_wait_ms,
                "http.buffer_wait_ms",
                "at most 60000 (a minute)",
            ));
        }
        for (i, pool) in self.pools.iter().enumerate() {
            if u64::from(*pool.retry_body_bytes.get_ref()) > max * 1024 {
                return Err(c.invalid(
                    &pool.retry_body_bytes,
                    format!("pool[{i}].retry_body_bytes"),
                    format!("more than the whole buffer pool (http.buffer_pool_max_kib = {max})"),
                ));
            }
        }
        let mut levels = HashSet::new();
        for (i, priority) in self.priorities.iter().enumerate() {
            let key = |k: &str| format!("priority[{i}].{k}");
            if !levels.insert(priority.name.get_ref().as_str()) {
                return Err(c.invalid(
                    &priority.name,
                    key("name"),
                    "another priority level has this name",
                ));
            }
            c.ranges(&priority.clients, &key("clients"))?;
            if let Some(ms) = &priority.response_time_ms {
                if *ms.get_ref() == 0 {
                    return Err(c.invalid(ms, key("response_time_ms"), "must be at least 1"));
                }
            }
            if *priority.max_wait_ms.get_ref() > 60_000 {
                return Err(c.invalid(
                    &priority.max_wait_ms,
                    key("max_wait_ms"),
                    "at most 60000 (a minute)",
                ));
            }
        }
        let mut listeners = HashSet::new();
        for (i, listener) in self.listeners.iter().enumerate() {
            let key = |k: &str| format!("listener[{i}].{k}");
            if !listeners.insert(listener.name.get_ref().as_str()) {
                return Err(c.invalid(
                    &listener.name,
                    key("name"),
                    "another listener has this name",
                ));
            }
            c.socket_address(&listener.address, &key("address"))?;
            c.ranges(&listener.accept_proxy_from, &key("accept_proxy_from"))?;
            let http = *listener.mode.get_ref() == ListenerMode::Http;
            if let Some(inspect) = &listener.inspect {
                if !http {
                    return Err(c.invalid(
                        &listener.mode,
                        key("inspect"),
                        "[listener.inspect] needs mode = \"http\"",
                    ));
                }
                for m in inspect.methods.get_ref() {
                    if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase() || b == b'-') {
                        return Err(c.invalid(
                            &inspect.methods,
                            key("inspect.methods"),
                            format!("{m:?} is not a method name (GET, POST, ...)"),
                        ));
                    }
                }
                for (field, patterns) in [
                    ("allow_paths", &inspect.allow_paths),
                    ("deny_paths", &inspect.deny_paths),
                ] {
                    for p in patterns.get_ref() {
                        if let Err(e) = regex::Regex::new(p) {
                            return Err(c.invalid(
                                patterns,
                                key(&format!("inspect.{field}")),
                                format!("{p:?}: {}", e.to_string().lines().last().unwrap_or("")),
                            ));
                        }
                    }
                }
            }
            if let Some(cache) = &listener.cache {
                if !http {
                    return Err(c.invalid(
                        &listener.mode,
                        key("cache"),
                        "[listener.cache] needs mode = \"http\"",
                    ));
                }
                let max = *cache.max_bytes.get_ref();
                if !(1024..=64 << 30).contains(&max) {
                    return Err(c.invalid(
                        &cache.max_bytes,
                        key("cache.max_bytes"),
                        "1024 to 68719476736 (64 GiB)",
                    ));
                }
                if *cache.max_object_bytes.get_ref() > max {
                    return Err(c.invalid(
                        &cache.max_object_bytes,
                        key("cache.max_object_bytes"),
                        "more than the whole cache (max_bytes)",
                    ));
                }
            }
            if let Some(auth) = &listener.client_auth {
                if !*listener.tls.get_ref() {
                    return Err(c.invalid(
                        &auth.mode,
                        key("client_auth"),
                        "a plain (tls = false) listener cannot ask for client certificates",
                    ));
                }
                if *auth.mode.get_ref() != ClientAuthMode::None && auth.ca.get_ref().is_empty() {
                    return Err(c.invalid(
                        &auth.mode,
                        key("client_auth.ca"),
                        "client certificates need the CAs they must chain to (ca = [\"clients-ca.pem\"])",
                    ));
                }
            }
            if let Some(level) = &listener.priority {
                if !http {
                    return Err(c.invalid(
                        level,
                        key("priority"),
                        "only a listener with mode = \"http\" has priority levels",
                    ));
                }
                if !levels.contains(level.get_ref().as_str()) {
                    return Err(c.invalid(
                        level,
                        key("priority"),
                        format!("no [[priority]] level is named {:?}", level.get_ref()),
                    ));
                }
            }
            if !*listener.tls.get_ref() {
                if !http {
                    return Err(c.invalid(
                        &listener.tls,
                        key("tls"),
                        "a plain (tls = false) listener needs mode = \"http\"",
                    ));
                }
                if !listener.certificates.is_empty() {
                    return Err(c.invalid(
                        &listener.tls,
                        key("tls"),
                        "a plain (tls = false) listener takes no certificate",
                    ));
                }
            } else if listener.certificates.is_empty() {
                return Err(c.invalid(
                    &listener.name,
                    key("certificate"),
                    "a listener needs a certificate (or tls = false with mode = \"http\")",
                ));
            }
            let versions = listener.tls_versions.get_ref();
            if versions.is_empty() || versions.iter().any(|v| v != "1.2" && v != "1.3") {
                return Err(c.invalid(
                    &listener.tls_versions,
                    key("tls_versions"),
                    "allowed values are \"1.2\" and \"1.3\"",
                ));
            }
            for suite in listener.cipher_suites.get_ref() {
                let known = rustls::crypto::aws_lc_rs::ALL_CIPHER_SUITES
                    .iter()
                    .any(|s| format!("{:?}", s.suite()) == *suite);
                if !known {
                    return Err(c.invalid(
                        &listener.cipher_suites,
                        key("cipher_suites"),
                        format!("{suite:?} is not a supported cipher suite"),
                    ));
                }
            }
            if let Some(mss) = &listener.tcp_mss {
                c.range(mss, &key("tcp_mss"), 536, 65_495)?;
            }
            c.range(
                &listener.tcp_keepalive_s,
                &key("tcp_keepalive_s"),
                0,
                86_400,
            )?;
            if let Some(pool) = &listener.default_pool {
                pool_ref(pool, key("default_pool"))?;
            }
            c.range(
                &listener.handshake_timeout_ms,
                &key("handshake_timeout_ms"),
                100,
                120_000,
            )?;
            c.range(
                &listener.idle_timeout_ms,
                &key("idle_timeout_ms"),
                1_000,
                86_400_000,
            )?;
            c.range(
                &listener.max_connections,
                &key("max_connections"),
                1,
                1_000_000,
            )?;
        }
        if let Some(audit) = &self.audit {
            c.range(&audit.queue, "audit.queue", 1, 1 << 20)?;
            c.range(&audit.max_bytes, "audit.max_bytes", 4096, u64::MAX)?;
            match (&audit.file, &audit.syslog) {
                (Some(file), None) if !file.get_ref().is_empty() => {}
                (None, Some(socket)) if socket.get_ref().starts_with('/') => {}
                (Some(file), Some(_)) => {
                    return Err(c.invalid(file, "audit.file", "either file or syslog, not both"))
                }
                (None, Some(socket)) => {
                    return Err(c.invalid(
                        socket,
                        "audit.syslog",
                        "the absolute path of a local syslog socket (/dev/log)",
                    ))
                }
                (Some(file), None) => {
                    return Err(c.invalid(file, "audit.file", "a file name is needed"))
                }
                (None, None) => {
                    return Err(c.invalid(
                        &audit.queue,
                        "audit",
                        "needs file = \"...\" or syslog = \"/dev/log\"",
                    ))
                }
            }
        }
        let acl = |rules: &[AclRule], key: &str| -> Result<(), ConfigError> {
            for (r, rule) in rules.iter().enumerate() {
                c.ranges(&rule.source, &format!("{key}.acl[{r}].source"))?;
                if let Err(message) = crate::acl::check_rule(rule) {
                    return Err(c.invalid(&rule.action, format!("{key}.acl[{r}]"), message));
                }
            }
            Ok(())
        };
        for (i, listener) in self.listeners.iter().enumerate() {
            acl(&listener.acl, &format!("listener[{i}]"))?;
        }
        for (i, route) in self.routes.iter().enumerate() {
            acl(&route.acl, &format!("route[{i}]"))?;
            if !listeners.contains(route.listener.get_ref().as_str()) {
                return Err(c.invalid(
                    &route.listener,
                    format!("route[{i}].listener"),
                    format!("no listener is named {:?}", route.listener.get_ref()),
                ));
            }
            pool_ref(&route.pool, format!("route[{i}].pool"))?;
            let http = self
                .listeners
                .iter()
                .find(|l| l.name.get_ref() == route.listener.get_ref())
                .is_some_and(|l| *l.mode.get_ref() == ListenerMode::Http);
            for (value, name) in [(&route.host, "host"), (&route.path_prefix, "path_prefix")] {
                if let Some(value) = value.as_ref().filter(|_| !http) {
                    return Err(c.invalid(
                        value,
                        format!("route[{i}].{name}"),
                        "only a listener with mode = \"http\" sees requests",
                    ));
                }
            }
            if let Some(prefix) = route
                .path_prefix
                .as_ref()
                .filter(|p| !p.get_ref().starts_with('/'))
            {
                return Err(c.invalid(
                    prefix,
                    format!("route[{i}].path_prefix"),
                    "a path prefix starts with /",
                ));
            }
        }
        for (i, pool) in self.pools.iter().enumerate() {
            if !matches!(pool.http_version.get_ref().as_str(), "1.1" | "2") {
                return Err(c.invalid(
                    &pool.http_version,
                    format!("pool[{i}].http_version"),
                    "\"1.1\" or \"2\"",
                ));
            }
        }
        // An HTTP/2 pool speaks HTTP/2 itself: an L4 listener's client bytes cannot go to it.
        for (i, listener) in self.listeners.iter().enumerate() {
            if *listener.mode.get_ref() == ListenerMode::Http {
                continue;
            }
            let reachable = self
                .routes
                .iter()
                .filter(|r| r.listener.get_ref() == listener.name.get_ref())
                .map(|r| r.pool.get_ref())
                .chain(listener.default_pool.as_ref().map(|p| p.get_ref()));
            for name in reachable {
                if self
                    .pools
                    .iter()
                    .any(|p| p.name.get_ref() == name && p.http_version.get_ref() == "2")
                {
                    return Err(c.invalid(
                        &listener.mode,
                        format!("listener[{i}].mode"),
                        format!(
                            "pool {name:?} speaks HTTP/2 to its servers (http_version = \"2\"), \
                             which only an HTTP-mode listener can use"
                        ),
                    ));
                }
            }
        }
        // HTTP mode shares a backend connection between clients: a PROXY header, which
        // names one client, cannot go on it.
        for (i, listener) in self.listeners.iter().enumerate() {
            if *listener.mode.get_ref() != ListenerMode::Http {
                continue;
            }
            let reachable = self
                .routes
                .iter()
                .filter(|r| r.listener.get_ref() == listener.name.get_ref())
                .map(|r| r.pool.get_ref())
                .chain(listener.default_pool.as_ref().map(|p| p.get_ref()));
            for name in reachable {
                if self
                    .pools
                    .iter()
                    .any(|p| p.name.get_ref() == name && p.proxy_protocol == ProxyProtocol::V2)
                {
                    return Err(c.invalid(
                        &listener.mode,
                        format!("listener[{i}].mode"),
                        format!(
                            "pool {name:?} sends PROXY headers, which HTTP mode cannot (its \
                             backend connections are shared between clients)"
                        ),
                    ));
                }
            }
        }
        for (i, device) in self.devices.iter().enumerate() {
            if let Err(e) = device
                .address
                .get_ref()
                .parse::<tlsaccel_driver::DeviceAddress>()
            {
                return Err(c.invalid(
                    &device.address,
                    format!("device[{i}].address"),
                    e.to_string(),
                ));
            }
            c.range(&device.queues, &format!("device[{i}].queues"), 1, 63)?;
        }
        c.range(
            &self.offload.cpu_below_bytes,
            "offload.cpu_below_bytes",
            0,
            16_385,
        )?;
        c.range(&self.offload.batch_max, "offload.batch_max", 1, 1024)?;
        let limits = &self.peer_limits;
        c.range(
            &limits.key_updates_without_data,
            "peer_limits.key_updates_without_data",
            1,
            1024,
        )?;
        c.range(
            &limits.warning_alerts,
            "peer_limits.warning_alerts",
            0,
            1024,
        )?;
        c.range(&limits.empty_records, "peer_limits.empty_records", 0, 1024)?;
        c.range(
            &limits.renegotiation_requests,
            "peer_limits.renegotiation_requests",
            0,
            1024,
        )?;
        c.range(
            &self.offload.rekey_after_records,
            "offload.rekey_after_records",
            1,
            1 << 24,
        )?;
        c.range(&self.drain_timeout_ms, "drain_timeout_ms", 0, 3_600_000)?;
        if let Some(threads) = &self.worker_threads {
            c.range(threads, "worker_threads", 1, 1024)?;
        }
        c.range(
            &self.offload.batch_latency_us,
            "offload.batch_latency_us",
            0,
            100_000,
        )?;
        if let Some(admin) = &self.admin {
            c.socket_address(&admin.address, "admin.address")?;
        }
        self.check_resumption(c)
    }

    fn check_resumption(&self, c: &Checker<'_>) -> Result<(), ConfigError> {
        let r = &self.resumption;
        // RFC 8446 §4.6.1: a ticket lifetime of more than 7 days is not allowed.
        c.range(
            &r.ticket_lifetime_s,
            "resumption.ticket_lifetime_s",
            1,
            604_800,
        )?;
        c.range(&r.rotate_every_s, "resumption.rotate_every_s", 1, 604_800)?;
        if let Some(window) = &r.retired_key_window_s {
            c.range(window, "resumption.retired_key_window_s", 0, 604_800)?;
        }
        c.range(
            &r.key_file_check_ms,
            "resumption.key_file_check_ms",
            100,
            3_600_000,
        )?;
        c.range(&r.cache_size, "resumption.cache_size", 0, 10_000_000)?;
        let files = r.key_files.get_ref();
        match *r.ticket_keys.get_ref() {
            TicketKeySource::File if files.is_empty() => {
                return Err(c.invalid(
                    &r.ticket_keys,
                    "resumption.key_files",
                    "ticket_keys = \"file\" needs key_files",
                ));
            }
            TicketKeySource::File
                if *r.key_file_format.get_ref() == crate::cluster::KeyFileFormat::Haproxy
                    && files.len() != 1 =>
            {
                return Err(c.invalid(
                    &r.key_files,
                    "resumption.key_files",
                    "the haproxy format keeps every key in one file",
                ));
            }
            TicketKeySource::Random if !files.is_empty() => {
                return Err(c.invalid(
                    &r.key_files,
                    "resumption.key_files",
                    "key_files are read only with ticket_keys = \"file\"",
                ));
            }
            _ => {}
        }
        let uses_redis = *r.ticket_keys.get_ref() == TicketKeySource::Redis
            || *r.session_store.get_ref() == SessionStore::Redis;
        match &r.redis {
            None if uses_redis => {
                return Err(c.invalid(
                    &r.ticket_keys,
                    "resumption.redis",
                    "ticket_keys or session_store = \"redis\" needs a [resumption.redis] section",
                ));
            }
            Some(redis) => {
                let url = redis.url.get_ref();
                if !["redis://", "rediss://", "redis+unix://", "unix://"]
                    .iter()
                    .any(|scheme| url.starts_with(scheme))
                {
                    return Err(c.invalid(
                        &redis.url,
                        "resumption.redis.url",
                        "a redis://, rediss:// or redis+unix:// URL",
                    ));
                }
                if let Some(ca) = &redis.ca {
                    if !url.starts_with("rediss://") {
                        return Err(c.invalid(
                            ca,
                            "resumption.redis.ca",
                            "ca needs a rediss:// url",
                        ));
                    }
                }
                c.range(&redis.timeout_ms, "resumption.redis.timeout_ms", 1, 10_000)?;
                if redis.key_prefix.get_ref().len() > 64 {
                    return Err(c.invalid(
                        &redis.key_prefix,
                        "resumption.redis.key_prefix",
                        "at most 64 bytes",
                    ));
                }
            }
            None => {}
        }
        if let Some(node) = &r.node {
            let name = node.get_ref();
            if name.is_empty()
                || name.len() > crate::cluster::MAX_ORIGIN_LEN
                || !name.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(c.invalid(
                    node,
                    "resumption.node",
                    format!(
                        "1 to {} printable characters without spaces",
                        crate::cluster::MAX_ORIGIN_LEN
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[listener]]
name = "public"
address = "127.0.0.1:8443"
default_pool = "web"

[[listener.certificate]]
chain = "cert.pem"
key = "key.pem"

[[pool]]
name = "web"
servers = ["127.0.0.1:8080"]

[[route]]
listener = "public"
sni = "api.example.com"
pool = "web"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("tlsaccel.toml"))
    }

    #[test]
    fn a_small_config_parses_with_defaults() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.listeners.len(), 1);
        assert_eq!(*config.listeners[0].handshake_timeout_ms.get_ref(), 10_000);
        assert_eq!(config.pools[0].balance, Balance::RoundRobin);
        assert_eq!(*config.offload.cpu_below_bytes.get_ref(), 16_385);
    }

    #[test]
    fn unknown_keys_name_their_line_and_column() {
        let text = GOOD.replace("default_pool = \"web\"", "defualt_pool = \"web\"");
        let error = parse(&text).unwrap_err();
        let ConfigError::Syntax {
            line,
            column,
            message,
            ..
        } = &error
        else {
            panic!("{error}");
        };
        assert_eq!((*line, *column), (5, 1));
        assert!(
            message.contains("unknown field `defualt_pool`"),
            "{message}"
        );
        assert!(error.to_string().starts_with("tlsaccel.toml:5:1: "));
    }

    #[test]
    fn meaning_errors_name_file_line_and_key() {
        let error = parse(&GOOD.replace(
            "sni = \"api.example.com\"\npool = \"web\"",
            "sni = \"api.example.com\"\npool = \"api\"",
        ))
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "tlsaccel.toml:18: route[0].pool: no pool is named \"api\""
        );
        let error = parse(&GOOD.replace("127.0.0.1:8443", "localhost")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "tlsaccel.toml:4: listener[0].address: \"localhost\" is not an ip:port address"
        );
        let bad_balance = GOOD.replace(
            "servers = [\"127.0.0.1:8080\"]",
            "servers = [\"127.0.0.1:8080\"]\nbalance = \"random\"",
        );
        assert!(matches!(
            parse(&bad_balance),
            Err(ConfigError::Syntax { line: 14, .. })
        ));
        let bad_version = GOOD.replace(
            "default_pool = \"web\"",
            "default_pool = \"web\"\ntls_versions = [\"1.1\"]",
        );
        assert!(parse(&bad_version)
            .unwrap_err()
            .to_string()
            .contains("tls_versions"));
        let no_servers = GOOD.replace("[\"127.0.0.1:8080\"]", "[]");
        assert!(parse(&no_servers)
            .unwrap_err()
            .to_string()
            .contains("at least one server"));
        let bad_device = format!("{GOOD}\n[[device]]\naddress = \"pci:1\"\n");
        assert!(parse(&bad_device)
            .unwrap_err()
            .to_string()
            .contains("device[0].address"));
        let too_long = GOOD.replace(
            "default_pool = \"web\"",
            "default_pool = \"web\"\nhandshake_timeout_ms = 0",
        );
        assert!(parse(&too_long)
            .unwrap_err()
            .to_string()
            .contains("outside 100..=120000"));
        let bad_range = GOOD.replace(
            "default_pool = \"web\"",
            "default_pool = \"web\"\naccept_proxy_from = [\"10.0.0.0/8\", \"lb.internal\"]",
        );
        assert_eq!(
            parse(&bad_range).unwrap_err().to_string(),
            "tlsaccel.toml:6: listener[0].accept_proxy_from: \"lb.internal\" is not an address \
             or a CIDR range (10.0.0.0/8)"
        );
        let bad_retry = GOOD.replace(
            "servers = [\"127.0.0.1:8080\"]",
            "servers = [\"127.0.0.1:8080\"]\nretry_on = [503, 404]",
        );
        assert_eq!(
            parse(&bad_retry).unwrap_err().to_string(),
            "tlsaccel.toml:14: pool[0].retry_on: 404 is not a 5xx status"
        );
        let bad_proxy = GOOD.replace(
            "servers = [\"127.0.0.1:8080\"]",
            "servers = [\"127.0.0.1:8080\"]\nproxy_protocol = \"v3\"",
        );
        assert!(matches!(
            parse(&bad_proxy),
            Err(ConfigError::Syntax { line: 14, .. })
        ));
    }

    #[test]
    fn peer_limits_default_to_rustls_and_are_checked() {
        let config = parse(GOOD).unwrap();
        let limits = &config.peer_limits;
        assert_eq!(
            (
                *limits.key_updates_without_data.get_ref(),
                *limits.warning_alerts.get_ref(),
                *limits.empty_records.get_ref(),
                *limits.renegotiation_requests.get_ref(),
            ),
            (32, 4, 32, 1)
        );
        assert_eq!(*config.offload.batch_latency_us.get_ref(), 0);
        let none = format!("{GOOD}\n[peer_limits]\nkey_updates_without_data = 0\n");
        assert!(parse(&none)
            .unwrap_err()
            .to_string()
            .contains("peer_limits.key_updates_without_data: 0 is outside 1..=1024"));
        let typo = format!("{GOOD}\n[peer_limits]\nwarning_alert = 2\n");
        assert!(matches!(parse(&typo), Err(ConfigError::Syntax { .. })));
    }

    #[test]
    fn load_checks_certificate_files() {
        let dir = std::env::temp_dir().join(format!("tlsaccel-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("tlsaccel.toml");
        std::fs::write(&file, GOOD).unwrap();
        let error = Config::load(&file).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("listener[0].certificate[0].chain"),
            "{error}"
        );
        std::fs::write(dir.join("cert.pem"), "x").unwrap();
        std::fs::write(dir.join("key.pem"), "x").unwrap();
        assert!(Config::load(&file).is_ok());
        assert!(matches!(
            Config::load(&dir.join("missing.toml")),
            Err(ConfigError::Read { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn resumption_settings_are_checked() {
        let with = |section: &str| parse(&format!("{GOOD}\n[resumption]\n{section}\n"));
        let config = parse(GOOD).unwrap();
        assert_eq!(
            *config.resumption.ticket_keys.get_ref(),
            TicketKeySource::Random
        );
        assert_eq!(*config.resumption.ticket_lifetime_s.get_ref(), 7_200);
        let error = with("ticket_keys = \"file\"").unwrap_err().to_string();
        assert_eq!(
            error,
            "tlsaccel.toml:21: resumption.key_files: ticket_keys = \"file\" needs key_files"
        );
        let error = with("key_files = [\"t.key\"]").unwrap_err().to_string();
        assert!(
            error.contains("only with ticket_keys = \"file\""),
            "{error}"
        );
        let error = with(
            "ticket_keys = \"file\"\nkey_file_format = \"haproxy\"\nkey_files = [\"a\", \"b\"]",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("one file"), "{error}");
        let error = with("ticket_lifetime_s = 604801").unwrap_err().to_string();
        assert!(error.contains("resumption.ticket_lifetime_s"), "{error}");
        let error = with("node = \"has space\"").unwrap_err().to_string();
        assert!(error.contains("resumption.node"), "{error}");
        assert!(matches!(
            with("key_file_format = \"apache\""),
            Err(ConfigError::Syntax { .. })
        ));
        let error = with("session_store = \"redis\"").unwrap_err().to_string();
        assert!(error.contains("[resumption.redis]"), "{error}");
        let error = with(
            "ticket_keys = \"redis\"\n[resumption.redis]\nurl = \"http://x\"\ncluster_key_file = \"c\"",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("resumption.redis.url"), "{error}");
        let redis = with(
            "ticket_keys = \"redis\"\n[resumption.redis]\nurl = \"redis://127.0.0.1:6379\"\ncluster_key_file = \"c\"",
        );
        assert!(redis.is_ok(), "{redis:?}");
        let ok = with("ticket_keys = \"file\"\nkey_files = [\"t.key\"]\nretired_key_window_s = 0");
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn client_auth_is_checked() {
        let error = |text: String| parse(&text).unwrap_err().to_string();
        let ok = parse(&format!(
            "{GOOD}[listener.client_auth]\nmode = \"optional\"\nca = [\"ca.pem\"]\n"
        ))
        .unwrap();
        let auth = ok.listeners[0].client_auth.as_ref().unwrap();
        assert_eq!(*auth.mode.get_ref(), ClientAuthMode::Optional);
        assert_eq!(
            *auth.unknown_revocation.get_ref(),
            UnknownRevocation::Deny,
            "unknown revocation status is refused by default"
        );
        assert!(!*auth.forward_certificate.get_ref());
        assert!(error(format!(
            "{GOOD}[listener.client_auth]\nmode = \"required\"\n"
        ))
        .contains("listener[0].client_auth.ca: client certificates need the CAs"));
        assert!(error(format!(
            "{GOOD}[listener.client_auth]\nmode = \"sometimes\"\nca = [\"ca.pem\"]\n"
        ))
        .contains("unknown variant `sometimes`"));
        assert!(error(format!(
            "{GOOD}[listener.client_auth]\nmode = \"required\"\nca = [\"ca.pem\"]\ncrls = []\n"
        ))
        .contains("unknown field `crls`"));
        let plain = "[[listener]]\nname = \"plain\"\naddress = \"127.0.0.1:8080\"\n\
                     mode = \"http\"\ntls = false\ndefault_pool = \"web\"\n\
                     [listener.client_auth]\nmode = \"optional\"\nca = [\"ca.pem\"]\n";
        assert!(error(format!("{GOOD}{plain}"))
            .contains("listener[1].client_auth: a plain (tls = false) listener cannot ask"));
    }

    #[test]
    fn the_audit_section_is_checked() {
        let error = |text: String| parse(&text).unwrap_err().to_string();
        let ok = parse(&format!("{GOOD}[audit]\nfile = \"audit.jsonl\"\n")).unwrap();
        let audit = ok.audit.unwrap();
        assert_eq!(*audit.queue.get_ref(), 65_536);
        assert_eq!(*audit.on_full.get_ref(), AuditOnFull::Block);
        assert!(error(format!("{GOOD}[audit]\nfile = \"a\"\nqueue = 0\n")).contains("audit.queue"));
        assert!(
            error(format!("{GOOD}[audit]\nfile = \"a\"\nmax_bytes = 10\n"))
                .contains("audit.max_bytes")
        );
        assert!(
            error(format!("{GOOD}[audit]\nfile = \"a\"\non_full = \"drop\"\n"))
                .contains("unknown variant `drop`")
        );
        assert!(error(format!("{GOOD}[audit]\nqueue = 5\n")).contains("audit: needs file"));
        assert!(error(format!(
            "{GOOD}[audit]\nfile = \"a\"\nsyslog = \"/dev/log\"\n"
        ))
        .contains("either file or syslog"));
        assert!(error(format!("{GOOD}[audit]\nsyslog = \"dev/log\"\n"))
            .contains("audit.syslog: the absolute path"));
        assert!(parse(&format!("{GOOD}[audit]\nsyslog = \"/dev/log\"\n")).is_ok());
    }

    #[test]
    fn access_rules_are_checked() {
        let error = |text: String| parse(&text).unwrap_err().to_string();
        let ok = parse(&format!(
            "{GOOD}[[route.acl]]\naction = \"allow\"\nsan_dns = [\"*.ops.example\"]\n\
             [[route.acl]]\naction = \"deny\"\nsource = [\"0.0.0.0/0\"]\n"
        ))
        .unwrap();
        assert_eq!(ok.routes[0].acl.len(), 2);
        assert!(error(format!(
            "{GOOD}[[route.acl]]\naction = \"allow\"\nsource = [\"10.0.0/8\"]\n"
        ))
        .contains("route[0].acl[0].source: \"10.0.0/8\" is not an address or a CIDR range"));
        assert!(error(format!(
            "{GOOD}[[route.acl]]\naction = \"allow\"\nsha256 = [\"00\"]\n"
        ))
        .contains("route[0].acl[0]: sha256: \"00\" is not a SHA-256 fingerprint"));
        assert!(error(format!("{GOOD}[[route.acl]]\naction = \"permit\"\n"))
            .contains("unknown variant `permit`"));
        assert!(error(format!(
            "{GOOD}[[route.acl]]\naction = \"allow\"\nsan = [\"x\"]\n"
        ))
        .contains("unknown field `san`"));
    }

    #[test]
    fn priority_levels_and_plain_listeners_are_checked() {
        let plain = "[[listener]]\nname = \"plain\"\naddress = \"127.0.0.1:8080\"\n\
                     mode = \"http\"\ntls = false\ndefault_pool = \"web\"\n";
        let levels = "[[priority]]\nname = \"high\"\nclients = [\"10.0.0.0/8\"]\n\
                      [[priority]]\nname = \"low\"\nresponse_time_ms = 100\n";
        let ok = format!("{GOOD}{plain}priority = \"low\"\n{levels}");
        let config = parse(&ok).unwrap();
        assert!(!*config.listeners[1].tls.get_ref());
        let error = |text: String| parse(&text).unwrap_err().to_string();
        assert!(error(format!("{GOOD}{plain}priority = \"gold\"\n{levels}"))
            .contains("listener[1].priority: no [[priority]] level is named \"gold\""),);
        assert!(
            error(format!("{GOOD}{plain}{levels}").replace("mode = \"http\"\n", ""))
                .contains("listener[1].tls: a plain (tls = false) listener needs mode = \"http\"")
        );
        assert!(error(format!(
            "{GOOD}{plain}[[listener.certificate]]\nchain = \"c\"\nkey = \"k\"\n"
        ))
        .contains("takes no certificate"));
        assert!(
            error(format!("{GOOD}{}", plain.replace("tls = false\n", "")))
                .contains("listener[1].certificate: a listener needs a certificate")
        );
        assert!(error(format!("{GOOD}{levels}{levels}"))
            .contains("priority[2].name: another priority level has this name"));
        assert!(error(format!(
            "{GOOD}{}",
            levels.replace("10.0.0.0/8", "10.0.0/8")
        ))
        .contains("priority[0].clients: \"10.0.0/8\" is not an address or a CIDR range"));
        assert!(error(format!("{GOOD}{}", levels.replace("= 100", "= 0")))
            .contains("priority[1].response_time_ms: must be at least 1"));
        let inspect = format!("{GOOD}{plain}[listener.inspect]\n");
        assert!(error(format!("{inspect}deny_paths = [\"(unclosed\"]\n"))
            .contains("listener[1].inspect.deny_paths: \"(unclosed\""));
        assert!(error(format!("{inspect}methods = [\"get\"]\n"))
            .contains("listener[1].inspect.methods: \"get\" is not a method name"));
        assert!(parse(&format!(
            "{inspect}methods = [\"GET\"]\nmax_body_bytes = 10\n"
        ))
        .is_ok());
        assert!(
            error(format!("{GOOD}[listener.cache]\nmax_bytes = 100000\n"))
                .contains("listener[0].cache: [listener.cache] needs mode = \"http\"")
        );
        assert!(error(format!(
            "{GOOD}{plain}[listener.cache]\nmax_bytes = 2048\nmax_object_bytes = 4096\n"
        ))
        .contains("more than the whole cache"));
        // HTTP/2 pools: only "1.1" or "2", and never behind an L4 listener.
        let h2 = GOOD.replace(
            "servers = [\"127.0.0.1:8080\"]",
            "servers = [\"127.0.0.1:8080\"]\nhttp_version = \"2\"",
        );
        assert!(error(h2.clone()).contains(
            "listener[0].mode: pool \"web\" speaks HTTP/2 to its servers (http_version = \"2\")"
        ));
        assert!(parse(
            &h2.replace(
                "default_pool = \"web\"",
                "default_pool = \"web\"\nmode = \"http\""
            )
            .replace("sni = \"api.example.com\"\n", "")
        )
        .is_ok());
        assert!(error(GOOD.replace(
            "servers = [\"127.0.0.1:8080\"]",
            "servers = [\"127.0.0.1:8080\"]\nhttp_version = \"3\"",
        ))
        .contains("pool[0].http_version: \"1.1\" or \"2\""));
    }

    #[test]
    fn the_documented_example_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tlsaccel.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let config = Config::parse(&text, &path).unwrap();
        assert!(!config.listeners.is_empty() && !config.pools.is_empty());
    }
}
