//! `tlsaccel serve --demo`: the daemon with nothing to set up. An in-process simulated
//! device, a self-signed certificate for `localhost` generated at start, and a small HTTP
//! backend on loopback that says hello and reports what it received.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::config::Config;

/// Largest request body the demo backend reads.
const MAX_BODY: usize = 16 << 20;

/// Writes a fresh certificate and key under `dir` and returns the configuration text of
/// the demo: `listen` for TLS, `backend` as the only server, `admin` for metrics.
pub fn write_config(
    dir: &Path,
    listen: &str,
    backend: SocketAddr,
    admin: &str,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "tlsaccel demo");
    let cert = params.self_signed(&key)?;
    write_private(&dir.join("demo.key"), key.serialize_pem().as_bytes())?;
    std::fs::write(dir.join("demo.pem"), cert.pem())?;
    let text = format!(
        r#"# Written by `tlsaccel serve --demo`.
[[listener]]
name = "demo"
address = "{listen}"
alpn = ["http/1.1"]
default_pool = "demo"

[[listener.certificate]]
chain = "demo.pem"
key = "demo.key"

[[device]]
address = "sim"
queues = 2

# The demo sends records of 1 KiB and more to the (simulated) device, to show the path;
# the default keeps records on the CPU (docs/daemon.md, "Offload policy").
[offload]
cpu_below_bytes = 1024

[[pool]]
name = "demo"
servers = ["{backend}"]

[pool.health_check]
interval_ms = 2000
http_path = "/"

[admin]
address = "{admin}"
"#
    );
    let file = dir.join("tlsaccel-demo.toml");
    std::fs::write(&file, text)?;
    Config::load(&file)?;
    Ok(file)
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(data)
}

/// Starts the demo backend on `address` (port 0 picks one); returns where it listens.
pub async fn start_backend(address: SocketAddr) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(address).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(answer);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(local)
}

async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let received = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes().len().to_string(),
        Err(_) => format!("more than {MAX_BODY}"),
    };
    let text = format!(
        "Hello from the tlsaccel demo backend.\nYou sent {method} {path} with {received} body bytes.\n"
    );
    Ok(Response::new(Full::new(Bytes::from(text))))
}
