//! Session resumption through `tlsaccel serve`: tickets sealed by one node resume on
//! another that reads the same key file, across a key file rotation made without a reload;
//! a ticket under a key retired past its window gets a full handshake; TLS 1.2 tickets
//! across nodes with `openssl s_client -sess_out` / `-sess_in`.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rustls::HandshakeKind;
use support::{Daemon, Scratch};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROTATED: Duration = Duration::from_secs(20);

fn node_config(backend: SocketAddr, node: &str, extra: &str) -> String {
    support::config(
        &[backend],
        "",
        &format!(
            "[resumption]\nticket_keys = \"file\"\nkey_files = [\"ticket.key\"]\n\
             key_file_check_ms = 100\nnode = \"{node}\"\n{extra}"
        ),
    )
}

/// A node in its own directory, with the cluster's key file and certificate.
fn start_node(root: &Path, name: &str, backend: SocketAddr, extra: &str) -> Daemon {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).expect("node dir");
    for file in ["cert.pem", "key.pem"] {
        std::fs::copy(root.join(file), dir.join(file)).expect("copy identity");
    }
    write_key(&dir, 1);
    Daemon::start(&dir, &node_config(backend, name, extra))
}

/// Writes an nginx-format key file (80 bytes) named by `name` into `dir`, the way an
/// operator's tooling does (a new file moved into place).
fn write_key(dir: &Path, name: u8) {
    let mut key = vec![name; 16];
    key.extend((0..64u8).map(|i| i.wrapping_mul(31).wrapping_add(name)));
    let tmp = dir.join("ticket.key.new");
    std::fs::write(&tmp, key).expect("write key");
    std::fs::rename(&tmp, dir.join("ticket.key")).expect("move key");
}

/// One connection: a line through the echo backend (which also lets the client take the
/// server's tickets); returns how the handshake went.
async fn exchange(address: SocketAddr, config: &Arc<rustls::ClientConfig>) -> HandshakeKind {
    let mut tls = support::connect(address, config).await;
    tls.write_all(b"hello\n").await.expect("write");
    let mut line = [0u8; 6];
    tls.read_exact(&mut line).await.expect("echo");
    assert_eq!(&line, b"hello\n");
    let kind = tls.get_ref().1.handshake_kind().expect("handshake done");
    let _ = tls.shutdown().await;
    kind
}

fn accepted(daemon: &Daemon, key: &str, origin: &str) -> u64 {
    daemon.metric(&format!(
        "tlsaccel_tickets_accepted_total{{key=\"{key}\",origin=\"{origin}\"}}"
    ))
}

#[test]
fn tickets_resume_on_another_node_and_across_a_key_file_rotation() {
    let scratch = Scratch::new("resume-nodes");
    let cert = support::write_identity(&scratch.0);
    let rt = support::runtime();
    let (backend, _echo) = rt.block_on(support::echo_server(None));
    let a = start_node(&scratch.0, "a", backend, "");
    let b = start_node(&scratch.0, "b", backend, "");
    let status = a.admin_get("/status");
    assert!(status.contains("\"node\":\"a\""), "{status}");
    assert!(
        status.contains(&"01".repeat(16)),
        "key id in /status: {status}"
    );

    let client = support::client_config(&cert, &[&rustls::version::TLS13]);
    rt.block_on(async {
        assert_eq!(exchange(a.listen, &client).await, HandshakeKind::Full);
        assert_eq!(exchange(b.listen, &client).await, HandshakeKind::Resumed);
    });
    assert_eq!(accepted(&b, "current", "other_node"), 1);
    assert_eq!(a.metric("tlsaccel_tickets_issued_total"), 2);

    // New keys on both nodes, no reload: each takes its file within the check interval.
    for node in ["a", "b"] {
        write_key(&scratch.0.join(node), 2);
    }
    for node in [&a, &b] {
        let rotations =
            node.metric_until("tlsaccel_ticket_key_rotations_total", ROTATED, |n| n >= 2);
        assert_eq!(rotations, 2, "the new key file was not taken");
    }
    assert_eq!(a.metric("tlsaccel_reloads_total{result=\"ok\"}"), 0);
    rt.block_on(async {
        // The client still holds tickets sealed under the first key.
        assert_eq!(exchange(a.listen, &client).await, HandshakeKind::Resumed);
    });
    assert_eq!(
        accepted(&a, "previous", "this_node") + accepted(&a, "previous", "other_node"),
        1,
        "a ticket under the previous key resumed"
    );
    rt.block_on(async {
        assert_eq!(exchange(b.listen, &client).await, HandshakeKind::Resumed);
    });
    assert_eq!(
        a.metric("tlsaccel_tickets_rejected_total{reason=\"bad_tag\"}"),
        0
    );
}

#[test]
fn a_ticket_under_a_key_retired_past_its_window_gets_a_full_handshake() {
    let scratch = Scratch::new("resume-window");
    let cert = support::write_identity(&scratch.0);
    let rt = support::runtime();
    let (backend, _echo) = rt.block_on(support::echo_server(None));
    let node = start_node(&scratch.0, "c", backend, "retired_key_window_s = 1\n");
    let client = support::client_config(&cert, &[&rustls::version::TLS13]);
    rt.block_on(async {
        assert_eq!(exchange(node.listen, &client).await, HandshakeKind::Full);
    });
    write_key(&scratch.0.join("c"), 9);
    let rotations = node.metric_until("tlsaccel_ticket_key_rotations_total", ROTATED, |n| n >= 2);
    assert_eq!(rotations, 2);
    // The retired key leaves the ring once its 1 s window has passed.
    let keys = node.metric_until("tlsaccel_ticket_keys", ROTATED, |n| n == 1);
    assert_eq!(keys, 1, "the retired key was not dropped");
    rt.block_on(async {
        assert_eq!(exchange(node.listen, &client).await, HandshakeKind::Full);
        // Its new tickets resume.
        assert_eq!(exchange(node.listen, &client).await, HandshakeKind::Resumed);
    });
    assert_eq!(
        node.metric("tlsaccel_tickets_rejected_total{reason=\"unknown_key\"}"),
        1
    );
    assert_eq!(
        node.metric("tlsaccel_handshake_failures_total{reason=\"tls\"}"),
        0
    );
}

#[test]
fn tls12_tickets_resume_across_nodes_with_openssl() {
    let scratch = Scratch::new("resume-tls12");
    support::write_identity(&scratch.0);
    let rt = support::runtime();
    let (backend, _echo) = rt.block_on(support::echo_server(None));
    let a = start_node(&scratch.0, "a", backend, "");
    let b = start_node(&scratch.0, "b", backend, "");
    let session = scratch.0.join("session.pem");
    let s_client = |node: &Daemon, session_arg: &str| {
        let output = Command::new("openssl")
            .args(["s_client", "-tls1_2", "-connect"])
            .arg(node.listen.to_string())
            .args(["-servername", "localhost", session_arg])
            .arg(&session)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run openssl s_client");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let first = s_client(&a, "-sess_out");
    assert!(first.contains("New, TLSv1.2"), "{first}");
    assert!(
        first.contains("TLS session ticket lifetime hint: 7200"),
        "{first}"
    );
    let second = s_client(&b, "-sess_in");
    assert!(second.contains("Reused, TLSv1.2"), "{second}");
    assert_eq!(accepted(&b, "current", "other_node"), 1);
}

#[test]
fn sessions_made_before_a_reload_resume_after_it_on_the_embedded_defaults() {
    let scratch = Scratch::new("resume-reload");
    let cert = support::write_identity(&scratch.0);
    let rt = support::runtime();
    let (backend, _echo) = rt.block_on(support::echo_server(None));
    // No [resumption] section: random keys made in the process.
    let daemon = Daemon::start(&scratch.0, &support::config(&[backend], "", ""));
    let tls13 = support::client_config(&cert, &[&rustls::version::TLS13]);
    let tls12 = support::client_config(&cert, &[&rustls::version::TLS12]);
    rt.block_on(async {
        assert_eq!(exchange(daemon.listen, &tls13).await, HandshakeKind::Full);
        assert_eq!(exchange(daemon.listen, &tls12).await, HandshakeKind::Full);
    });
    daemon.signal(rustix::process::Signal::HUP);
    let reloads = daemon.metric_until("tlsaccel_reloads_total{result=\"ok\"}", ROTATED, |n| n >= 1);
    assert_eq!(reloads, 1);
    rt.block_on(async {
        // A TLS 1.3 ticket and a TLS 1.2 session (ticket or session id) from before.
        assert_eq!(
            exchange(daemon.listen, &tls13).await,
            HandshakeKind::Resumed
        );
        assert_eq!(
            exchange(daemon.listen, &tls12).await,
            HandshakeKind::Resumed
        );
    });
    assert_eq!(daemon.metric("tlsaccel_ticket_key_rotations_total"), 1);
}
