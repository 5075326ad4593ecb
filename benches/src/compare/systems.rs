//! The systems under test, started and stopped by the harness: tlsaccel with its device
//! (the simulator in a separate process, over vfio-user, so the two processes' CPU can be
//! told apart), tlsaccel on the CPU alone, nginx (stream module) and HAProxy (mode tcp).
//! All terminate TLS 1.3 with the same certificate and suite and forward the plaintext to
//! the same backend, with the same number of worker threads or processes. A fifth system,
//! HAProxy relaying plain TCP with no TLS at all, is the floor: what moving the bytes costs
//! a proxy when no crypto is left on the host.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::measure::{self, Usage};

/// A system under test.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Kind {
    TlsaccelDevice,
    TlsaccelCpu,
    /// `tlsaccel-cpu` with sessions in Redis and no tickets: every resumption a lookup in
    /// the shared store.
    TlsaccelRedis,
    Nginx,
    Haproxy,
    /// HAProxy `mode tcp` without TLS: the plaintext floor.
    PlainTcp,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::TlsaccelDevice,
        Kind::TlsaccelCpu,
        Kind::TlsaccelRedis,
        Kind::Nginx,
        Kind::Haproxy,
        Kind::PlainTcp,
    ];

    /// Its name in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Kind::TlsaccelDevice => "tlsaccel-device",
            Kind::TlsaccelCpu => "tlsaccel-cpu",
            Kind::TlsaccelRedis => "tlsaccel-redis",
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
            Kind::PlainTcp => "haproxy-plain",
        }
    }

    /// False for the plaintext floor, which clients reach over plain TCP.
    pub fn speaks_tls(self) -> bool {
        self != Kind::PlainTcp
    }

    /// A `tlsaccel serve` of some kind.
    pub fn is_tlsaccel(self) -> bool {
        matches!(
            self,
            Kind::TlsaccelDevice | Kind::TlsaccelCpu | Kind::TlsaccelRedis
        )
    }

    /// Parses a name.
    pub fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// A certificate and key as files, and the certificate for clients to trust.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: &'static str,
    pub chain: PathBuf,
    pub key: PathBuf,
    /// Certificate then key, for HAProxy.
    pub combined: PathBuf,
    pub der: rustls::pki_types::CertificateDer<'static>,
}

impl Identity {
    /// Generates an ECDSA P-256 (`rsa` false) or RSA-2048 identity for `localhost` in `dir`.
    pub fn generate(dir: &Path, rsa: bool) -> anyhow::Result<Self> {
        let name = if rsa { "rsa2048" } else { "ecdsa-p256" };
        let key = if rsa {
            rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)?
        } else {
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?
        };
        let cert =
            rcgen::CertificateParams::new(vec!["localhost".to_string()])?.self_signed(&key)?;
        let chain = dir.join(format!("{name}.pem"));
        let key_file = dir.join(format!("{name}.key"));
        let combined = dir.join(format!("{name}.combined.pem"));
        std::fs::write(&chain, cert.pem())?;
        std::fs::write(&key_file, key.serialize_pem())?;
        std::fs::write(&combined, format!("{}{}", cert.pem(), key.serialize_pem()))?;
        Ok(Self {
            name,
            chain,
            key: key_file,
            combined,
            der: cert.der().clone(),
        })
    }
}

/// Installs nginx (with its stream module), HAProxy, h2load and Redis from Debian's
/// packages when missing.
pub fn install_packages(kinds: &[Kind]) -> anyhow::Result<()> {
    let mut need = Vec::new();
    if kinds.contains(&Kind::Nginx) {
        if which("nginx").is_none() {
            need.push("nginx-light");
        }
        if !Path::new(NGINX_STREAM_MODULE).exists() {
            need.push("libnginx-mod-stream");
        }
    }
    let haproxy = kinds.contains(&Kind::Haproxy) || kinds.contains(&Kind::PlainTcp);
    if haproxy && which("haproxy").is_none() {
        need.push("haproxy");
    }
    if which("h2load").is_none() {
        need.push("nghttp2-client");
    }
    if kinds.iter().any(|k| k.is_tlsaccel()) && which("redis-server").is_none() {
        need.push("redis-server");
    }
    if need.is_empty() {
        return Ok(());
    }
    eprintln!("compare: installing {}", need.join(" "));
    let update = Command::new("apt-get")
        .args(["update", "-q"])
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(update.success(), "apt-get update failed");
    let status = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&need)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(
        status.success(),
        "apt-get install {} failed",
        need.join(" ")
    );
    Ok(())
}

const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

/// The version line a system reports, for the report.
pub fn version(kind: Kind) -> String {
    let (program, args): (&str, &[&str]) = match kind {
        Kind::Nginx => ("nginx", &["-v"]),
        Kind::Haproxy | Kind::PlainTcp => ("haproxy", &["-v"]),
        Kind::TlsaccelDevice | Kind::TlsaccelCpu => {
            return format!("tlsaccel {}", env!("CARGO_PKG_VERSION"))
        }
        Kind::TlsaccelRedis => {
            let redis = Command::new("redis-server")
                .arg("--version")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_else(|_| "redis-server: not installed".into());
            return format!("tlsaccel {} with {redis}", env!("CARGO_PKG_VERSION"));
        }
    };
    let Some(path) = which(program) else {
        return format!("{program}: not installed");
    };
    Command::new(path)
        .args(args)
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_owned()
        })
        .unwrap_or_default()
}

/// The Redis the tlsaccel systems share their resumption state through (as a cluster of
/// appliances would), with no persistence; stopped on drop.
#[derive(Debug)]
pub struct ClusterStore {
    child: Child,
    pub port: u16,
    /// The cluster key file every tlsaccel system is given.
    pub cluster_key: PathBuf,
}

impl ClusterStore {
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let cluster_key = dir.join("cluster.key");
        let mut key = [0u8; 32];
        aws_lc_rs::rand::fill(&mut key).map_err(|_| anyhow::anyhow!("random"))?;
        std::fs::write(&cluster_key, key)?;
        let mut child =
            Command::new(which("redis-server").context("redis-server is not installed")?)
                .args(["--bind", "127.0.0.1", "--port", &port.port().to_string()])
                .args(["--save", "", "--appendonly", "no", "--dir"])
                .arg(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting redis-server")?;
        wait_for_port(port, &mut child, "redis-server")?;
        Ok(Self {
            child,
            port: port.port(),
            cluster_key,
        })
    }

    /// The `[resumption]` part of a tlsaccel configuration for `kind`.
    fn resumption(&self, kind: Kind) -> String {
        let sessions = if kind == Kind::TlsaccelRedis {
            "tickets = false\nsession_store = \"redis\"\n"
        } else {
            ""
        };
        format!(
            "[resumption]\nticket_keys = \"redis\"\n{sessions}\n[resumption.redis]\n\
             url = \"redis://127.0.0.1:{}\"\ncluster_key_file = \"{}\"\n",
            self.port,
            self.cluster_key.display()
        )
    }
}

impl Drop for ClusterStore {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A started system.
#[derive(Debug)]
pub struct Running {
    pub kind: Kind,
    pub listen: SocketAddr,
    main: Child,
    simulator: Option<Child>,
}

impl Running {
    /// CPU and memory of the proxy's processes (nginx: master and workers).
    pub fn proxy_usage(&self) -> Usage {
        measure::usage(&measure::tree(self.main.id()))
    }

    /// CPU and memory of the simulator process, for the device path.
    pub fn simulator_usage(&self) -> Option<Usage> {
        self.simulator.as_ref().map(|s| measure::usage(&[s.id()]))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.main.id()) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if matches!(self.main.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.main.kill();
        let _ = self.main.wait();
        if let Some(sim) = &mut self.simulator {
            let _ = sim.kill();
            let _ = sim.wait();
        }
    }
}

fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn wait_for_port(address: SocketAddr, child: &mut Child, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            anyhow::bail!("{what} exited at start ({status})");
        }
        if std::net::TcpStream::connect(address).is_ok() {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{what} did not listen on {address}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `kind` in `dir` with `identity`, forwarding to `backend`, with the settings'
/// `workers` threads or processes, in HTTP mode when they say `http`. `exe` is this harness, which runs as `tlsaccel` when asked to (see
/// [`super::EXEC_ENV`]).
pub fn start(
    kind: Kind,
    identity: &Identity,
    backend: SocketAddr,
    settings: &super::Settings,
    dir: &Path,
    exe: &Path,
    store: Option<&ClusterStore>,
) -> anyhow::Result<Running> {
    let (workers, http) = (settings.workers, settings.http);
    let listen = free_port()?;
    let dir = dir.join(kind.name());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let log = std::fs::File::create(dir.join("stderr.log"))?;
    match kind {
        Kind::TlsaccelDevice | Kind::TlsaccelCpu | Kind::TlsaccelRedis => {
            let mut simulator = None;
            let mut device = String::new();
            if kind == Kind::TlsaccelDevice {
                let socket = dir.join("sim.sock");
                let child = Command::new(exe)
                    .env(super::EXEC_ENV, "1")
                    .args(["sim", "--exit-with-parent", "--clients", "1", "--vfio-user"])
                    .arg(&socket)
                    .stdout(Stdio::null())
                    .stderr(log.try_clone()?)
                    .spawn()
                    .context("starting the simulator")?;
                simulator = Some(child);
                let deadline = Instant::now() + Duration::from_secs(10);
                while !socket.exists() {
                    anyhow::ensure!(Instant::now() < deadline, "the simulator made no socket");
                    std::thread::sleep(Duration::from_millis(20));
                }
                // Handshakes on the device, and records of 1 KiB and more: the bulk of a
                // transfer, while small request/response records stay on the CPU.
                device = format!(
                    "[[device]]\naddress = \"vfio-user:{}\"\nqueues = 2\n\n[offload]\ncpu_below_bytes = 1024\n",
                    socket.display()
                );
            }
            // HTTP mode: requests parsed and sent over kept-alive backend connections.
            let mode = if http {
                "mode = \"http\"\nalpn = [\"h2\", \"http/1.1\"]\n"
            } else {
                ""
            };
            let config = format!(
                "worker_threads = {workers}\n\n[[listener]]\nname = \"bench\"\naddress = \"{listen}\"\n\
                 {mode}default_pool = \"backend\"\ntls_versions = [\"1.3\"]\n\
                 cipher_suites = [\"TLS13_AES_128_GCM_SHA256\"]\nmax_connections = {}\n\n\
                 [[listener.certificate]]\nchain = \"{}\"\nkey = \"{}\"\n\n{device}\n\
                 [[pool]]\nname = \"backend\"\nservers = [\"{backend}\"]\n\n{resumption}",
                super::max_connections(),
                identity.chain.display(),
                identity.key.display(),
                resumption = store.map(|s| s.resumption(kind)).unwrap_or_default(),
            );
            let file = dir.join("tlsaccel.toml");
            std::fs::write(&file, config)?;
            let mut main = Command::new(exe)
                .env(super::EXEC_ENV, "1")
                .env("TLSACCEL_LOG", "error")
                .args(["serve", "--config"])
                .arg(&file)
                .stdout(Stdio::piped())
                .stderr(log)
                .spawn()
                .context("starting tlsaccel serve")?;
            let stdout = main.stdout.take().context("stdout")?;
            let mut lines = BufReader::new(stdout).lines();
            loop {
                match lines.next() {
                    Some(Ok(line)) if line.contains("listener bench on") => break,
                    Some(Ok(_)) => {}
                    _ => anyhow::bail!("tlsaccel serve stopped at start (see {})", dir.display()),
                }
            }
            // Keep draining its stdout so it never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            Ok(Running {
                kind,
                listen,
                main,
                simulator,
            })
        }
        Kind::Nginx => {
            // The same TLS settings either way: L4 (`stream`), or with `http` nginx's HTTP
            // proxy with upstream keep-alive, the way its guide sets it up.
            let tls = format!(
                "ssl_certificate {chain};\n    ssl_certificate_key {key};\n    ssl_protocols TLSv1.3;\n    \
                 ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256;\n    ssl_ecdh_curve X25519;\n    \
                 ssl_session_cache shared:SSL:50m;\n    ssl_session_tickets on;\n",
                chain = identity.chain.display(),
                key = identity.key.display(),
            );
            let d = dir.display();
            let body = if http {
                format!(
                    "http {{\n  access_log off;\n  client_body_temp_path {d}/t1;\n  proxy_temp_path {d}/t2;\n  \
                     fastcgi_temp_path {d}/t3;\n  uwsgi_temp_path {d}/t4;\n  scgi_temp_path {d}/t5;\n  \
                     keepalive_requests 1000000;\n  \
                     upstream backend {{ server {backend}; keepalive 64; keepalive_requests 1000000; }}\n  \
                     server {{\n    listen {listen} ssl http2;\n    {tls}    \
                     location / {{\n      proxy_pass http://backend;\n      proxy_http_version 1.1;\n      \
                     proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n"
                )
            } else {
                format!(
                    "stream {{\n  upstream backend {{ server {backend}; }}\n  server {{\n    \
                     listen {listen} ssl;\n    {tls}    proxy_pass backend;\n  }}\n}}\n"
                )
            };
            let module = if http {
                String::new()
            } else {
                format!("load_module {NGINX_STREAM_MODULE};\n")
            };
            let config = format!(
                "{module}worker_processes {workers};\ndaemon off;\n\
                 master_process on;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
                 events {{ worker_connections {connections}; }}\n{body}",
                connections = 2 * super::max_connections(),
            );
            let file = dir.join("nginx.conf");
            std::fs::write(&file, config)?;
            let mut main = Command::new(which("nginx").context("nginx is not installed")?)
                .arg("-c")
                .arg(&file)
                .arg("-p")
                .arg(&dir)
                .arg("-e")
                .arg(dir.join("error.log"))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("starting nginx")?;
            wait_for_port(listen, &mut main, "nginx")?;
            Ok(Running {
                kind,
                listen,
                main,
                simulator: None,
            })
        }
        Kind::Haproxy | Kind::PlainTcp => {
            let tls = (kind == Kind::Haproxy).then_some(identity.combined.as_path());
            let file = dir.join("haproxy.cfg");
            // The plaintext floor stays TCP.
            let http = http && kind == Kind::Haproxy;
            std::fs::write(&file, haproxy_config(listen, backend, workers, tls, http))?;
            let mut main = Command::new(which("haproxy").context("haproxy is not installed")?)
                .arg("-f")
                .arg(&file)
                .arg("-db")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("starting haproxy")?;
            wait_for_port(listen, &mut main, kind.name())?;
            Ok(Running {
                kind,
                listen,
                main,
                simulator: None,
            })
        }
    }
}

/// HAProxy in `mode tcp` (or with `http`, `mode http` reusing backend connections) from
/// `listen` to `backend` on `workers` threads: terminating TLS 1.3 with the certificate and
/// key in `tls` (one file), or relaying plain TCP when `tls` is `None` (the floor),
/// otherwise configured alike.
fn haproxy_config(
    listen: SocketAddr,
    backend: SocketAddr,
    workers: usize,
    tls: Option<&Path>,
    http: bool,
) -> String {
    let maxconn = super::max_connections();
    let alpn = if http { " alpn h2,http/1.1" } else { "" };
    let (global_tls, bind_tls) = match tls {
        Some(combined) => (
            "  ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256\n  \
             ssl-default-bind-options ssl-min-ver TLSv1.3\n",
            format!(" ssl crt {} curves X25519{alpn}", combined.display()),
        ),
        None => ("", String::new()),
    };
    // `mode http` keeps backend connections and shares them between clients.
    let mode = if http {
        "mode http\n  option http-keep-alive\n  http-reuse always"
    } else {
        "mode tcp"
    };
    format!(
        "global\n  nbthread {workers}\n  maxconn {maxconn}\n{global_tls}\n\
         defaults\n  {mode}\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n\n\
         frontend bench\n  bind {listen}{bind_tls}\n  default_backend backend\n\n\
         backend backend\n  server s1 {backend}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haproxy_in_http_mode_reuses_backend_connections_and_offers_h2() {
        let listen: SocketAddr = "127.0.0.1:8443".parse().expect("address");
        let backend: SocketAddr = "127.0.0.1:8080".parse().expect("address");
        let http = haproxy_config(listen, backend, 2, Some(Path::new("/c.pem")), true);
        assert!(http.contains("mode http\n  option http-keep-alive\n  http-reuse always\n"));
        assert!(http.contains("ssl crt /c.pem curves X25519 alpn h2,http/1.1\n"));
        assert!(!http.contains("mode tcp"));
    }

    #[test]
    fn the_plaintext_floor_is_haproxy_configured_alike_without_tls() {
        let listen: SocketAddr = "127.0.0.1:8443".parse().expect("address");
        let backend: SocketAddr = "127.0.0.1:8080".parse().expect("address");
        let tls = haproxy_config(listen, backend, 2, Some(Path::new("/c.pem")), false);
        let plain = haproxy_config(listen, backend, 2, None, false);
        assert!(tls.contains("bind 127.0.0.1:8443 ssl crt /c.pem curves X25519\n"));
        assert!(plain.contains("bind 127.0.0.1:8443\n"));
        assert!(!plain.contains("ssl"), "{plain}");
        for config in [&tls, &plain] {
            assert!(config.contains("nbthread 2\n"));
            assert!(config.contains("mode tcp\n"));
            assert!(config.contains("server s1 127.0.0.1:8080\n"));
        }
        assert_eq!(Kind::parse("haproxy-plain"), Some(Kind::PlainTcp));
        assert!(!Kind::PlainTcp.speaks_tls() && Kind::Haproxy.speaks_tls());
    }
}
