//! HTTP mode under load through `tlsaccel serve`:
//! * priority levels: a backend that slows down with load, low-priority load on a
//!   plain-HTTP listener, and high-priority requests over TLS from a named client address
//!   (curl bound to 127.0.0.2);
//! * the buffer pool: a ramp of concurrent POSTs held at a backend the test opens and
//!   closes, the pool doubling, holding at its cap and halving back.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use support::{runtime, Daemon, Scratch};

/// A backend that takes 20 ms plus 5 ms for every other request it is serving at once.
/// Returns its address and the most requests it served at once.
async fn slow_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let busy = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let most = Arc::clone(&peak);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (busy, peak) = (Arc::clone(&busy), Arc::clone(&peak));
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |_: Request<hyper::body::Incoming>| {
                        let (busy, peak) = (Arc::clone(&busy), Arc::clone(&peak));
                        async move {
                            let now = busy.fetch_add(1, Ordering::SeqCst) + 1;
                            peak.fetch_max(now, Ordering::SeqCst);
                            let delay = 20 + 5 * (now as u64 - 1);
                            tokio::time::sleep(Duration::from_millis(delay)).await;
                            busy.fetch_sub(1, Ordering::SeqCst);
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                                b"ok\n",
                            ))))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (address, most)
}

fn config(backend: SocketAddr) -> String {
    format!(
        r#"[[listener]]
name = "web"
address = "127.0.0.1:0"
mode = "http"
default_pool = "app"
[[listener.certificate]]
chain = "cert.pem"
key = "key.pem"

[[listener]]
name = "plain"
address = "127.0.0.1:0"
mode = "http"
tls = false
priority = "plain"
default_pool = "app"

[[priority]]
name = "high"
clients = ["127.0.0.2"]

[[priority]]
name = "default"
response_time_ms = 40
max_wait_ms = 3000

[[priority]]
name = "plain"
response_time_ms = 30
max_wait_ms = 3000

[[pool]]
name = "app"
servers = ["{backend}"]
balance = "least_response_time"

[admin]
address = "127.0.0.1:0"
"#
    )
}

/// One request over TLS with curl from `source`; returns the status and the seconds it
/// took.
fn curl(daemon: &Daemon, dir: &Scratch, source: &str) -> (String, f64) {
    let port = daemon.listen.port();
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--interface", source, "--cacert"])
        .arg(dir.0.join("cert.pem"))
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args([
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{time_starttransfer} %{time_appconnect}",
        ])
        .arg(format!("https://localhost:{port}/"))
        .output()
        .expect("run curl");
    assert!(
        output.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut fields = text.split_whitespace();
    let code = fields.next().unwrap_or("").to_owned();
    let first_byte: f64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let tls_done: f64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // The request's own time: from the end of the handshake to the first byte.
    (code, first_byte - tls_done)
}

fn p99(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[(samples.len() * 99 / 100).min(samples.len() - 1)]
}

#[test]
fn a_slow_pool_holds_back_low_levels_and_the_plain_listener_while_high_clients_go_first() {
    let rt = runtime();
    let dir = Scratch::new("priorities");
    support::write_identity(&dir.0);
    let (backend, peak) = rt.block_on(slow_backend());
    let daemon = Daemon::start(&dir.0, &config(backend));
    let plain = daemon.listener("plain");

    // Unloaded: high-priority requests alone.
    let quiet: Vec<f64> = (0..30)
        .map(|_| curl(&daemon, &dir, "127.0.0.2"))
        .map(|(code, t)| {
            assert_eq!(code, "200");
            t
        })
        .collect();

    // Sixteen plain-HTTP clients, each sending its next request as soon as it has the last
    // answer; then the high-priority requests again, and a few of the default level.
    let stop = Arc::new(AtomicBool::new(false));
    let statuses = Arc::new(std::sync::Mutex::new(
        std::collections::BTreeMap::<u16, u64>::new(),
    ));
    let load: Vec<_> = (0..16)
        .map(|_| {
            let (stop, statuses) = (Arc::clone(&stop), Arc::clone(&statuses));
            rt.spawn(async move {
                let tcp = tokio::net::TcpStream::connect(plain)
                    .await
                    .expect("connect");
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                        .await
                        .expect("handshake");
                tokio::spawn(connection);
                while !stop.load(Ordering::Relaxed) {
                    let request = Request::get("/")
                        .header("host", "plain.test")
                        .body(Empty::<Bytes>::new())
                        .expect("request");
                    let Ok(response) = sender.send_request(request).await else {
                        break;
                    };
                    let code = response.status().as_u16();
                    let _ = response.into_body().collect().await;
                    *statuses.lock().unwrap().entry(code).or_default() += 1;
                    if code == 503 {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            })
        })
        .collect();
    // Until the pool's response time has held the plain level back.
    daemon.metric_until(
        "tlsaccel_admission_waiting{pool=\"app\"}",
        Duration::from_secs(20),
        |_| {
            daemon
                .admin_get("/metrics")
                .contains("tlsaccel_admission_limit{pool=\"app\",level=\"plain\"}")
        },
    );
    let loaded: Vec<f64> = (0..60)
        .map(|_| curl(&daemon, &dir, "127.0.0.2"))
        .map(|(code, t)| {
            assert_eq!(code, "200");
            t
        })
        .collect();
    for _ in 0..5 {
        let (code, _) = curl(&daemon, &dir, "127.0.0.1");
        assert!(code == "200" || code == "503", "default level: {code}");
    }
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for task in load {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    });

    let metric = |level: &str, result: &str| {
        daemon.metric(&format!(
            "tlsaccel_admission_total{{pool=\"app\",level=\"{level}\",result=\"{result}\"}}"
        ))
    };
    let statuses = statuses.lock().unwrap().clone();
    println!(
        "high-priority time to first byte, p99: {:.1} ms alone, {:.1} ms under plain load \
         ({:.2}x); plain answers {statuses:?}; backend served at most {} at once",
        p99(quiet.clone()) * 1e3,
        p99(loaded.clone()) * 1e3,
        p99(loaded.clone()) / p99(quiet.clone()),
        peak.load(Ordering::SeqCst),
    );
    // High-priority requests never waited; plain ones were held back (they waited, or were
    // refused with 503 and Retry-After).
    assert_eq!(metric("high", "immediate"), 90);
    for result in ["waited", "refused", "timed_out", "queue_full"] {
        assert_eq!(metric("high", result), 0, "high {result}");
    }
    let held =
        metric("plain", "waited") + metric("plain", "refused") + metric("plain", "timed_out");
    assert!(held > 0, "plain requests held back: {held}");
    assert!(
        statuses.get(&200).copied().unwrap_or(0) > 0,
        "plain clients were served too"
    );
    // 503s carry Retry-After.
    let refused = statuses.get(&503).copied().unwrap_or(0);
    assert_eq!(
        refused,
        metric("plain", "refused") + metric("plain", "timed_out") + metric("plain", "queue_full")
    );
    assert!(daemon
        .admin_get("/metrics")
        .contains("tlsaccel_pool_response_seconds{pool=\"app\"} 0."));
}

/// A backend that holds every request until the test lets it go: the n-th request to
/// arrive (from 0) is answered once the gate passes n.
async fn gated_backend(gate: tokio::sync::watch::Receiver<u64>) -> SocketAddr {
    let arrivals = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let gate = gate.clone();
            let arrivals = Arc::clone(&arrivals);
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                        let mut gate = gate.clone();
                        let arrivals = Arc::clone(&arrivals);
                        async move {
                            let body = request
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes().len());
                            let n = arrivals.fetch_add(1, Ordering::SeqCst) as u64;
                            let _ = gate.wait_for(|&open| open > n).await;
                            let text = format!("{}\n", body.unwrap_or(0));
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    address
}

#[test]
fn the_buffer_pool_doubles_with_load_holds_at_its_cap_and_halves_back() {
    const KIB: u64 = 1024;
    let rt = runtime();
    let dir = Scratch::new("buffer-pool");
    let (gate, gate_rx) = tokio::sync::watch::channel(0u64);
    let backend = rt.block_on(gated_backend(gate_rx));
    // 64 KiB to 512 KiB in chunks of 16 KiB; each request holds a 32 KiB body (2 chunks).
    let daemon = Daemon::start(
        &dir.0,
        &format!(
            r#"[[listener]]
name = "plain"
address = "127.0.0.1:0"
mode = "http"
tls = false
default_pool = "app"

[http]
buffer_pool_min_kib = 64
buffer_pool_max_kib = 512
buffer_wait_ms = 20000

[[pool]]
name = "app"
servers = ["{backend}"]

[admin]
address = "127.0.0.1:0"
"#
        ),
    );
    let plain = daemon.listener("plain");
    let pool = |what: &str| {
        daemon.metric(&format!(
            "tlsaccel_http_buffer_pool_bytes{{state=\"{what}\"}}"
        ))
    };
    let post = move || async move {
        let tcp = tokio::net::TcpStream::connect(plain)
            .await
            .expect("connect");
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("handshake");
        tokio::spawn(connection);
        let request = Request::post("/upload")
            .header("host", "app.test")
            .body(Full::new(Bytes::from(vec![7u8; 32 * 1024])))
            .expect("request");
        let response = sender.send_request(request).await.expect("answer");
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).trim().to_owned())
    };
    assert_eq!(pool("size"), 64 * KIB);
    let mut sizes = Vec::new();
    let mut sent = 0;
    for (stage, clients) in [1u64, 2, 4, 8].into_iter().enumerate() {
        sent += clients;
        let requests: Vec<_> = (0..clients).map(|_| rt.spawn(post())).collect();
        let used = daemon.metric_until(
            "tlsaccel_http_buffer_pool_bytes{state=\"used\"}",
            Duration::from_secs(20),
            |v| v == clients * 32 * KIB,
        );
        assert_eq!(
            used,
            clients * 32 * KIB,
            "stage {stage}: all held at the backend"
        );
        sizes.push(pool("size") / KIB);
        gate.send_replace(sent);
        for request in requests {
            assert_eq!(rt.block_on(request).unwrap(), (200, "32768".to_owned()));
        }
    }
    // 2 of 4 chunks is 50 %: kept; then each step passes 95 % and doubles.
    assert_eq!(sizes, vec![64, 128, 256, 512]);
    // 24 clients need 48 chunks; 32 fit at the cap, the rest wait for room.
    let requests: Vec<_> = (0..24).map(|_| rt.spawn(post())).collect();
    daemon.metric_until(
        "tlsaccel_http_buffer_pool_waits_total",
        Duration::from_secs(20),
        |v| v >= 8,
    );
    assert_eq!(pool("used"), 512 * KIB);
    assert_eq!(pool("size"), 512 * KIB, "held at the cap");
    gate.send_replace(u64::MAX);
    for request in requests {
        assert_eq!(rt.block_on(request).unwrap(), (200, "32768".to_owned()));
    }
    // Nothing held: back to the minimum by halving, and nothing kept beyond it.
    assert_eq!(
        daemon.metric_until(
            "tlsaccel_http_buffer_pool_bytes{state=\"size\"}",
            Duration::from_secs(5),
            |v| v == 64 * KIB
        ),
        64 * KIB
    );
    assert!(pool("kept_free") <= 64 * KIB);
    assert!(daemon.metric("tlsaccel_http_buffer_pool_resizes_total{direction=\"shrink\"}") >= 3);
    assert_eq!(daemon.metric("tlsaccel_http_buffer_pool_refused_total"), 0);
}
