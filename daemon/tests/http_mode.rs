//! HTTP mode through `tlsaccel serve` with curl (HTTP/1.1 and HTTP/2) as the client and
//! HTTP/1.1 backends of the test's own that report what they were sent.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use support::{runtime, Daemon, Scratch};

/// An HTTP/1.1 backend named `name` answering every request with a line per fact: its
/// name, the method and target, the fields a proxy should set or drop, and the body's
/// length. Counts the connections it accepted.
async fn backend(name: &'static str) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let accepted = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |request: Request<hyper::body::Incoming>| async move {
                        let field = |n: &str| {
                            request
                                .headers()
                                .get_all(n)
                                .iter()
                                .map(|v| v.to_str().unwrap_or("?").to_owned())
                                .collect::<Vec<_>>()
                                .join(" | ")
                        };
                        let mut text = format!(
                        "backend={name}\ntarget={} {}\nhost={}\nx-forwarded-for={}\nx-forwarded-proto={}\nforwarded={}\nx-secret={}\n",
                        request.method(),
                        request.uri(),
                        field("host"),
                        field("x-forwarded-for"),
                        field("x-forwarded-proto"),
                        field("forwarded"),
                        field("x-secret"),
                    );
                        let body = request
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes().len())
                            .unwrap_or(0);
                        text.push_str(&format!("body={body}\n"));
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (address, accepted)
}

/// Runs curl against the daemon (verifying its certificate for `localhost`); returns its
/// output (the body, then what `-w` asks for).
fn curl(daemon: &Daemon, dir: &Scratch, args: &[&str]) -> String {
    let port = daemon.listen.port();
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(dir.0.join("cert.pem"))
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args(args)
        .output()
        .expect("run curl");
    assert!(
        output.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn url(daemon: &Daemon, path: &str) -> String {
    format!("https://localhost:{}{path}", daemon.listen.port())
}

fn config(a: SocketAddr, b: SocketAddr, dead: SocketAddr) -> String {
    format!(
        r#"drain_timeout_ms = 2000
[[listener]]
name = "web"
address = "127.0.0.1:0"
mode = "http"
alpn = ["h2", "http/1.1"]

[[listener.certificate]]
chain = "cert.pem"
key = "key.pem"

[[device]]
address = "sim"
queues = 2

[offload]
cpu_below_bytes = 1024

[[pool]]
name = "a"
servers = ["{a}"]

[[pool]]
name = "b"
servers = ["{b}"]

[[pool]]
name = "down"
servers = ["{dead}"]
retries = 0

[[route]]
listener = "web"
host = "api.example"
pool = "b"

[[route]]
listener = "web"
path_prefix = "/static/"
pool = "b"

[[route]]
listener = "web"
path_prefix = "/down"
pool = "down"

[[route]]
listener = "web"
path_prefix = "/app"
pool = "a"

[admin]
address = "127.0.0.1:0"
"#
    )
}

#[test]
fn requests_are_routed_forwarded_and_answered_over_http1_and_http2() {
    let rt = runtime();
    let dir = Scratch::new("http-mode");
    support::write_identity(&dir.0);
    let (a, a_connections) = rt.block_on(backend("A"));
    let (b, _) = rt.block_on(backend("B"));
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let daemon = Daemon::start(&dir.0, &config(a, b, dead));

    // HTTP/1.1: routed by path; spoofed forwarding fields and hop-by-hop ones dropped.
    let out = curl(
        &daemon,
        &dir,
        &[
            "--http1.1",
            "-H",
            "X-Forwarded-For: 203.0.113.66",
            "-H",
            "Forwarded: for=203.0.113.66",
            "-H",
            "Connection: x-secret",
            "-H",
            "X-Secret: 1",
            "-w",
            "version=%{http_version}\n",
            &url(&daemon, "/app/page?q=1"),
        ],
    );
    for line in [
        "backend=A",
        "target=GET /app/page?q=1",
        &format!("host=localhost:{}", daemon.listen.port()),
        "x-forwarded-for=127.0.0.1\n",
        "x-forwarded-proto=https",
        "forwarded=for=127.0.0.1;proto=https;host=\"localhost\"",
        "x-secret=\n",
        "version=1.1",
    ] {
        assert!(out.contains(line), "{line:?} not in:\n{out}");
    }

    // HTTP/2 (ALPN h2): by host, and a request body passes.
    let out = curl(
        &daemon,
        &dir,
        &[
            "--http2",
            "-H",
            "Host: API.example",
            "--data-binary",
            "0123456789",
            "-w",
            "version=%{http_version}\n",
            &url(&daemon, "/anything"),
        ],
    );
    for line in ["backend=B", "target=POST /anything", "body=10", "version=2"] {
        assert!(out.contains(line), "{line:?} not in:\n{out}");
    }
    let out = curl(&daemon, &dir, &["--http2", &url(&daemon, "/static/x.css")]);
    assert!(out.contains("backend=B"), "{out}");

    // No route: 421; a pool whose server is down: 503, counted.
    let code = |path: &str| {
        curl(
            &daemon,
            &dir,
            &["-o", "/dev/null", "-w", "%{http_code}", &url(&daemon, path)],
        )
    };
    assert_eq!(code("/nowhere"), "421");
    // A head over 64 KiB, or over 100 fields: 431 from hyper (not counted as a response of
    // ours), and the backend never sees it.
    let fields: Vec<String> = (0..120).map(|i| format!("X-F{i}: {i}")).collect();
    let target = url(&daemon, "/app/fields");
    let mut args = vec!["--http1.1", "-o", "/dev/null", "-w", "%{http_code}"];
    for field in &fields {
        args.extend(["-H", field.as_str()]);
    }
    args.push(&target);
    assert_eq!(curl(&daemon, &dir, &args), "431");
    // A 768 KiB head: hyper answers 431 after 64 KiB and closes its side while curl is still
    // sending the rest, which the pump reads and drops so that curl gets the answer rather
    // than a reset.
    let big = dir.0.join("big-head");
    let line = format!("X-Big: {}\n", "b".repeat(64 * 1024));
    std::fs::write(&big, line.repeat(12)).unwrap();
    let big = format!("@{}", big.display());
    let target = url(&daemon, "/app/big");
    let args = [
        "--http1.1",
        "-H",
        &big,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &target,
    ];
    assert_eq!(curl(&daemon, &dir, &args), "431");
    assert_eq!(code("/down"), "503");
    assert_eq!(
        daemon.metric("tlsaccel_http_backend_errors_total{kind=\"connect\"}"),
        1
    );

    // A new client connection per request (as `Connection: close` clients make them):
    // the backend connection is kept and reused across clients.
    let before = a_connections.load(Ordering::Relaxed);
    for _ in 0..10 {
        let out = curl(&daemon, &dir, &["--http1.1", &url(&daemon, "/app/again")]);
        assert!(out.contains("backend=A"), "{out}");
    }
    let made = a_connections.load(Ordering::Relaxed) - before;
    assert!(
        made <= 1,
        "{made} backend connections for 10 sequential requests"
    );
    assert!(daemon.metric("tlsaccel_http_responses_total{code=\"2xx\"}") >= 13);
    assert_eq!(
        daemon.metric("tlsaccel_http_responses_total{code=\"4xx\"}"),
        1
    );
    assert_eq!(
        daemon.metric("tlsaccel_http_responses_total{code=\"5xx\"}"),
        1
    );
}

#[test]
fn host_and_path_routes_are_refused_on_l4_listeners() {
    let dir = Scratch::new("http-config");
    support::write_identity(&dir.0);
    let text = config(
        "127.0.0.1:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
        "127.0.0.1:3".parse().unwrap(),
    )
    .replace("mode = \"http\"\n", "");
    let file = dir.0.join("tlsaccel.toml");
    std::fs::write(&file, text).expect("config");
    let output = Command::new(env!("CARGO_BIN_EXE_tlsaccel"))
        .arg("check-config")
        .arg(&file)
        .output()
        .expect("run check-config");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("route[0].host") && stderr.contains("mode = \"http\""),
        "{stderr}"
    );
}

/// How a scripted backend misbehaves.
#[derive(Clone, Copy)]
enum Script {
    Good,
    /// Answers 503 to this share of requests (percent).
    Unavailable(u64),
    /// Closes the connection without an answer after this share of requests (percent),
    /// having executed them.
    Closes(u64),
}

/// A backend that follows `script` and logs each request it executed as `(method, id)`.
async fn scripted(script: Script) -> (SocketAddr, Arc<std::sync::Mutex<Vec<(String, String)>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let executed = Arc::clone(&log);
    let dice = Arc::new(AtomicU64::new(
        0x9e37_79b9_7f4a_7c15 ^ u64::from(address.port()),
    ));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let executed = Arc::clone(&executed);
            let dice = Arc::clone(&dice);
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                        let executed = Arc::clone(&executed);
                        let dice = Arc::clone(&dice);
                        async move {
                            let id = request
                                .headers()
                                .get("x-request-id")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned();
                            let method = request.method().to_string();
                            let _ = request.into_body().collect().await;
                            executed.lock().unwrap().push((method, id));
                            // xorshift: a repeatable roll per request.
                            let mut x = dice.load(Ordering::Relaxed);
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            dice.store(x, Ordering::Relaxed);
                            let roll = x % 100;
                            match script {
                                Script::Closes(p) if roll < p => Err("closing without an answer"),
                                Script::Unavailable(p) if roll < p => {
                                    let mut response =
                                        Response::new(Full::new(Bytes::from_static(b"busy\n")));
                                    *response.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                                    Ok(response)
                                }
                                _ => Ok(Response::new(Full::new(Bytes::from_static(b"done\n")))),
                            }
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (address, log)
}

/// `count` requests of `method` over one kept-alive HTTP/1.1 connection through the
/// daemon, ids `first..`; returns how many were answered 5xx (or not at all).
async fn send_many(
    listen: SocketAddr,
    client: &Arc<rustls::ClientConfig>,
    method: &str,
    first: u64,
    count: u64,
) -> u64 {
    let mut failed = 0;
    let mut sender = None;
    for id in first..first + count {
        if sender.is_none() {
            let tls = support::connect(listen, client).await;
            let (s, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .expect("HTTP handshake");
            tokio::spawn(connection);
            sender = Some(s);
        }
        let s = sender.as_mut().expect("connected");
        if s.ready().await.is_err() {
            sender = None;
            failed += 1;
            continue;
        }
        let body = if method == "POST" { "payload" } else { "" };
        let request = Request::builder()
            .method(method)
            .uri("/work")
            .header("host", "localhost")
            .header("x-request-id", id.to_string())
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("request");
        let ok = match s.send_request(request).await {
            Ok(response) => {
                let good = response.status().is_success();

                let _ = response.into_body().collect().await;
                good
            }
            Err(_) => {
                sender = None;
                false
            }
        };
        failed += u64::from(!ok);
    }
    failed
}

#[test]
fn idempotent_requests_fail_over_within_the_budget_and_no_post_runs_twice() {
    let rt = runtime();
    let dir = Scratch::new("http-failover");
    let cert = support::write_identity(&dir.0);
    let (good, good_log) = rt.block_on(scripted(Script::Good));
    let (busy, busy_log) = rt.block_on(scripted(Script::Unavailable(20)));
    let (closing, closing_log) = rt.block_on(scripted(Script::Closes(20)));
    let config = format!(
        r#"[[listener]]
name = "web"
address = "127.0.0.1:0"
mode = "http"
default_pool = "mix"

[[listener.certificate]]
chain = "cert.pem"
key = "key.pem"

[[pool]]
name = "mix"
servers = ["{good}", "{busy}", "{closing}"]

[admin]
address = "127.0.0.1:0"
"#
    );
    let daemon = Daemon::start(&dir.0, &config);
    let client = support::client_config(&cert, &[&rustls::version::TLS13]);
    let (gets, posts) = (10_000u64, 1_000u64);
    let failed = rt.block_on(async {
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let client = Arc::clone(&client);
                let listen = daemon.listen;
                tokio::spawn(async move {
                    send_many(listen, &client, "GET", t * gets / 8, gets / 8).await
                })
            })
            .collect();
        let mut failed = 0;
        for task in tasks {
            failed += task.await.expect("task");
        }
        failed
    });
    let retries = daemon.metric("tlsaccel_http_retries_total{pool=\"mix\"}");
    eprintln!("GET: {failed} of {gets} failed, {retries} retries");
    assert!(
        failed * 1000 <= gets,
        "{failed} of {gets} idempotent requests failed"
    );
    assert!(retries > 0, "the faulty servers were retried around");
    // The budget: 20% of the requests plus 10 a second for its 10 s window.
    assert!(
        retries <= gets / 5 + 100,
        "{retries} retries for {gets} requests"
    );

    let post_failures = rt.block_on(send_many(daemon.listen, &client, "POST", 1_000_000, posts));
    eprintln!("POST: {post_failures} of {posts} failed (not retried once sent)");
    let mut seen = std::collections::HashSet::new();
    for log in [&good_log, &busy_log, &closing_log] {
        for (method, id) in log.lock().unwrap().iter() {
            if method == "POST" {
                assert!(seen.insert(id.clone()), "POST {id} was executed twice");
            }
        }
    }
    // Each POST ran exactly once: answered, or failed after reaching its server (then
    // the client got the 503 or a 502, and nothing was sent again).
    assert_eq!(seen.len() as u64, posts);
}

/// A backend for the cache: `/cached` answers `v<version>` with that ETag and
/// `max-age=3`, and 304 to a matching `If-None-Match`; `/nostore` answers with `no-store`;
/// anything else echoes the body's length. Counts the requests it saw and the conditional
/// ones.
async fn validating_backend(
    version: Arc<AtomicU64>,
) -> (SocketAddr, Arc<AtomicU64>, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let (seen, conditional) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (seen2, conditional2) = (Arc::clone(&seen), Arc::clone(&conditional));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (version, seen, conditional) = (
                Arc::clone(&version),
                Arc::clone(&seen2),
                Arc::clone(&conditional2),
            );
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                        let (version, seen, conditional) = (
                            Arc::clone(&version),
                            Arc::clone(&seen),
                            Arc::clone(&conditional),
                        );
                        async move {
                            seen.fetch_add(1, Ordering::Relaxed);
                            let v = version.load(Ordering::Relaxed);
                            let etag = format!("\"v{v}\"");
                            let path = request.uri().path().to_owned();
                            let inm = request
                                .headers()
                                .get("if-none-match")
                                .map(|v| v.to_str().unwrap_or("").to_owned());
                            let body = request.into_body().collect().await;
                            let builder = Response::builder();
                            let response = match (path.as_str(), body) {
                                (_, Err(_)) => builder.status(400).body(Full::new(Bytes::new())),
                                ("/cached", _) => {
                                    if inm.is_some() {
                                        conditional.fetch_add(1, Ordering::Relaxed);
                                    }
                                    if inm.as_deref() == Some(etag.as_str()) {
                                        builder
                                            .status(304)
                                            .header("etag", &etag)
                                            .header("cache-control", "max-age=3")
                                            .body(Full::new(Bytes::new()))
                                    } else {
                                        builder
                                            .header("etag", &etag)
                                            .header("cache-control", "max-age=3")
                                            .body(Full::new(Bytes::from(format!("v{v}\n"))))
                                    }
                                }
                                ("/nostore", _) => builder
                                    .header("cache-control", "no-store")
                                    .body(Full::new(Bytes::from_static(b"fresh\n"))),
                                (_, Ok(b)) => builder.body(Full::new(Bytes::from(format!(
                                    "{}\n",
                                    b.to_bytes().len()
                                )))),
                            };
                            Ok::<_, Infallible>(response.expect("response"))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (address, seen, conditional)
}

#[test]
fn inspection_rules_refuse_with_the_right_status_and_the_cache_answers_and_revalidates() {
    let rt = runtime();
    let dir = Scratch::new("http-inspect");
    support::write_identity(&dir.0);
    let version = Arc::new(AtomicU64::new(1));
    let (backend, seen, conditional) = rt.block_on(validating_backend(Arc::clone(&version)));
    let daemon = Daemon::start(
        &dir.0,
        &format!(
            r#"[[listener]]
name = "web"
address = "127.0.0.1:0"
mode = "http"
alpn = ["h2", "http/1.1"]
default_pool = "app"
[[listener.certificate]]
chain = "cert.pem"
key = "key.pem"
[listener.inspect]
methods = ["GET", "HEAD", "POST"]
deny_paths = ["^/private(/|$)"]
max_header_fields = 20
max_body_bytes = 1000
[listener.cache]
max_bytes = 1048576

[[pool]]
name = "app"
servers = ["{backend}"]

[admin]
address = "127.0.0.1:0"
"#
        ),
    );
    let code = |args: &[&str], path: &str| {
        let target = url(&daemon, path);
        let mut all = vec!["-o", "/dev/null", "-w", "%{http_code}"];
        all.extend_from_slice(args);
        all.push(&target);
        curl(&daemon, &dir, &all)
    };
    let refused =
        |rule: &str| daemon.metric(&format!("tlsaccel_http_refused_total{{rule=\"{rule}\"}}"));
    // Method: 405 with Allow.
    let target = url(&daemon, "/x");
    let head = curl(
        &daemon,
        &dir,
        &["-X", "DELETE", "-D", "-", "-o", "/dev/null", &target],
    );
    assert!(
        head.starts_with("HTTP/2 405") || head.starts_with("HTTP/1.1 405"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase().contains("allow: get, head, post"),
        "{head}"
    );
    // Path: 403; a path that only starts alike passes.
    assert_eq!(code(&[], "/private/key"), "403");
    assert_eq!(code(&[], "/privateer"), "200");
    // Too many fields: 431.
    let fields: Vec<String> = (0..25).map(|i| format!("X-F{i}: {i}")).collect();
    let mut args: Vec<&str> = Vec::new();
    for f in &fields {
        args.extend(["-H", f.as_str()]);
    }
    assert_eq!(code(&args, "/x"), "431");
    // Body: declared too long, and chunked past the limit, are 413; a short one passes.
    let big = dir.0.join("big-body");
    std::fs::write(&big, vec![b'x'; 2000]).unwrap();
    let big = format!("@{}", big.display());
    assert_eq!(
        code(&["--http1.1", "--data-binary", &big], "/upload"),
        "413"
    );
    assert_eq!(
        code(
            &[
                "--http1.1",
                "-H",
                "Transfer-Encoding: chunked",
                "--data-binary",
                &big
            ],
            "/upload"
        ),
        "413"
    );
    assert_eq!(code(&["--data-binary", "short"], "/upload"), "200");
    assert_eq!(
        [
            refused("method"),
            refused("path"),
            refused("header_fields"),
            refused("body")
        ],
        [1, 1, 1, 2]
    );

    // The cache: a fresh answer is served without the backend.
    let before = seen.load(Ordering::Relaxed);
    let get = |path: &str| curl(&daemon, &dir, &[&url(&daemon, path)]);
    assert_eq!(get("/cached"), "v1\n");
    assert_eq!(get("/cached"), "v1\n");
    assert_eq!(code(&["--http1.1"], "/cached"), "200");
    assert_eq!(
        seen.load(Ordering::Relaxed) - before,
        1,
        "one request reached the backend"
    );
    // Stale after three seconds: revalidated with its ETag, the backend's 304 refreshes it.
    std::thread::sleep(std::time::Duration::from_millis(3100));
    assert_eq!(get("/cached"), "v1\n");
    assert_eq!(conditional.load(Ordering::Relaxed), 1);
    assert_eq!(seen.load(Ordering::Relaxed) - before, 2);
    // A new version: the validator no longer matches and the new body replaces the old.
    version.store(2, Ordering::Relaxed);
    std::thread::sleep(std::time::Duration::from_millis(3100));
    assert_eq!(get("/cached"), "v2\n");
    assert_eq!(get("/cached"), "v2\n");
    assert_eq!(seen.load(Ordering::Relaxed) - before, 3);
    // A POST to it drops the entry.
    assert_eq!(code(&["--data-binary", "x"], "/cached"), "200");
    assert_eq!(get("/cached"), "v2\n");
    assert_eq!(seen.load(Ordering::Relaxed) - before, 5);
    // no-store is never stored.
    assert_eq!(get("/nostore"), "fresh\n");
    assert_eq!(get("/nostore"), "fresh\n");
    assert_eq!(seen.load(Ordering::Relaxed) - before, 7);
    let cache = |result: &str| {
        daemon.metric(&format!(
            "tlsaccel_http_cache_total{{listener=\"web\",result=\"{result}\"}}"
        ))
    };
    assert_eq!(cache("hit"), 3);
    assert_eq!(cache("revalidated"), 1);
    assert_eq!(cache("invalidated"), 1);
    assert!(daemon.metric("tlsaccel_http_cache_bytes{listener=\"web\"}") > 0);
}

/// nginx from Debian as a backend, started for the test (no master, no daemon) with a
/// static file and a fixed answer; stopped when dropped.
struct Nginx(std::process::Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nginx(dir: &std::path::Path) -> (Nginx, SocketAddr) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let page: String = (0..2000).map(|i| format!("line {i}\n")).collect();
    std::fs::write(www.join("page.txt"), &page).unwrap();
    let d = dir.display();
    let conf = format!(
        "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log stderr warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/t1;\n  proxy_temp_path {d}/t2;\n\
         fastcgi_temp_path {d}/t3;\n  uwsgi_temp_path {d}/t4;\n  scgi_temp_path {d}/t5;\n\
         keepalive_requests 100000;\n\
         server {{\n    listen 127.0.0.1:{port};\n    root {d}/www;\n\
         location = /hello {{ return 200 \"hello from nginx\\n\"; }}\n  }}\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let child = std::process::Command::new("nginx")
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .spawn()
        .expect("nginx (Debian's nginx-light; scripts/test installs it)");
    let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    support::wait_until("nginx listens", std::time::Duration::from_secs(10), || {
        std::net::TcpStream::connect(address).is_ok()
    });
    (Nginx(child), address)
}

/// `h2load` against the daemon; returns (requests done, 2xx answers, failed, errored).
fn h2load(daemon: &Daemon, args: &[&str], path: &str) -> (u64, u64, u64, u64) {
    let output = Command::new("h2load")
        .args(args)
        .arg(format!("https://127.0.0.1:{}{path}", daemon.listen.port()))
        .output()
        .expect("h2load (Debian's nghttp2-client; scripts/test installs it)");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let number = |line: &str, label: &str| -> u64 {
        line.split(',')
            .find(|p| p.contains(label))
            .and_then(|p| p.split_whitespace().find_map(|w| w.parse().ok()))
            .unwrap_or(u64::MAX)
    };
    let requests = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or_else(|| panic!("h2load printed no totals: {text}"));
    let codes = text
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .unwrap_or("");
    (
        number(requests, "done"),
        number(codes, "2xx"),
        number(requests, "failed"),
        number(requests, "errored"),
    )
}

#[test]
fn h2load_and_curl_through_http_mode_to_nginx() {
    let dir = Scratch::new("http-nginx");
    support::write_identity(&dir.0);
    let (_nginx, backend) = nginx(&dir.0);
    let daemon = Daemon::start(
        &dir.0,
        &format!(
            r#"[[listener]]
name = "web"
address = "127.0.0.1:0"
mode = "http"
alpn = ["h2", "http/1.1"]
default_pool = "nginx"
[[listener.certificate]]
chain = "cert.pem"
key = "key.pem"

[[device]]
address = "sim"
queues = 2

[[pool]]
name = "nginx"
servers = ["{backend}"]
balance = "least_response_time"

[admin]
address = "127.0.0.1:0"
"#
        ),
    );
    // A static file arrives whole over both versions.
    let page = std::fs::read_to_string(dir.0.join("www/page.txt")).unwrap();
    assert_eq!(curl(&daemon, &dir, &[&url(&daemon, "/page.txt")]), page);
    assert_eq!(
        curl(&daemon, &dir, &["--http1.1", &url(&daemon, "/page.txt")]),
        page
    );
    // Many small requests: HTTP/2 multiplexed, and HTTP/1.1 keep-alive.
    for (args, label) in [
        (&["-n", "4000", "-c", "8", "-m", "8"][..], "h2"),
        (&["--h1", "-n", "2000", "-c", "8"][..], "h1"),
    ] {
        let (done, ok, failed, errored) = h2load(&daemon, args, "/hello");
        let total: u64 = args[args.iter().position(|a| *a == "-n").unwrap() + 1]
            .parse()
            .unwrap();
        assert_eq!((done, ok, failed, errored), (total, total, 0, 0), "{label}");
    }
    // Backend connections were kept and reused: far fewer than requests.
    let opened = daemon.metric(&format!(
        "tlsaccel_backend_connections_total{{pool=\"nginx\",server=\"{backend}\"}}"
    ));
    assert!(
        opened > 0 && opened <= 100,
        "backend connections opened: {opened}"
    );
}

/// An HTTP/2-only backend (h2c with prior knowledge, or over TLS with ALPN `h2` when given
/// a certificate and key): answers `version authority path`, counts its connections.
async fn h2_backend(
    tls: Option<(&std::path::Path, &std::path::Path)>,
) -> (SocketAddr, Arc<AtomicU64>) {
    use rustls::pki_types::pem::PemObject;
    let acceptor = tls.map(|(cert, key)| {
        let chain = rustls::pki_types::CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let accepted = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::Relaxed);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |request: Request<hyper::body::Incoming>| async move {
                        let text = format!(
                            "{:?} {} {}\n",
                            request.version(),
                            request.uri().authority().map_or("-", |a| a.as_str()),
                            request.uri().path()
                        );
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                    },
                );
                let builder =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
                let _ = match acceptor {
                    Some(acceptor) => match acceptor.accept(tcp).await {
                        Ok(tls) => builder.serve_connection(TokioIo::new(tls), service).await,
                        Err(_) => return,
                    },
                    None => builder.serve_connection(TokioIo::new(tcp), service).await,
                };
            });
        }
    });
    (address, accepted)
}

#[test]
fn an_http2_pool_gets_requests_over_one_multiplexed_connection_per_server() {
    let rt = runtime();
    let dir = Scratch::new("http2-backend");
    support::write_identity(&dir.0);
    let (plain, plain_connections) = rt.block_on(h2_backend(None));
    let (tls, tls_connections) = rt.block_on(h2_backend(Some((
        &dir.0.join("cert.pem"),
        &dir.0.join("key.pem"),
    ))));
    let daemon = Daemon::start(
        &dir.0,
        &format!(
            r#"[[listener]]
name = "web"
address = "127.0.0.1:0"
mode = "http"
alpn = ["h2", "http/1.1"]
default_pool = "h2c"
[[listener.certificate]]
chain = "cert.pem"
key = "key.pem"

[[pool]]
name = "h2c"
servers = ["{plain}"]
http_version = "2"

[[pool]]
name = "h2tls"
servers = ["{tls}"]
http_version = "2"
[pool.tls]
server_name = "localhost"
ca = "cert.pem"

[[route]]
listener = "web"
path_prefix = "/secure/"
pool = "h2tls"

[admin]
address = "127.0.0.1:0"
"#
        ),
    );
    let port = daemon.listen.port();
    // The backend sees HTTP/2 with the client's host as :authority, from HTTP/1.1 and
    // HTTP/2 clients alike.
    for version in ["--http1.1", "--http2"] {
        assert_eq!(
            curl(&daemon, &dir, &[version, &url(&daemon, "/a")]),
            format!("HTTP/2.0 localhost:{port} /a\n")
        );
        assert_eq!(
            curl(&daemon, &dir, &[version, &url(&daemon, "/secure/b")]),
            format!("HTTP/2.0 localhost:{port} /secure/b\n")
        );
    }
    // Many requests at once share the one connection per server.
    let (done, ok, failed, errored) =
        h2load(&daemon, &["-n", "2000", "-c", "4", "-m", "16"], "/load");
    assert_eq!((done, ok, failed, errored), (2000, 2000, 0, 0));
    assert_eq!(plain_connections.load(Ordering::Relaxed), 1);
    assert_eq!(tls_connections.load(Ordering::Relaxed), 1);
}
