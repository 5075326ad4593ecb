//! The daemon end to end, with the device path and the pure-CPU path measured in one run:
//! * the record layer alone: host CPU time per record (the thread that drives the
//!   connection, which with a current-thread runtime also runs the batcher and the
//!   completion reactor) when records go to the device and when they are sealed on the CPU,
//!   by record size. Where the device path costs the host less than doing the crypto is the
//!   crossover `offload.cpu_below_bytes` should sit at;
//! * bulk throughput through `tlsaccel serve` (in this process, an echo backend, rustls
//!   clients), one connection and sixteen, bytes each way at once;
//! * full TLS 1.3 handshakes per second, one at a time and sixteen at once.
//!
//! Everything shares this machine's cores: the simulator's engines, the daemon, the clients
//! and the backend. Ratios are same-run comparisons, not accelerator figures.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::crypto::cipher::{AeadKey, Iv};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::ConnectionTrafficSecrets;
use tlsaccel::batch::RecordQueue;
use tlsaccel::record::{Direction, Policy, RecordDevice, RecordStats, Version};
use tlsaccel::serve::Server;
use tlsaccel_benches::{open_device, smoke_mode};
use tlsaccel_driver::Device;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

fn secrets() -> ConnectionTrafficSecrets {
    let key = AeadKey::from([9u8; 32]);
    ConnectionTrafficSecrets::Aes256Gcm {
        key,
        iv: Iv::new([4u8; 12]),
    }
}

/// Host CPU nanoseconds per sealed record of `size` bytes, on the device or the CPU. One
/// thread runs everything on the host side: sealing, the batcher, the completion reactor.
fn seal_cost(device: Option<&Arc<Device>>, size: usize, records: usize) -> f64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let record_device = device.map(|device| {
            let pair = device
                .queue(tlsaccel_driver::QueueConfig {
                    size: 1024,
                    interrupts: true,
                    ..tlsaccel_driver::QueueConfig::default()
                })
                .expect("queue");
            let queue =
                tlsaccel_driver::AsyncQueue::new(pair, Duration::from_secs(2)).expect("queue");
            RecordDevice {
                device: Arc::clone(device),
                queue: RecordQueue::start(queue, 32, Duration::ZERO),
            }
        });
        let device = record_device.as_ref();
        let stats = RecordStats::default();
        let policy = Policy { cpu_below: 0 };
        let mut direction = Direction::new(Version::Tls13, true, &secrets(), 0).expect("key");
        let payload = vec![7u8; size];
        let batch: Vec<(u8, &[u8])> = (0..32).map(|_| (23, payload.as_slice())).collect();
        let mut out = Vec::with_capacity(32 * (size + 64));
        // Warm up: the key load and the first DMA allocations.
        direction
            .seal(&batch, &mut out, device, policy, &stats)
            .await;
        let start = thread_cpu();
        let mut done = 0;
        while done < records {
            out.clear();
            direction
                .seal(&batch, &mut out, device, policy, &stats)
                .await;
            done += batch.len();
        }
        (thread_cpu() - start).as_nanos() as f64 / done as f64
    })
}

fn write_identity(dir: &Path) -> CertificateDer<'static> {
    let issued = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    std::fs::write(dir.join("cert.pem"), issued.cert.pem()).expect("write cert");
    std::fs::write(dir.join("key.pem"), issued.signing_key.serialize_pem()).expect("write key");
    CertificateDer::from(issued.cert.der().to_vec())
}

async fn start_daemon(dir: &Path, backend: SocketAddr, device: bool) -> (Server, SocketAddr) {
    // With a device, every record goes to it (cpu_below_bytes = 0): the comparison is of
    // the two paths, not of the default policy.
    let devices = if device {
        "[[device]]\naddress = \"sim\"\nqueues = 2\n[offload]\ncpu_below_bytes = 0\n"
    } else {
        ""
    };
    let text = format!(
        "[[listener]]\nname = \"bench\"\naddress = \"127.0.0.1:0\"\ndefault_pool = \"echo\"\n\
         [[listener.certificate]]\nchain = \"cert.pem\"\nkey = \"key.pem\"\n{devices}\
         [[pool]]\nname = \"echo\"\nservers = [\"{backend}\"]\n"
    );
    let file = dir.join(if device { "device.toml" } else { "cpu.toml" });
    std::fs::write(&file, text).expect("config");
    let config = tlsaccel::config::Config::load(&file).expect("config loads");
    let server = Server::start(config, Some(file))
        .await
        .expect("daemon starts");
    let address = server.listeners[0].1;
    (server, address)
}

async fn echo_backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.into_split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    address
}

fn client_config(cert: &CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).expect("root");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

async fn connect(
    address: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    tokio_rustls::TlsConnector::from(Arc::clone(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("handshake")
}

/// Sends `bytes` and reads them back on one connection, both at once.
async fn echo(address: SocketAddr, config: Arc<rustls::ClientConfig>, bytes: usize) {
    let stream = connect(address, &config).await;
    let (mut read, mut write) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        let chunk = vec![5u8; 256 * 1024];
        let mut sent = 0;
        while sent < bytes {
            let n = chunk.len().min(bytes - sent);
            write.write_all(&chunk[..n]).await.expect("send");
            sent += n;
        }
        write.shutdown().await.expect("close");
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut received = 0;
    loop {
        let n = read.read(&mut buf).await.expect("receive");
        if n == 0 {
            break;
        }
        received += n;
    }
    writer.await.expect("writer");
    assert_eq!(received, bytes);
}

/// MB/s each way through the proxy with `connections` connections moving `total` bytes.
async fn bulk(
    address: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    connections: usize,
    total: usize,
) -> f64 {
    let start = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|_| tokio::spawn(echo(address, Arc::clone(config), total / connections)))
        .collect();
    for task in tasks {
        task.await.expect("connection");
    }
    total as f64 / start.elapsed().as_secs_f64() / 1e6
}

/// Full handshakes per second, `parallel` at a time.
async fn handshakes(
    address: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    parallel: usize,
    count: usize,
) -> f64 {
    let start = Instant::now();
    let tasks: Vec<_> = (0..parallel)
        .map(|_| {
            let config = Arc::clone(config);
            tokio::spawn(async move {
                for _ in 0..count / parallel {
                    let mut stream = connect(address, &config).await;
                    stream.shutdown().await.expect("close");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("handshakes");
    }
    (count / parallel * parallel) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let smoke = smoke_mode();
    let scale = if smoke { 1 } else { 16 };

    println!("record layer: host CPU per sealed record (TLS 1.3 AES-256-GCM, batches of 32)");
    println!(
        "{:>8} {:>14} {:>14} {:>10}",
        "size", "device ns", "cpu ns", "device/cpu"
    );
    let device = open_device();
    let mut crossover = None;
    for size in [64, 256, 1024, 4096, 16384] {
        let records = if smoke {
            64
        } else {
            (4 << 20) * scale / size.max(1024)
        };
        let on_device = seal_cost(Some(&device), size, records);
        let on_cpu = seal_cost(None, size, records);
        if crossover.is_none() && on_device < on_cpu {
            crossover = Some(size);
        }
        println!(
            "{size:>8} {on_device:>14.0} {on_cpu:>14.0} {:>10.2}",
            on_device / on_cpu
        );
    }
    match crossover {
        Some(size) => println!(
            "host-CPU crossover: records of {size} bytes and up cost the host less on the device"
        ),
        None => println!("host-CPU crossover: none up to 16 KiB on this machine"),
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = std::env::temp_dir().join(format!("tlsaccel-bench-proxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cert = write_identity(&dir);
    let client = client_config(&cert);
    runtime.block_on(async {
        let backend = echo_backend().await;
        let (device_server, via_device) = start_daemon(&dir, backend, true).await;
        let (cpu_server, via_cpu) = start_daemon(&dir, backend, false).await;
        let total = if smoke { 1 << 20 } else { 64 << 20 };
        println!(
            "\nthrough the proxy (echo backend; MB/s each way), and full TLS 1.3 handshakes/s"
        );
        println!(
            "{:<26} {:>12} {:>12} {:>10}",
            "workload", "device", "cpu", "device/cpu"
        );
        for connections in [1, 16] {
            let d = bulk(via_device, &client, connections, total).await;
            let c = bulk(via_cpu, &client, connections, total).await;
            println!(
                "{:<26} {d:>12.0} {c:>12.0} {:>10.2}",
                format!("bulk, {connections} connection(s)"),
                d / c
            );
        }
        let count = if smoke { 16 } else { 400 * scale / 16 * 16 };
        for parallel in [1, 16] {
            let d = handshakes(via_device, &client, parallel, count).await;
            let c = handshakes(via_cpu, &client, parallel, count).await;
            println!(
                "{:<26} {d:>12.0} {c:>12.0} {:>10.2}",
                format!("handshakes, {parallel} at once"),
                d / c
            );
        }
        // Connections end before the runtime does: a task still inside the device's
        // `block_in_place` when the runtime shuts down would find its timers gone.
        device_server.drain().await;
        cpu_server.drain().await;
    });
    let _ = std::fs::remove_dir_all(&dir);
}
