//! The audit log (`[audit]`): one JSON line per access decision — each TLS connection's
//! (let in, or refused over its certificate or an access rule) and each HTTP request an
//! access rule decided — written by a task of its own through a bounded queue.
//!
//! Nothing is dropped quietly: when the queue is full a decision either waits for room
//! (`on_full = "block"`) or is refused (`"refuse"`: the connection gets `internal_error`,
//! the request 503), and both are counted. A write that fails is tried again every second
//! with the same lines, so a stuck disk fills the queue and the policy applies. The file
//! is renamed to `<file>.<UTC time>` (never over an earlier one) when it passes
//! `max_bytes`, and reopened on SIGHUP (after an outside rotation).

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
        tokio::spawn(write_loop(
            base.join(settings.file.get_ref()),
            *settings.max_bytes.get_ref(),
            rx,
            std::sync::Arc::clone(&stats),
        ));
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

async fn write_loop(
    path: PathBuf,
    max_bytes: u64,
    mut rx: mpsc::Receiver<Message>,
    stats: std::sync::Arc<Stats>,
) {
    let mut file: Option<(tokio::fs::File, u64)> = None;
    let mut pending: Vec<u8> = Vec::new();
    let mut lines = 0u64;
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some(Message::Line(line)) => {
                    pending.extend_from_slice(&line);
                    lines += 1;
                }
                Some(Message::Reopen) => {
                    file = None;
                    continue;
                }
                None => return,
            }
            while lines < BATCH as u64 {
                match rx.try_recv() {
                    Ok(Message::Line(line)) => {
                        pending.extend_from_slice(&line);
                        lines += 1;
                    }
                    Ok(Message::Reopen) => file = None,
                    Err(_) => break,
                }
            }
        }
        if file.is_none() {
            match open(&path).await {
                Ok(opened) => file = Some(opened),
                Err(error) => {
                    stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(path = %path.display(), %error, "audit log cannot be opened; retrying");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            }
        }
        let Some((handle, size)) = file.as_mut() else {
            continue;
        };
        let written = async {
            handle.write_all(&pending).await?;
            handle.flush().await
        }
        .await;
        if let Err(error) = written {
            // The same lines again, on a fresh handle, after a pause.
            stats.write_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(path = %path.display(), %error, "audit log write failed; retrying");
            file = None;
            tokio::time::sleep(RETRY).await;
            continue;
        }
        *size += pending.len() as u64;
        stats.written.fetch_add(lines, Ordering::Relaxed);
        pending.clear();
        lines = 0;
        if *size >= max_bytes {
            file = None;
            let rotated = rotated_name(&path);
            match tokio::fs::rename(&path, &rotated).await {
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
