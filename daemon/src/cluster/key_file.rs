//! Ticket key files in the formats operators already keep for nginx and HAProxy.
//!
//! * **nginx** (`ssl_session_ticket_key`): each file holds one key of exactly 48 or 80
//!   random bytes (`openssl rand 80 > ticket.key`); the first 16 bytes name the key. With
//!   several files, the first seals new tickets and the others only open.
//! * **HAProxy** (`tls-ticket-keys`): one file, one base64 key of 48 or 80 bytes per line
//!   (`openssl rand 80 | openssl base64 -A >> ticket.keys`), all of one length. As in
//!   HAProxy, only the last three keys are used: the second-to-last seals (the last is the
//!   next one, already known to every node before it seals anything) and the three open; a
//!   file of one key seals with it. Every line must still be a valid key.
//!
//! The tickets themselves are tlsaccel's own (see [`super::ticket_keys`]): the file gives the
//! key name and the secret the sealing key is derived from, so nginx or HAProxy nodes cannot
//! open tlsaccel's tickets or the other way round, even with the same file.

use zeroize::Zeroizing;

use super::ticket_keys::{TicketKey, KEY_ID_LEN};

/// Which format the files are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyFileFormat {
    Nginx,
    Haproxy,
}

/// Why a key file was refused (the file is named by the caller).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    #[error("{0} bytes; a key is 48 or 80 bytes")]
    Size(usize),
    #[error("line {0}: not base64")]
    Base64(usize),
    #[error("line {line}: a key of {len} bytes; a key is 48 or 80 bytes")]
    LineSize { line: usize, len: usize },
    #[error("line {0}: a key of another length than the first; do not mix 48- and 80-byte keys")]
    Mixed(usize),
    #[error("no key in it")]
    Empty,
    #[error("two keys named {0}")]
    DuplicateName(String),
    #[error("{0}")]
    Key(#[from] super::ticket_keys::KeyError),
}

/// The keys of a key source: the one that seals, and the others, which only open.
#[derive(Debug)]
pub struct KeySet {
    pub sealing: TicketKey,
    pub others: Vec<TicketKey>,
}

fn key_from(bytes: &[u8]) -> Result<TicketKey, KeyFileError> {
    let (name, secret) = bytes.split_at(KEY_ID_LEN);
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(name);
    Ok(TicketKey::from_material(id, secret)?)
}

fn size_ok(len: usize) -> bool {
    len == 48 || len == 80
}

/// One nginx key file's contents.
pub fn parse_nginx(contents: &[u8]) -> Result<TicketKey, KeyFileError> {
    if !size_ok(contents.len()) {
        return Err(KeyFileError::Size(contents.len()));
    }
    key_from(contents)
}

/// The contents of nginx key files, in configured order: the first seals.
pub fn nginx_set(files: &[Zeroizing<Vec<u8>>]) -> Result<KeySet, (usize, KeyFileError)> {
    let mut keys = Vec::with_capacity(files.len());
    for (i, contents) in files.iter().enumerate() {
        keys.push(parse_nginx(contents).map_err(|e| (i, e))?);
    }
    set(keys, 0).map_err(|e| (0, e))
}

/// An HAProxy key file's contents.
/// Keys of an HAProxy file in use: the previous, the sealing and the next one.
const HAPROXY_KEYS: usize = 3;

pub fn parse_haproxy(contents: &[u8]) -> Result<KeySet, KeyFileError> {
    use base64::Engine as _;
    let mut keys = Vec::new();
    let mut length = None;
    // Lines as bytes: no copy of the file's text is left behind unzeroed.
    for (i, line) in contents.split(|&b| b == b'\n').enumerate() {
        let line = line.trim_ascii();
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        let number = i + 1;
        let bytes = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(line)
                .map_err(|_| KeyFileError::Base64(number))?,
        );
        if !size_ok(bytes.len()) {
            return Err(KeyFileError::LineSize {
                line: number,
                len: bytes.len(),
            });
        }
        if *length.get_or_insert(bytes.len()) != bytes.len() {
            return Err(KeyFileError::Mixed(number));
        }
        keys.push(key_from(&bytes)?);
    }
    // HAProxy's rule: the last three keys; the rest are lines the operator has not trimmed.
    let keys = keys.split_off(keys.len().saturating_sub(HAPROXY_KEYS));
    let sealing = keys.len().saturating_sub(2);
    set(keys, sealing)
}

fn set(mut keys: Vec<TicketKey>, sealing: usize) -> Result<KeySet, KeyFileError> {
    if keys.is_empty() {
        return Err(KeyFileError::Empty);
    }
    for (i, key) in keys.iter().enumerate() {
        if keys[..i].iter().any(|k| k.id() == key.id()) {
            return Err(KeyFileError::DuplicateName(hex::encode(key.id())));
        }
    }
    let sealing = keys.remove(sealing);
    Ok(KeySet {
        sealing,
        others: keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn raw(name: u8, len: usize) -> Vec<u8> {
        let mut bytes = vec![name; KEY_ID_LEN];
        bytes.extend((0..len - KEY_ID_LEN).map(|i| (i as u8).wrapping_mul(name)));
        bytes
    }

    fn line(name: u8, len: usize) -> String {
        base64::engine::general_purpose::STANDARD.encode(raw(name, len))
    }

    #[test]
    fn nginx_files_of_48_and_80_bytes_name_their_key_with_the_first_16() {
        for len in [48, 80] {
            let key = parse_nginx(&raw(9, len)).unwrap();
            assert_eq!(key.id(), [9; KEY_ID_LEN]);
        }
        for len in [0, 16, 47, 49, 79, 81, 96] {
            assert_eq!(
                parse_nginx(&vec![1; len]).unwrap_err(),
                KeyFileError::Size(len)
            );
        }
    }

    #[test]
    fn with_several_nginx_files_the_first_seals() {
        let files = vec![Zeroizing::new(raw(1, 80)), Zeroizing::new(raw(2, 80))];
        let set = nginx_set(&files).unwrap();
        assert_eq!(set.sealing.id(), [1; KEY_ID_LEN]);
        assert_eq!(set.others.len(), 1);
        let bad = vec![Zeroizing::new(raw(1, 80)), Zeroizing::new(vec![0; 12])];
        assert_eq!(nginx_set(&bad).unwrap_err(), (1, KeyFileError::Size(12)));
    }

    #[test]
    fn haproxy_seals_with_the_second_to_last_key() {
        let text = format!(
            "{}\n\n# comment\n{}\n{}\n",
            line(1, 80),
            line(2, 80),
            line(3, 80)
        );
        let set = parse_haproxy(text.as_bytes()).unwrap();
        assert_eq!(set.sealing.id(), [2; KEY_ID_LEN]);
        let others: Vec<_> = set.others.iter().map(|k| k.id()[0]).collect();
        assert_eq!(others, [1, 3]);
        // Only the last three keys are used, as in HAProxy (Windows line ends too).
        let longer = format!("{}\r\n{text}{}\r\n", line(9, 80), line(4, 80));
        let set = parse_haproxy(longer.as_bytes()).unwrap();
        assert_eq!(set.sealing.id(), [3; KEY_ID_LEN]);
        let others: Vec<_> = set.others.iter().map(|k| k.id()[0]).collect();
        assert_eq!(others, [2, 4]);
        // One key: it seals.
        let one = parse_haproxy(line(5, 48).as_bytes()).unwrap();
        assert_eq!((one.sealing.id()[0], one.others.len()), (5, 0));
    }

    #[test]
    fn haproxy_files_that_are_wrong_say_which_line() {
        let mixed = format!("{}\n{}\n", line(1, 80), line(2, 48));
        assert_eq!(
            parse_haproxy(mixed.as_bytes()).unwrap_err(),
            KeyFileError::Mixed(2)
        );
        let bad = format!("{}\nnot base64!\n", line(1, 80));
        assert_eq!(
            parse_haproxy(bad.as_bytes()).unwrap_err(),
            KeyFileError::Base64(2)
        );
        let short = base64::engine::general_purpose::STANDARD.encode([0u8; 32]);
        assert_eq!(
            parse_haproxy(short.as_bytes()).unwrap_err(),
            KeyFileError::LineSize { line: 1, len: 32 }
        );
        assert_eq!(
            parse_haproxy(b"\n# only a comment\n").unwrap_err(),
            KeyFileError::Empty
        );
        let twice = format!("{}\n{}\n", line(4, 80), line(4, 80));
        assert!(matches!(
            parse_haproxy(twice.as_bytes()).unwrap_err(),
            KeyFileError::DuplicateName(_)
        ));
    }

    #[test]
    fn the_same_file_makes_keys_that_open_each_others_tickets() {
        let now = std::time::Instant::now();
        let hour = std::time::Duration::from_secs(3600);
        let contents = raw(6, 80);
        let mut a = super::super::ticket_keys::KeyRing::default();
        let mut b = super::super::ticket_keys::KeyRing::default();
        a.install(parse_nginx(&contents).unwrap(), now, hour);
        b.install(parse_nginx(&contents).unwrap(), now, hour);
        let ticket = a.seal(b"a", b"state").unwrap();
        assert_eq!(b.open(&ticket, now).unwrap().state, b"state");
    }
}
