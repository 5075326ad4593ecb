//! `tlsaccel serve` end to end: real clients (curl, openssl s_client, rustls) through the
//! daemon process to real backend servers, with the simulated device in the daemon.

mod support;

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use support::{client_config, config, echo_server, echo_transfer, runtime, Daemon, Scratch};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The certificate's key is in a device slot for the daemon's life; traffic keys come and go.
const CERT_KEY_SLOTS: u64 = 1;

fn key_slots(daemon: &Daemon) -> u64 {
    daemon.metric("tlsaccel_device_counter{counter=\"key_slots_loaded\"}")
}

#[test]
fn curl_and_openssl_speak_every_version_and_suite() {
    let rt = runtime();
    let backend = rt
        .block_on(tlsaccel::demo::start_backend(([127, 0, 0, 1], 0).into()))
        .expect("demo backend");
    let dir = Scratch::new("clients");
    support::write_identity(&dir.0);
    let daemon = Daemon::start(&dir.0, &config(&[backend], "", ""));
    let url = format!("https://localhost:{}/path", daemon.listen.port());
    let resolve = format!("localhost:{}:127.0.0.1", daemon.listen.port());
    let cacert = dir.0.join("cert.pem");
    let cases: [(&str, &[&str]); 6] = [
        (
            "TLS13_AES_128_GCM_SHA256",
            &["--tlsv1.3", "--tls13-ciphers", "TLS_AES_128_GCM_SHA256"],
        ),
        (
            "TLS13_AES_256_GCM_SHA384",
            &["--tlsv1.3", "--tls13-ciphers", "TLS_AES_256_GCM_SHA384"],
        ),
        (
            "TLS13_CHACHA20_POLY1305_SHA256",
            &[
                "--tlsv1.3",
                "--tls13-ciphers",
                "TLS_CHACHA20_POLY1305_SHA256",
            ],
        ),
        (
            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
            &[
                "--tlsv1.2",
                "--tls-max",
                "1.2",
                "--ciphers",
                "ECDHE-ECDSA-AES128-GCM-SHA256",
            ],
        ),
        (
            "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
            &[
                "--tlsv1.2",
                "--tls-max",
                "1.2",
                "--ciphers",
                "ECDHE-ECDSA-AES256-GCM-SHA384",
            ],
        ),
        (
            "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
            &[
                "--tlsv1.2",
                "--tls-max",
                "1.2",
                "--ciphers",
                "ECDHE-ECDSA-CHACHA20-POLY1305",
            ],
        ),
    ];
    // A body large enough that the client-to-server direction moves onto the device.
    let body = "x".repeat(50_000);
    for (suite, args) in cases {
        let output = Command::new("curl")
            .args(["-sS", "--max-time", "20", "--resolve", &resolve, "--cacert"])
            .arg(&cacert)
            .args(args)
            .args(["--data-binary", &body, &url])
            .output()
            .expect("curl runs");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "curl {suite}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            text.contains("You sent POST /path with 50000 body bytes."),
            "curl {suite}: {text}"
        );
        let version = if suite.starts_with("TLS13") {
            "TLSv1_3"
        } else {
            "TLSv1_2"
        };
        let series = format!(
            "tlsaccel_handshakes_total{{kind=\"full\",version=\"{version}\",suite=\"{suite}\"}}"
        );
        assert_eq!(daemon.metric(&series), 1, "{series}");
    }
    // openssl s_client, each version, a request written by hand.
    for (version, flag) in [("TLSv1_3", "-tls1_3"), ("TLSv1_2", "-tls1_2")] {
        let mut child = Command::new("openssl")
            .args([
                "s_client",
                "-quiet",
                flag,
                "-servername",
                "localhost",
                "-CAfile",
            ])
            .arg(&cacert)
            .args(["-connect", &daemon.listen.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl runs");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"GET /openssl HTTP/1.0\r\n\r\n")
            .expect("request");
        let mut text = String::new();
        child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut text)
            .expect("response");
        let _ = child.wait();
        assert!(
            text.contains("You sent GET /openssl with 0 body bytes."),
            "openssl {version}: {text}"
        );
    }
    assert!(daemon.metric("tlsaccel_records_total{op=\"open\",engine=\"device\"}") >= 6);
    assert_eq!(
        daemon.metric_until("tlsaccel_connections_active", Duration::from_secs(5), |v| v
            == 0),
        0
    );
    assert_eq!(
        key_slots(&daemon),
        CERT_KEY_SLOTS,
        "traffic keys left in the device"
    );
}

#[test]
fn a_hundred_mib_each_way_arrives_intact() {
    let rt = runtime();
    let (backend, _echo) = rt.block_on(echo_server(None));
    let dir = Scratch::new("bulk");
    let cert = support::write_identity(&dir.0);
    let daemon = Daemon::start(&dir.0, &config(&[backend], "", ""));
    for (i, version) in [&rustls::version::TLS13, &rustls::version::TLS12]
        .into_iter()
        .enumerate()
    {
        let client = client_config(&cert, &[version]);
        let total = if i == 0 { 100 << 20 } else { 8 << 20 };
        let (sent, received) = rt.block_on(async {
            let stream = support::connect(daemon.listen, &client).await;
            echo_transfer(stream, total, 7 + i as u64).await
        });
        assert_eq!(
            sent, received,
            "SHA-256 of what went in and came back ({version:?})"
        );
    }
    let sealed = daemon.metric("tlsaccel_record_bytes_total{op=\"seal\",engine=\"device\"}");
    let opened = daemon.metric("tlsaccel_record_bytes_total{op=\"open\",engine=\"device\"}");
    assert!(sealed >= 100 << 20, "device sealed {sealed} bytes");
    // Once on the device, the backend's bytes are read into DMA memory and sealed from
    // there: no host copy for all but the first reads.
    for op in ["seal", "open"] {
        let zero_copy = daemon.metric(&format!(
            "tlsaccel_record_zero_copy_bytes_total{{op=\"{op}\"}}"
        ));
        assert!(
            zero_copy >= 90 << 20,
            "{op} without a host copy: {zero_copy} bytes"
        );
    }
    assert!(opened >= 100 << 20, "device opened {opened} bytes");
    assert_eq!(daemon.metric("tlsaccel_record_device_fallbacks_total"), 0);
    assert_eq!(
        daemon.metric_until("tlsaccel_connections_active", Duration::from_secs(5), |v| v
            == 0),
        0
    );
    assert_eq!(key_slots(&daemon), CERT_KEY_SLOTS);
}

/// A backend that answers early and stops reading (as a server refusing an oversized
/// request does) while the client is still sending: the client gets the whole answer and
/// close_notify, not a reset, and what it sent after is dropped and counted.
#[test]
fn a_backend_that_stops_reading_still_gets_its_answer_to_the_client() {
    let rt = runtime();
    let dir = Scratch::new("refusing-backend");
    let cert = support::write_identity(&dir.0);
    let backend = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = [0u8; 1024];
                    let _ = stream.read_exact(&mut head).await;
                    let _ = stream.write_all(b"refused\n").await;
                    let _ = stream.shutdown().await;
                    // Closing with the client's bytes unread resets the connection.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    drop(stream);
                });
            }
        });
        address
    });
    let daemon = Daemon::start(&dir.0, &config(&[backend], "", ""));
    let client = client_config(&cert, &[&rustls::version::TLS13]);
    let answer = rt.block_on(async {
        let stream = support::connect(daemon.listen, &client).await;
        let (mut read, mut write) = tokio::io::split(stream);
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 64 * 1024];
            for _ in 0..256 {
                if write.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        });
        let mut answer = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(20), read.read_to_end(&mut answer))
            .await
            .expect("the answer and its end arrive");
        // The client goes on sending after the answer; the daemon drops it until the
        // client stops or LINGER ends.
        tokio::time::timeout(Duration::from_secs(20), writer)
            .await
            .expect("the writer ends")
            .expect("writer");
        end.map(|_| answer)
    });
    assert_eq!(answer.expect("a clean end (close_notify)"), b"refused\n");
    assert!(
        daemon.metric_until(
            "tlsaccel_client_bytes_dropped_total",
            Duration::from_secs(5),
            |v| v > 0
        ) > 0
    );
    assert_eq!(
        daemon.metric_until("tlsaccel_connections_active", Duration::from_secs(5), |v| v
            == 0),
        0
    );
}

#[test]
fn key_updates_from_the_client_and_on_the_daemons_schedule() {
    let rt = runtime();
    let (backend, _echo) = rt.block_on(echo_server(None));
    let dir = Scratch::new("keyupdate");
    let cert = support::write_identity(&dir.0);
    let extra = "[offload]\nrekey_after_records = 20\ncpu_below_bytes = 0\n";
    let daemon = Daemon::start(&dir.0, &config(&[backend], "", extra));
    let client = client_config(&cert, &[&rustls::version::TLS13]);

    // Client-initiated, with update_requested: a blocking rustls client.
    let tcp = std::net::TcpStream::connect(daemon.listen).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let conn = rustls::ClientConnection::new(
        client.clone(),
        rustls::pki_types::ServerName::try_from("localhost").expect("name"),
    )
    .expect("client");
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    for round in 0..5u8 {
        let message = vec![round; 3000];
        tls.write_all(&message).expect("send");
        let mut back = vec![0u8; message.len()];
        tls.read_exact(&mut back).expect("echo");
        assert_eq!(back, message, "round {round}");
        tls.conn.refresh_traffic_keys().expect("key update");
    }
    drop(tls);
    // The fifth update is only queued: rustls sends it with the next write.
    let from_rustls = daemon.metric_until(
        "tlsaccel_key_updates_total{direction=\"received\"}",
        Duration::from_secs(5),
        |v| v >= 4,
    );
    assert_eq!(from_rustls, 4);
    // The daemon answered each (update_requested) with one of its own.
    assert_eq!(
        daemon.metric("tlsaccel_key_updates_total{direction=\"sent\"}"),
        4
    );

    // openssl s_client sends one on `K` (update_requested) at the start of a line. Each
    // step waits for its effect: the echo of a line, the daemon's counter.
    let mut openssl =
        support::OpensslClient::start(&["-tls1_3"], &dir.0.join("cert.pem"), daemon.listen);
    openssl.send("before");
    openssl.wait_for("before", Duration::from_secs(10));
    openssl.send("K");
    daemon.metric_until(
        "tlsaccel_key_updates_total{direction=\"received\"}",
        Duration::from_secs(10),
        |v| v > from_rustls,
    );
    openssl.send("after");
    openssl.wait_for("after", Duration::from_secs(10));
    drop(openssl);
    let received = daemon.metric("tlsaccel_key_updates_total{direction=\"received\"}");
    assert_eq!(received, from_rustls + 1, "openssl's KeyUpdate");
    let answered = daemon.metric("tlsaccel_key_updates_total{direction=\"sent\"}");
    assert_eq!(answered, 5, "the daemon answers update_requested");

    // The daemon's own schedule: every 20 records. 2 MiB is 128 full records each way.
    let (sent, back) = rt.block_on(async {
        let stream = support::connect(daemon.listen, &client).await;
        echo_transfer(stream, 2 << 20, 99).await
    });
    assert_eq!(sent, back);
    let sent_updates = daemon.metric("tlsaccel_key_updates_total{direction=\"sent\"}") - answered;
    assert!(
        sent_updates >= 6,
        "daemon-initiated updates: {sent_updates}"
    );
    assert_eq!(
        daemon.metric_until("tlsaccel_connections_active", Duration::from_secs(5), |v| v
            == 0),
        0
    );
    assert_eq!(key_slots(&daemon), CERT_KEY_SLOTS);
}

/// Sends raw bytes after a real handshake and reports the alert the daemon answers with.
fn alert_after(
    daemon: &Daemon,
    client: &std::sync::Arc<rustls::ClientConfig>,
    mangle: impl FnOnce(Vec<u8>) -> Vec<u8>,
) -> Option<rustls::AlertDescription> {
    let mut tcp = std::net::TcpStream::connect(daemon.listen).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut conn = rustls::ClientConnection::new(
        client.clone(),
        rustls::pki_types::ServerName::try_from("localhost").expect("name"),
    )
    .expect("client");
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).expect("handshake");
    }
    conn.writer().write_all(&[b'a'; 2000]).expect("plaintext");
    let mut record = Vec::new();
    conn.write_tls(&mut record).expect("record");
    tcp.write_all(&mangle(record)).expect("send");
    loop {
        match conn.complete_io(&mut tcp) {
            Ok((0, 0)) => return None,
            Ok(_) => {}
            Err(error) => {
                return match error
                    .into_inner()
                    .and_then(|e| e.downcast::<rustls::Error>().ok())
                {
                    Some(e) => match *e {
                        rustls::Error::AlertReceived(alert) => Some(alert),
                        other => panic!("unexpected error {other}"),
                    },
                    None => None,
                };
            }
        }
    }
}

#[test]
fn malformed_records_get_the_right_alert_and_close_only_their_connection() {
    let rt = runtime();
    let (backend, _echo) = rt.block_on(echo_server(None));
    let dir = Scratch::new("malformed");
    let cert = support::write_identity(&dir.0);
    let daemon = Daemon::start(&dir.0, &config(&[backend], "", ""));
    let client = client_config(&cert, &[&rustls::version::TLS13]);
    // A bystander connection stays open across all of it.
    let bystander = rt.block_on(support::connect(daemon.listen, &client));
    let (mut by_read, mut by_write) = tokio::io::split(bystander);
    let mut echo_once = |tag: u8| {
        rt.block_on(async {
            by_write
                .write_all(&[tag; 100])
                .await
                .expect("bystander send");
            let mut back = [0u8; 100];
            by_read.read_exact(&mut back).await.expect("bystander echo");
            assert_eq!(back, [tag; 100]);
        })
    };
    echo_once(1);
    let flipped_tag = alert_after(&daemon, &client, |mut r| {
        let last = r.len() - 1;
        r[last] ^= 1;
        r
    });
    assert_eq!(flipped_tag, Some(rustls::AlertDescription::BadRecordMac));
    echo_once(2);
    let oversized = alert_after(&daemon, &client, |mut r| {
        r[3..5].copy_from_slice(&(16384u16 + 257).to_be_bytes());
        r
    });
    assert_eq!(oversized, Some(rustls::AlertDescription::RecordOverflow));
    echo_once(3);
    let garbage = alert_after(&daemon, &client, |_| {
        let mut bytes = support::pattern(5, 300);
        bytes[0] = 0x99;
        bytes
    });
    assert_eq!(garbage, Some(rustls::AlertDescription::UnexpectedMessage));
    echo_once(4);
    let wrong_version = alert_after(&daemon, &client, |mut r| {
        r[1] = 9;
        r
    });
    assert_eq!(wrong_version, Some(rustls::AlertDescription::DecodeError));
    echo_once(5);
    assert_eq!(
        daemon.metric("tlsaccel_alerts_sent_total{alert=\"BadRecordMac\"}"),
        1
    );
    assert_eq!(
        daemon.metric("tlsaccel_alerts_sent_total{alert=\"RecordOverflow\"}"),
        1
    );
    assert_eq!(
        daemon.metric("tlsaccel_alerts_sent_total{alert=\"DecodeError\"}"),
        1
    );
    assert_eq!(
        daemon.metric("tlsaccel_alerts_sent_total{alert=\"UnexpectedMessage\"}"),
        1
    );
    assert_eq!(
        daemon.metric("tlsaccel_connections_active"),
        1,
        "only the bystander is left"
    );
}

#[test]
fn resumed_handshakes_are_counted_apart_from_full_ones() {
    let rt = runtime();
    let (backend, _echo) = rt.block_on(echo_server(None));
    let dir = Scratch::new("resume");
    let cert = support::write_identity(&dir.0);
    let daemon = Daemon::start(&dir.0, &config(&[backend], "", ""));
    for (version, name, suite) in [
        (
            &rustls::version::TLS13,
            "TLSv1_3",
            "TLS13_AES_256_GCM_SHA384",
        ),
        (
            &rustls::version::TLS12,
            "TLSv1_2",
            "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        ),
    ] {
        let client = client_config(&cert, &[version]);
        for _ in 0..3 {
            rt.block_on(async {
                let mut stream = support::connect(daemon.listen, &client).await;
                // A round trip: the client has read the session ticket by its end.
                stream.write_all(b"ping").await.expect("send");
                let mut back = [0u8; 4];
                stream.read_exact(&mut back).await.expect("echo");
                stream.shutdown().await.expect("close");
            });
        }
        let full = format!(
            "tlsaccel_handshakes_total{{kind=\"full\",version=\"{name}\",suite=\"{suite}\"}}"
        );
        let resumed = format!(
            "tlsaccel_handshakes_total{{kind=\"resumed\",version=\"{name}\",suite=\"{suite}\"}}"
        );
        assert_eq!(daemon.metric(&full), 1, "{full}");
        assert_eq!(daemon.metric(&resumed), 2, "{resumed}");
    }
}
