//! A cluster of `tlsaccel serve` nodes sharing resumption through a real Redis (the test
//! starts its own `redis-server` on a free port): ticket keys per rotation epoch, sessions
//! for session-ID and TLS 1.3 stateful resumption, and Redis going away and coming back.

mod support;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::HandshakeKind;
use support::{Daemon, Scratch};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A `redis-server` of the test's own, without persistence; killed on drop.
struct Redis {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Redis {
    fn start(dir: &Path, port: u16) -> Self {
        let port_arg = port.to_string();
        Self::start_with(dir, port, &["--port".as_ref(), port_arg.as_ref()])
    }

    /// A `redis-server` listening as `listen` says (plain `--port`, or `--tls-port` and
    /// its files), on `port` of 127.0.0.1.
    fn start_with(dir: &Path, port: u16, listen: &[&std::ffi::OsStr]) -> Self {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1"])
            .args(listen)
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server (the test command installs it)");
        let redis = Self {
            child,
            port,
            dir: dir.to_owned(),
        };
        support::wait_until("redis-server to listen", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        redis
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.stop();
        *self = Self::start(&self.dir.clone(), self.port);
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The directory of one node: identity, cluster key, configuration.
fn node_dir(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).expect("node dir");
    for file in ["cert.pem", "key.pem", "cluster.key"] {
        std::fs::copy(root.join(file), dir.join(file)).expect("copy");
    }
    dir
}

fn start_node(root: &Path, name: &str, backend: SocketAddr, redis: u16, section: &str) -> Daemon {
    start_node_waiting(root, name, backend, redis, section, 200)
}

/// [`start_node`] with the Redis timeout in milliseconds.
fn start_node_waiting(
    root: &Path,
    name: &str,
    backend: SocketAddr,
    redis: u16,
    section: &str,
    timeout_ms: u32,
) -> Daemon {
    let dir = node_dir(root, name);
    let config = support::config(
        &[backend],
        "",
        &format!(
            "[resumption]\nnode = \"{name}\"\n{section}\n\
             [resumption.redis]\nurl = \"redis://127.0.0.1:{redis}\"\n\
             cluster_key_file = \"cluster.key\"\ntimeout_ms = {timeout_ms}\n"
        ),
    );
    Daemon::start(&dir, &config)
}

/// [`start_node`] without a device: handshakes run on the CPU, and on fibers only when
/// they may wait for Redis.
fn start_cpu_node(
    root: &Path,
    name: &str,
    backend: SocketAddr,
    redis: u16,
    section: &str,
) -> Daemon {
    let with_device = start_node(root, name, backend, redis, section);
    let config = std::fs::read_to_string(&with_device.config).expect("config");
    drop(with_device);
    let device = "[[device]]\naddress = \"sim\"\nqueues = 2\n";
    assert!(config.contains(device));
    Daemon::start(&root.join(name), &config.replace(device, ""))
}

fn cluster(tag: &str) -> (Scratch, rustls::pki_types::CertificateDer<'static>) {
    let scratch = Scratch::new(tag);
    let cert = support::write_identity(&scratch.0);
    let key: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(73) ^ 0x5c).collect();
    std::fs::write(scratch.0.join("cluster.key"), key).expect("cluster key");
    (scratch, cert)
}

/// One connection and a line through the echo backend; `None` when it failed.
async fn exchange(
    address: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> Option<HandshakeKind> {
    let tcp = tokio::net::TcpStream::connect(address).await.ok()?;
    let name = rustls::pki_types::ServerName::try_from("localhost").ok()?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::clone(config))
        .connect(name, tcp)
        .await
        .ok()?;
    tls.write_all(b"ping\n").await.ok()?;
    let mut line = [0u8; 5];
    tls.read_exact(&mut line).await.ok()?;
    (&line == b"ping\n").then_some(())?;
    let kind = tls.get_ref().1.handshake_kind()?;
    let _ = tls.shutdown().await;
    Some(kind)
}

fn client(cert: &rustls::pki_types::CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    support::client_config(cert, &[&rustls::version::TLS13])
}

#[test]
fn three_nodes_resume_round_robin_reconnections_across_rotations_and_a_restart() {
    let (scratch, cert) = cluster("redis-keys");
    let _redis = Redis::start(&scratch.0, Redis::free_port());
    let rt = support::runtime();
    let (backend, _echo) = rt.block_on(support::echo_server(None));
    // Epochs of 4 s: a run under load crosses rotations. Keys are refreshed in the
    // background, so a loaded machine's slow Redis answers may take up to 1 s (a key the
    // refresh misses leaves tickets under it to full handshakes).
    let section = "ticket_keys = \"redis\"\nrotate_every_s = 4\n";
    let mut nodes: Vec<Daemon> = ["a", "b", "c"]
        .iter()
        .map(|n| start_node_waiting(&scratch.0, n, backend, _redis.port, section, 1000))
        .collect();
    let config = client(&cert);
    let total: u32 = 3000;
    let (mut resumed, mut failed) = (0, 0);
    let started = Instant::now();
    rt.block_on(async {
        // The first connection makes the session the others resume.
        assert_eq!(
            exchange(nodes[0].listen, &config).await,
            Some(HandshakeKind::Full)
        );
    });
    for i in 0..total {
        if i == total / 3 {
            // Restart node b: it takes the cluster's keys from Redis at start.
            let dir = scratch.0.join("b");
            let config_text = std::fs::read_to_string(dir.join("tlsaccel.toml")).expect("config");
            nodes[1] = Daemon::start(&dir, &config_text);
        }
        let node = &nodes[(i as usize + 1) % 3];
        match rt.block_on(exchange(node.listen, &config)) {
            Some(HandshakeKind::Resumed) => resumed += 1,
            Some(_) => {}
            None => failed += 1,
        }
    }
    let elapsed = started.elapsed();
    for node in &nodes {
        let text = node.admin_get("/metrics");
        for line in text.lines().filter(|l| {
            l.starts_with("tlsaccel_ticket") || l.starts_with("tlsaccel_handshakes_total")
        }) {
            eprintln!("{line}");
        }
    }
    assert_eq!(failed, 0);
    let share = f64::from(resumed) / f64::from(total);
    assert!(
        share >= 0.995,
        "{resumed} of {total} reconnections resumed ({:.2}%) in {elapsed:?}",
        share * 100.0
    );
    for node in &nodes {
        let other = node
            .metric("tlsaccel_tickets_accepted_total{key=\"current\",origin=\"other_node\"}")
            + node
                .metric("tlsaccel_tickets_accepted_total{key=\"previous\",origin=\"other_node\"}");
        assert!(other > 0, "no session from another node resumed here");
    }
    if elapsed > Duration::from_secs(5) {
        assert!(
            nodes[0].metric("tlsaccel_ticket_key_rotations_total") >= 2,
            "the run crossed an epoch without a rotation"
        );
    }
    for node in &nodes {
        assert_eq!(node.metric("tlsaccel_ticket_key_local_fallbacks_total"), 0);
    }
    let status = nodes[0].admin_get("/status");
    assert!(status.contains("\"redis\":{\"epochs_known\""), "{status}");
}

/// Sleeps until `into` seconds into the next epoch of `period` seconds (Unix time).
fn sleep_into_next_epoch(period: u64, into: f64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let next = ((now / period as f64).floor() + 1.0) * period as f64;
    std::thread::sleep(Duration::from_secs_f64(next + into - now));
}

#[test]
fn a_node_started_in_a_later_epoch_opens_tickets_sealed_under_past_epochs_keys() {
    let (scratch, cert) = cluster("redis-past");
    let redis = Redis::start(&scratch.0, Redis::free_port());
    let rt = support::runtime();
    let (backend, _echo) = rt.block_on(support::echo_server(None));
    let section = "ticket_keys = \"redis\"\nrotate_every_s = 4\n";
    // Early in an epoch, so the session is made well inside it.
    sleep_into_next_epoch(4, 0.2);
    let a = start_node_waiting(&scratch.0, "a", backend, redis.port, section, 1000);
    let config = client(&cert);
    assert_eq!(
        rt.block_on(exchange(a.listen, &config)),
        Some(HandshakeKind::Full)
    );
    // A node that starts two epochs later holds neither the current nor the next epoch's
    // key for that ticket: it must have fetched the past one.
    sleep_into_next_epoch(4, 4.2);
    let b = start_node_waiting(&scratch.0, "b", backend, redis.port, section, 1000);
    assert_eq!(
        rt.block_on(exchange(b.listen, &config)),
        Some(HandshakeKind::Resumed)
    );
    assert_eq!(
        b.metric("tlsaccel_tickets_accepted_total{key=\"previous\",origin=\"other_node\"}"),
        1
    );
}

#[test]
fn nodes_agree_on_their_keys_again_after_redis_lost_them() {
    let (scratch, cert) = cluster("redis-lost");
    let mut redis = Redis::start(&scratch.0, Redis::free_port());
    let rt = support::runtime();
    let (backend, _echo) = rt.block_on(support::echo_server(None));
    // 20 s epochs: keys are checked against Redis every 5 s. Without the check, nodes that
    // disagree on an epoch's key would stay apart until the epoch after next (20 s or more).
    let section = "ticket_keys = \"redis\"\nrotate_every_s = 20\n";
    let a = start_node_waiting(&scratch.0, "a", backend, redis.port, section, 1000);
    let config = client(&cert);
    // Redis restarts empty (no persistence); a node that starts now finds no keys and
    // makes its own, unless `a` has written its keys back first.
    redis.restart();
    let c = start_node_waiting(&scratch.0, "c", backend, redis.port, section, 1000);
    let started = Instant::now();
    let agreed = |from: &Daemon, to: &Daemon| {
        rt.block_on(async {
            exchange(from.listen, &config).await.is_some()
                && exchange(to.listen, &config).await == Some(HandshakeKind::Resumed)
        })
    };
    support::wait_until(
        "the nodes to agree on the keys again",
        Duration::from_secs(15),
        || agreed(&a, &c) && agreed(&c, &a),
    );
    eprintln!("agreed after {:?}", started.elapsed());
    let repaired: u64 = [&a, &c]
        .iter()
        .map(|n| {
            n.metric("tlsaccel_ticket_keys_shared_total{how=\"restored\"}")
                + n.metric("tlsaccel_ticket_keys_shared_total{how=\"replaced\"}")
        })
        .sum();
    assert!(repaired >= 1, "no key was written back or replaced");
}

/// A TLS 1.3 ClientHello record offering `identities` random 32-byte PSK identities (what
/// a hostile client sends to make the server look each one up).
fn hello_with_identities(identities: usize) -> Vec<u8> {
    fn vec16(body: &[u8]) -> Vec<u8> {
        let mut out = (body.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(body);
        out
    }
    fn ext(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut out = kind.to_be_bytes().to_vec();
        out.extend(vec16(body));
        out
    }
    let mut exts = Vec::new();
    let mut name = vec![0u8];
    name.extend(vec16(b"localhost"));
    exts.extend(ext(0x0000, &vec16(&name)));
    exts.extend(ext(0x002b, &[2, 3, 4]));
    exts.extend(ext(0x000a, &vec16(&[0x00, 0x1d])));
    exts.extend(ext(0x000d, &vec16(&[0x04, 0x03, 0x08, 0x04])));
    let mut share = vec![0x00, 0x1d];
    let mut point = [0u8; 32];
    point[0] = 9; // the X25519 base point: a valid public key
    share.extend(vec16(&point));
    exts.extend(ext(0x0033, &vec16(&share)));
    exts.extend(ext(0x002d, &[1, 1]));
    let (mut ids, mut binders) = (Vec::new(), Vec::new());
    for i in 0..identities {
        let mut id = [0u8; 32];
        id[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
        ids.extend(vec16(&id));
        ids.extend([0u8; 4]);
        binders.push(32u8);
        binders.extend([0u8; 32]);
    }
    let mut psk = vec16(&ids);
    psk.extend(vec16(&binders));
    exts.extend(ext(0x0029, &psk)); // pre_shared_key comes last
    let mut body = vec![3, 3];
    body.extend([7u8; 32]);
    body.push(32);
    body.extend([1u8; 32]);
    body.extend(vec16(&[0x13, 0x01]));
    body.extend([1, 0]);
    body.extend(vec16(&exts));
    let mut hs = vec![1u8];
    hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend(body);
    let mut record = vec![0x16, 3, 1];
    record.extend(vec16(&hs));
    record
}

#[test]
fn a_hello_with_many_identities_costs_one_redis_lookup() {
    let (scratch, _cert) = cluster("redis-psk");
    let redis = Redis::start(&scratch.0, Redis::free_port());
    let rt = support::runtime();
    let (backend, _echo) = rt.block_on(support::echo_server(None));
    // TLS 1.3 stateful resumption: rustls takes each offered identity from the store.
    let a = start_node(
        &scratch.0,
        "a",
        backend,
        redis.port,
        "tickets = false\nsession_store = \"redis\"\n",
    );
    let calls = || {
        a.metric("tlsaccel_redis_calls_total{result=\"ok\"}")
            + a.metric("tlsaccel_redis_calls_total{result=\"error\"}")
            + a.metric("tlsaccel_redis_calls_total{result=\"timeout\"}")
    };
    let before = calls();
    let identities = 200;
    let answer = rt.block_on(async {
        let mut tcp = tokio::net::TcpStream::connect(a.listen)
            .await
            .expect("connect");
        tcp.write_all(&hello_with_identities(identities))
            .await
            .expect("send hello");
        let mut head = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut head))
            .await
            .expect("an answer in time")
            .expect("read");
        head
    });
    // The server went on with a full handshake: a ServerHello came back.
    assert_eq!(answer[0], 0x16, "{answer:?}");
    let over = u64::try_from(identities - 1).unwrap();
    assert_eq!(
        a.metric("tlsaccel_session_store_lookups_total{result=\"over_allowance\"}"),
        over
    );
    assert_eq!(
        a.metric("tlsaccel_session_store_lookups_total{result=\"miss\"}"),
        over + 1
    );
    assert_eq!(calls() - before, 1, "Redis was asked more than once");
}

#[test]
fn a_reload_that_moves_sessions_to_redis_looks_them_up_there() {
    let (scratch, cert) = cluster("redis-reload");
    let redis = Redis::start(&scratch.0, Redis::free_port());
    let rt = support::runtime();
    let (backend, _echo) = rt.block_on(support::echo_server(None));
    // Keys through Redis from the start; sessions (TLS 1.3 stateful) in memory, then, by a
    // reload, in Redis: the listeners built by that reload must wait for Redis lookups.
    let keys = "ticket_keys = \"redis\"\ntickets = false\n";
    let a = start_cpu_node(&scratch.0, "a", backend, redis.port, keys);
    let b = start_cpu_node(&scratch.0, "b", backend, redis.port, keys);
    let config = client(&cert);
    let cross = || {
        rt.block_on(async {
            assert!(exchange(a.listen, &config).await.is_some());
            exchange(b.listen, &config).await
        })
    };
    assert_eq!(cross(), Some(HandshakeKind::Full), "sessions are per node");
    for node in [&a, &b] {
        let text = std::fs::read_to_string(&node.config).expect("config");
        let text = text.replace(
            "tickets = false\n",
            "tickets = false\nsession_store = \"redis\"\n",
        );
        std::fs::write(&node.config, text).expect("new config");
        node.signal(rustix::process::Signal::HUP);
        node.wait_for_line("configuration reloaded", Duration::from_secs(10));
    }
    // The session written by `a` may still be queued when `b` looks: a few tries.
    support::wait_until(
        "a session made on a to resume on b",
        Duration::from_secs(10),
        || cross() == Some(HandshakeKind::Resumed),
    );
    assert_eq!(
        b.metric("tlsaccel_session_store_lookups_total{result=\"local_only\"}"),
        0
    );
}

#[test]
fn tls12_session_ids_resume_across_nodes_through_redis() {
    let (scratch, _cert) = cluster("redis-ids");
    let redis = Redis::start(&scratch.0, Redis::free_port());
    let rt = support::runtime();
    let (backend, _echo) = rt.block_on(support::echo_server(None));
    let section = "session_store = \"redis\"\n";
    let a = start_node(&scratch.0, "a", backend, redis.port, section);
    let b = start_node(&scratch.0, "b", backend, redis.port, section);
    let session = scratch.0.join("session.pem");
    let s_client = |node: &Daemon, session_arg: &str| {
        let output = Command::new("openssl")
            .args(["s_client", "-tls1_2", "-no_ticket", "-connect"])
            .arg(node.listen.to_string())
            .args(["-servername", "localhost", session_arg])
            .arg(&session)
            .stdin(Stdio::null())
            .output()
            .expect("run openssl s_client");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let answered = a.metric("tlsaccel_redis_calls_total{result=\"ok\"}");
    let first = s_client(&a, "-sess_out");
    assert!(first.contains("New, TLSv1.2"), "{first}");
    // The write is queued during the handshake and answered by Redis a moment later.
    support::wait_until("the session to reach Redis", Duration::from_secs(5), || {
        a.metric("tlsaccel_session_store_writes_total{result=\"queued\"}") >= 1
            && a.metric("tlsaccel_redis_calls_total{result=\"ok\"}") > answered
    });
    let second = s_client(&b, "-sess_in");
    assert!(second.contains("Reused, TLSv1.2"), "{second}");
    assert_eq!(
        b.metric("tlsaccel_session_store_lookups_total{result=\"remote_hit\"}"),
        1
    );
    assert_eq!(b.metric("tlsaccel_redis_up"), 1);
}

#[test]
fn redis_stopped_mid_run_costs_full_handshakes_and_no_connection() {
    let (scratch, cert) = cluster("redis-down");
    let mut redis = Redis::start(&scratch.0, Redis::free_port());
    let rt = support::runtime();
    let (backend, _echo) = rt.block_on(support::echo_server(None));
    // TLS 1.3 stateful resumption: each session id resumes once, anywhere.
    let section = "tickets = false\nsession_store = \"redis\"\n";
    let a = start_node(&scratch.0, "a", backend, redis.port, section);
    let b = start_node(&scratch.0, "b", backend, redis.port, section);
    let config = client(&cert);
    // One reconnection: a session made on `a` resumed on `b`.
    let cross = |rt: &tokio::runtime::Runtime| {
        rt.block_on(async {
            let first = exchange(a.listen, &config).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            let second = exchange(b.listen, &config).await;
            (first, second)
        })
    };
    let (first, second) = cross(&rt);
    assert!(first.is_some());
    assert_eq!(second, Some(HandshakeKind::Resumed));

    redis.stop();
    let full_before = b.metric("tlsaccel_session_store_lookups_total{result=\"error\"}");
    for _ in 0..10 {
        let (first, second) = cross(&rt);
        assert!(
            first.is_some() && second.is_some(),
            "a connection failed while Redis was down"
        );
        assert_eq!(second, Some(HandshakeKind::Full));
    }
    assert!(b.metric("tlsaccel_session_store_lookups_total{result=\"error\"}") > full_before);
    assert_eq!(b.metric("tlsaccel_redis_up"), 0);

    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (first, second) = cross(&rt);
        assert!(first.is_some() && second.is_some());
        if second == Some(HandshakeKind::Resumed) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sessions are not shared again after Redis came back"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(b.metric("tlsaccel_redis_up"), 1);
}

#[test]
fn a_node_started_without_redis_serves_and_joins_the_cluster_when_redis_comes() {
    let (scratch, cert) = cluster("redis-late");
    let port = Redis::free_port();
    let rt = support::runtime();
    let (backend, _echo) = rt.block_on(support::echo_server(None));
    let section = "ticket_keys = \"redis\"\nsession_store = \"redis\"\n";
    let a = start_node(&scratch.0, "a", backend, port, section);
    assert_eq!(a.metric("tlsaccel_ticket_key_local_fallbacks_total"), 1);
    let config = client(&cert);
    rt.block_on(async {
        // Its own key: its own sessions resume, with no error for the clients.
        assert_eq!(exchange(a.listen, &config).await, Some(HandshakeKind::Full));
        assert_eq!(
            exchange(a.listen, &config).await,
            Some(HandshakeKind::Resumed)
        );
    });
    let _redis = Redis::start(&scratch.0, port);
    support::wait_until("the shared key", Duration::from_secs(15), || {
        a.metric("tlsaccel_ticket_keys_shared_total{how=\"made\"}") >= 1
    });
    // A second node resumes the first one's sessions now.
    let b = start_node(&scratch.0, "b", backend, port, section);
    rt.block_on(async {
        assert!(exchange(a.listen, &config).await.is_some());
        assert_eq!(
            exchange(b.listen, &config).await,
            Some(HandshakeKind::Resumed)
        );
    });
    assert_eq!(b.metric("tlsaccel_ticket_key_local_fallbacks_total"), 0);
}

#[test]
fn redis_over_tls_with_a_password_and_a_wrong_password_refused() {
    let (scratch, cert) = cluster("redis-tls");
    let port = Redis::free_port();
    // A server certificate for localhost from a CA of the test's own.
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca =
        rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().expect("ca key"))
            .expect("ca");
    let server_key = rcgen::KeyPair::generate().expect("server key");
    let server = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .expect("server params")
        .signed_by(&server_key, &ca)
        .expect("server cert");
    let dir = &scratch.0;
    std::fs::write(dir.join("redis-ca.pem"), ca.pem()).expect("ca pem");
    std::fs::write(dir.join("redis.pem"), server.pem()).expect("server pem");
    std::fs::write(dir.join("redis.key"), server_key.serialize_pem()).expect("server key pem");
    let (port_arg, server_pem, server_key_pem) = (
        port.to_string(),
        dir.join("redis.pem"),
        dir.join("redis.key"),
    );
    let _redis = Redis::start_with(
        dir,
        port,
        &[
            "--port".as_ref(),
            "0".as_ref(),
            "--tls-port".as_ref(),
            port_arg.as_ref(),
            "--tls-cert-file".as_ref(),
            server_pem.as_os_str(),
            "--tls-key-file".as_ref(),
            server_key_pem.as_os_str(),
            "--tls-auth-clients".as_ref(),
            "no".as_ref(),
            "--requirepass".as_ref(),
            "s3cret-for-the-test".as_ref(),
        ],
    );
    let rt = support::runtime();
    let (backend, _echo) = rt.block_on(support::echo_server(None));
    let node = |name: &str, password: &str| {
        let node_dir = node_dir(dir, name);
        std::fs::copy(dir.join("redis-ca.pem"), node_dir.join("redis-ca.pem")).expect("copy ca");
        std::fs::write(node_dir.join("redis.password"), format!("{password}\n")).expect("pw");
        let config = support::config(
            &[backend],
            "",
            &format!(
                "[resumption]\nnode = \"{name}\"\nticket_keys = \"redis\"\n\
                 [resumption.redis]\nurl = \"rediss://localhost:{port}\"\n\
                 ca = \"redis-ca.pem\"\npassword_file = \"redis.password\"\n\
                 cluster_key_file = \"cluster.key\"\ntimeout_ms = 500\n"
            ),
        );
        Daemon::start(&node_dir, &config)
    };
    let a = node("a", "s3cret-for-the-test");
    assert_eq!(a.metric("tlsaccel_redis_up"), 1);
    assert_eq!(a.metric("tlsaccel_ticket_key_local_fallbacks_total"), 0);
    assert!(a.metric("tlsaccel_ticket_keys_shared_total{how=\"made\"}") >= 1);
    // A node with the wrong password is refused by Redis, and still serves its clients.
    let b = node("b", "wrong");
    assert_eq!(b.metric("tlsaccel_redis_up"), 0);
    assert_eq!(b.metric("tlsaccel_ticket_key_local_fallbacks_total"), 1);
    let config = client(&cert);
    rt.block_on(async {
        assert_eq!(exchange(b.listen, &config).await, Some(HandshakeKind::Full));
        assert_eq!(exchange(a.listen, &config).await, Some(HandshakeKind::Full));
        assert_eq!(
            exchange(a.listen, &config).await,
            Some(HandshakeKind::Resumed)
        );
    });
}
