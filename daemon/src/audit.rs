//! The audit log (`[audit]`): one JSON record per access decision — each TLS connection's
//! (let in, or refused over its certificate or an access rule) and each HTTP request an
//! access rule decided — written by a task of its own through a bounded queue.
//!
//! Nothing is dropped quietly: when the queue is full a decision either waits for room
//! (`on_full = "block"`) or is refused (`"refuse"`: the connection gets `internal_error`,
//! the request 503), and both are counted. A write that fails is tried again every second
//! with the same lines, so a stuck disk fills the queue and the policy applies. The file
//! is renamed to `<file>.<UTC time>` (never over an earlier one) when it passes
//! `max_bytes`, and reopened on SIGHUP (after an outside rotation). Or each record goes as
//! one RFC 5424 datagram to a local syslog socket (`syslog = "/dev/log"`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::config;
use crate::identity::PeerIdentity;

/// Most lines written with one write.
const BATCH: usize = 1024;
/// Pause before a failed write or open is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// Longest request path kept in a record (longer ones are cut, and say so).
const MAX_PATH: usize = 1024;

/// What a decision does when the queue is full.
pub use config::AuditOnFull as OnFull;

/// The certificate part of a record.
#[derive(Debug, Serialize)]
pub struct Certificate<'a> {
    pub sha256: &'a str,
    pub subject: &'a str,
    pub issuer: &'a str,
}

impl<'a> From<&'a PeerIdentity> for Certificate<'a> {
    fn from(id: &'a PeerIdentity) -> Self {
        Self {
            sha256: &id.sha256,
            subject: &id.subject,
            issuer: &id.issuer,
        }
    }
}

/// One access decision.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    /// `connection` or `request`.
    pub event: &'static str,
    pub listener: &'a str,
    /// The client's address and port (as a trusted PROXY header gave it, if one did).
    pub client: String,
    pub sni: Option<&'a str>,
    pub certificate: Option<Certificate<'a>>,
    /// The pool the route chose.
    pub route: Option<&'a str>,
    /// HTTP mode: the request's method and path.
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
    /// The access rule that decided (its index in the route's or listener's list).
    pub rule: Option<usize>,
    /// `allow`, `deny`, or the alert that refused the client's certificate.
    pub result: &'a str,
    /// L4 mode: the server connected to.
    pub backend: Option<String>,
}

/// Counters of the audit log (`tlsaccel_audit_*`).
#[derive(Debug, Default)]
pub struct Stats {
    pub written: AtomicU64,
    /// Decisions that waited for room in the queue (`block`).
    pub waited: AtomicU64,
    /// Decisions refused because the queue was full (`refuse`).
    pub refused: AtomicU64,
    pub write_errors: AtomicU64,
    pub rotations: AtomicU64,
}

enum Message {
    Line(Vec<u8>),
    Reopen,
}

/// The daemon's audit log.
#[derive(Debug)]
pub struct Audit {
    tx: mpsc::Sender<Message>,
    on_full: OnFull,
    pub stats: std::sync::Arc<Stats>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Message::Line(line) => write!(f, "Line({} bytes)", line.len()),
            Message::Reopen => f.write_str("Reopen"),
        }
    }
}

impl Audit {
    /// Starts the writer task (on the current runtime) for `settings`; `base` is the
    /// configuration file's folder.
    pub fn start(settings: &config::Audit, base: &Path) -> Self {
        let (tx, rx) = mpsc::channel(*settings.queue.get_ref() as usize);
        let stats = std::sync::Arc::new(Stats::default());
        let sink = match (&settings.file, &settings.syslog) {
            (_, Some(socket)) => Sink::Syslog {
                socket: PathBuf::from(socket.get_ref()),
            },
            (Some(file), None) => Sink::File {
                path: base.join(file.get_ref()),
                max_bytes: *settings.max_bytes.get_ref(),
            },
            // The configuration's check asks for one of them.
            (None, None) => Sink::Syslog {
                socket: PathBuf::from("/dev/log"),
            },
        };
        tokio::spawn(write_loop(sink, rx, std::sync::Arc::clone(&stats)));
        Self {
            tx,
            on_full: *settings.on_full.get_ref(),
            stats,
        }
    }

    /// Queues `record`; `false` when it could not be and the decision must be refused
    /// (`on_full = "refuse"` and the queue full, or the writer gone).
    pub async fn record(&self, record: &Record<'_>) -> bool {
        let mut line = match serde_json::to_vec(&Stamped {
            time: now_rfc3339(),
            record,
        }) {
            Ok(line) => line,
            Err(error) => {
                // Serializing these fields cannot fail; if it ever does, refuse.
                tracing::error!(%error, "audit record not encoded");
                return false;
            }
        };
        line.push(b'\n');
        match self.tx.try_send(Message::Line(line)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(message)) => match self.on_full {
                OnFull::Refuse => {
                    self.stats.refused.fetch_add(1, Ordering::Relaxed);
                    false
                }
                OnFull::Block => {
                    self.stats.waited.fetch_add(1, Ordering::Relaxed);
                    self.tx.send(message).await.is_ok()
                }
            },
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Closes and opens the file again (after it was rotated outside the daemon).
    pub fn reopen(&self) {
        // A full queue still gets the reopen: it waits behind the lines.
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(Message::Reopen).await;
        });
    }
}

#[derive(Serialize)]
struct Stamped<'a, 'b> {
    time: String,
    #[serde(flatten)]
    record: &'a Record<'b>,
}

/// The time as RFC 3339 in UTC, to the microsecond.
fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| now.unix_timestamp().to_string())
}

/// A request path for a record: at most 1,024 bytes (cut at a character boundary).
pub fn short_path(path: &str) -> &str {
    if path.len() <= MAX_PATH {
        return path;
    }
    let mut end = MAX_PATH;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    &path[..end]
}

async fn open(path: &Path) -> std::io::Result<(tokio::fs::File, u64)> {
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await?;
    let size = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    Ok((file, size))
}

/// Where records go.
#[derive(Debug)]
pub enum Sink {
    /// Appended to a file, renamed once it passes `max_bytes`.
    File { path: PathBuf, max_bytes: u64 },
    /// One RFC 5424 datagram each to a local syslog socket (`/dev/log`).
    Syslog { socket: PathBuf },
}

/// A sink opened (or not yet).
enum Open {
    File(tokio::fs::File, u64),
    Syslog(tokio::net::UnixDatagram),
}

impl Sink {
    fn describe(&self) -> String {
        match self {
            Sink::File { path, .. } => path.display().to_string(),
            Sink::Syslog { socket } => format!("syslog {}", socket.display()),
        }
    }

    async fn open(&self) -> std::io::Result<Open> {
        match self {
            Sink::File { path, .. } => open(path).await.map(|(f, size)| Open::File(f, size)),
            Sink::Syslog { .. } => tokio::net::UnixDatagram::unbound().map(Open::Syslog),
        }
    }

    /// Writes `lines[*done..]`, moving `done` past each line written; `Ok(true)` when the
    /// file is full and should be renamed.
    async fn write(
        &self,
        open: &mut Open,
        lines: &[Vec<u8>],
        done: &mut usize,
    ) -> std::io::Result<bool> {
        match (self, open) {
            (Sink::File { max_bytes, .. }, Open::File(file, size)) => {
                let batch: Vec<u8> = lines[*done..].concat();
                file.write_all(&batch).await?;
                file.flush().await?;
                *size += batch.len() as u64;
                *done = lines.len();
                Ok(*size >= *max_bytes)
            }
            (Sink::Syslog { socket }, Open::Syslog(datagram)) => {
                for line in &lines[*done..] {
                    let message = syslog_message(line);
                    datagram.send_to(&message, socket).await?;
                    *done += 1;
                }
                Ok(false)
            }
            _ => Err(std::io::Error::other("audit sink and its handle differ")),
        }
    }
}

/// A record as an RFC 5424 message: facility authpriv (10), severity info (6), app
/// `tlsaccel`, msgid `access`, the JSON as the message (without its newline).
fn syslog_message(line: &[u8]) -> Vec<u8> {
    let json = line.strip_suffix(b"\n").unwrap_or(line);
    let mut message = format!(
        "<86>1 {} - tlsaccel {} access - ",
        now_rfc3339(),
        std::process::id()
    )
    .into_bytes();
    message.extend_from_slice(json);
    message
}

async fn write_loop(sink: Sink, mut rx: mpsc::Receiver<Message>, stats: std::sync::Arc<Stats>) {
    let mut handle: Option<Open> = None;
    let mut pending: Vec<Vec<u8>> = Vec::new();
    let mut done = 0usize;
    loop {
        if done == pending.len() {
            pending.clear();
            done = 0;
            match rx.recv().await {
                Some(Message::Line(line)) => pending.push(line),
                Some(Message::Reopen) => {
                    handle = None;
                    continue;
                }
                None => return,
            }
            while pending.len() < BATCH {
                match rx.try_recv() {
                    Ok(Message::Line(line)) => pending.push(line),
                    Ok(Message::Reopen) => handle = None,
                    Err(_) => break,
                }
            }
        }
        if handle.is_none() {
            match sink.open().await {
                Ok(opened) => handle = Some(opened),
                Err(error) => {
                    stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(sink = %sink.describe(), %error, "audit log cannot be opened; retrying");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            }
        }
        let Some(open) = handle.as_mut() else {
            continue;
        };
        let before = done;
        let result = sink.write(open, &pending, &mut done).await;
        stats
            .written
            .fetch_add((done - before) as u64, Ordering::Relaxed);
        match result {
            Ok(full) => {
                if let (true, Sink::File { path, .. }) = (full, &sink) {
                    handle = None;
                    let rotated = rotated_name(path);
                    match tokio::fs::rename(path, &rotated).await {
                        Ok(()) => {
                            stats.rotations.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(error) => {
                            stats.write_errors.fetch_add(1, Ordering::Relaxed);
                            tracing::error!(path = %path.display(), %error, "audit log rotation failed");
                        }
                    }
                }
            }
            Err(error) => {
                // What was not written goes again, on a fresh handle, after a pause.
                stats.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(sink = %sink.describe(), %error, "audit log write failed; retrying");
                handle = None;
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// The name a full audit file is renamed to: `<file>.<UTC time>`, with `.<n>` added when
/// that exists already, so no earlier file is ever replaced.
fn rotated_name(path: &Path) -> PathBuf {
    let now = time::OffsetDateTime::now_utc();
    let stamp = format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    );
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{stamp}"));
    let first = PathBuf::from(&name);
    if !first.exists() {
        return first;
    }
    (1u32..)
        .map(|n| {
            let mut numbered = name.clone();
            numbered.push(format!(".{n}"));
            PathBuf::from(numbered)
        })
        .find(|candidate| !candidate.exists())
        .unwrap_or(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_paths_are_cut_at_a_character() {
        assert_eq!(short_path("/a"), "/a");
        let long = "é".repeat(MAX_PATH);
        let cut = short_path(&long);
        assert!(cut.len() <= MAX_PATH && cut.len() >= MAX_PATH - 1);
        assert!(now_rfc3339().ends_with('Z'), "{}", now_rfc3339());
    }

    #[test]
    fn a_syslog_message_is_rfc_5424_with_the_json_as_its_message() {
        let message = String::from_utf8(syslog_message(b"{\"a\":1}\n")).expect("utf-8");
        assert!(message.starts_with("<86>1 "), "{message}");
        let parts: Vec<&str> = message.splitn(8, ' ').collect();
        assert!(parts[1].ends_with('Z'), "timestamp: {message}");
        assert_eq!(parts[2], "-", "hostname left to the syslog daemon");
        assert_eq!(parts[3], "tlsaccel");
        assert_eq!(parts[4], std::process::id().to_string());
        assert_eq!(parts[5], "access");
        assert_eq!(parts[6], "-");
        assert_eq!(parts[7], "{\"a\":1}");
    }

    #[test]
    fn a_rotated_file_never_replaces_an_earlier_one() {
        let dir = std::env::temp_dir().join(format!("tlsaccel-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("audit.jsonl");
        let first = rotated_name(&path);
        assert!(first
            .to_string_lossy()
            .starts_with(&format!("{}.2", path.display())));
        std::fs::write(&first, "taken").expect("write");
        let second = rotated_name(&path);
        // Within the same second: numbered after the taken one (or a new second's name).
        assert_ne!(first, second);
        assert!(!second.exists());
        std::fs::remove_dir_all(&dir).ok();
    }
}
