//! Device faults under load: `tlsaccel serve` with every record on the device
//! (`cpu_below_bytes = 0`) and the simulator in a separate process, 256 connections streaming
//! both ways with end-to-end hashes, while the simulator is made to fail in every way it can,
//! one fault after another (through its control socket, `tlsaccel sim --control`).
//!
//! What must hold: no connection is lost, no byte is corrupted, and after each fault the
//! device is back in use for new connections; the time that took is printed per fault.

mod support;

use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{
    client_config, config, control, echo_server, runtime, start_simulator, wait_until, Daemon,
    Scratch,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONNECTIONS: usize = 256;
/// What each connection writes before reading it back, per round.
const CHUNK: usize = 8 * 1024;

/// One streaming connection: writes chunks and reads each back until told to stop, hashing
/// both sides. Returns whether everything came back intact, and the bytes moved.
async fn stream_until_stopped(
    listen: std::net::SocketAddr,
    client: Arc<rustls::ClientConfig>,
    seed: u64,
    stop: Arc<AtomicBool>,
    moved: Arc<AtomicU64>,
) -> Result<u64, String> {
    use aws_lc_rs::digest::{Context, SHA256};
    let mut stream = support::connect(listen, &client).await;
    let (mut sent_hash, mut back_hash) = (Context::new(&SHA256), Context::new(&SHA256));
    let mut total = 0u64;
    let mut round = seed;
    let mut back = vec![0u8; CHUNK];
    while !stop.load(Ordering::Relaxed) {
        let chunk = support::pattern(round, CHUNK);
        round = round.wrapping_add(1);
        sent_hash.update(&chunk);
        stream
            .write_all(&chunk)
            .await
            .map_err(|e| format!("connection {seed}: send failed after {total} bytes: {e}"))?;
        stream
            .read_exact(&mut back)
            .await
            .map_err(|e| format!("connection {seed}: receive failed after {total} bytes: {e}"))?;
        back_hash.update(&back);
        total += CHUNK as u64;
        moved.fetch_add(CHUNK as u64, Ordering::Relaxed);
    }
    stream
        .shutdown()
        .await
        .map_err(|e| format!("connection {seed}: close_notify: {e}"))?;
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .await
        .map_err(|e| format!("connection {seed}: end of stream: {e}"))?;
    if !rest.is_empty() || sent_hash.finish().as_ref() != back_hash.finish().as_ref() {
        return Err(format!("connection {seed}: bytes differ after {total}"));
    }
    Ok(total)
}

struct Faults {
    daemon: Daemon,
    socket: PathBuf,
    control: PathBuf,
    sim: Child,
    client: Arc<rustls::ClientConfig>,
    rt: tokio::runtime::Runtime,
}

impl Faults {
    fn device_records(&self) -> u64 {
        self.daemon
            .metric("tlsaccel_records_total{op=\"open\",engine=\"device\"}")
    }

    /// Waits until the device is in service and a new connection's records go through it;
    /// returns how long that took from `since`.
    fn back_in_use(&self, fault: &str, since: Instant) -> Duration {
        wait_until(
            &format!("the device in service after {fault}"),
            Duration::from_secs(60),
            || self.daemon.metric("tlsaccel_device_up") == 1,
        );
        // A new connection, records of 1 MiB both ways: they must reach the device.
        loop {
            let before = self.device_records();
            let (sent, back) = self.rt.block_on(async {
                let fresh = support::connect(self.daemon.listen, &self.client).await;
                support::echo_transfer(fresh, 1 << 20, 99).await
            });
            assert_eq!(sent, back, "a new connection after {fault}");
            if self.device_records() >= before + 32 {
                return since.elapsed();
            }
            assert!(
                since.elapsed() < Duration::from_secs(60),
                "new connections stayed on the CPU after {fault}"
            );
        }
    }
}

#[test]
fn faults_under_load_lose_no_connection_and_no_byte() {
    let rt = runtime();
    let (backend, _echo) = rt.block_on(echo_server(None));
    let dir = Scratch::new("faults");
    let cert = support::write_identity(&dir.0);
    let socket = dir.0.join("sim.sock");
    let control_path = dir.0.join("control.sock");
    let sim = start_simulator(&socket, &control_path);
    let text = config(&[backend], "", "[offload]\ncpu_below_bytes = 0\n")
        .replace(
            "address = \"sim\"",
            &format!("address = \"vfio-user:{}\"", socket.display()),
        )
        .replace("idle_timeout_ms = 30000", "idle_timeout_ms = 120000");
    let daemon = Daemon::start(&dir.0, &text);
    let client = client_config(&cert, &[&rustls::version::TLS13]);
    let mut f = Faults {
        daemon,
        socket,
        control: control_path,
        sim,
        client,
        rt,
    };

    // 256 connections streaming for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let moved = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            f.rt.spawn(stream_until_stopped(
                f.daemon.listen,
                Arc::clone(&f.client),
                i as u64 * 1_000_003,
                Arc::clone(&stop),
                Arc::clone(&moved),
            ))
        })
        .collect();
    wait_until(
        "every connection streaming",
        Duration::from_secs(120),
        || f.daemon.metric("tlsaccel_connections_active") == CONNECTIONS as u64,
    );
    let flowing = |f: &Faults, what: &str| {
        let before = moved.load(Ordering::Relaxed);
        wait_until(
            &format!("data flowing {what}"),
            Duration::from_secs(60),
            || moved.load(Ordering::Relaxed) > before + (CONNECTIONS * CHUNK) as u64,
        );
        let _ = f;
    };
    flowing(&f, "before the faults");
    assert!(f.device_records() > 0, "records go through the device");

    let mut report = Vec::new();
    let job_timeout = Duration::from_secs(2);

    // A stall past the job timeout: jobs time out; their queues are replaced, or, when a
    // key-table job on the admin queue timed out too, the device is reset.
    let replaced = f.daemon.metric("tlsaccel_device_queues_replaced_total");
    let recovered = f
        .daemon
        .metric("tlsaccel_device_recoveries_total{result=\"ok\"}");
    let lost = f.daemon.metric("tlsaccel_device_lost_total");
    control(&f.control, "stall");
    // Held past the job timeout: until the daemon has given up on a stalled queue (replaced
    // it) or on the device (an admin job timed out too, and it was marked lost).
    wait_until("the stall noticed", job_timeout * 10, || {
        f.daemon.metric("tlsaccel_device_queues_replaced_total") > replaced
            || f.daemon.metric("tlsaccel_device_lost_total") > lost
    });
    let since = Instant::now();
    control(&f.control, "resume");
    report.push((
        "stall past the job timeout",
        f.back_in_use("a stall", since),
    ));
    assert!(
        f.daemon.metric("tlsaccel_device_queues_replaced_total") > replaced
            || f.daemon
                .metric("tlsaccel_device_recoveries_total{result=\"ok\"}")
                > recovered,
        "the stalled queues were neither replaced nor the device reset"
    );
    flowing(&f, "after a stall");

    // A lost completion: one job times out, its queue is replaced.
    let since = Instant::now();
    control(&f.control, "drop-completion");
    report.push((
        "a lost completion",
        f.back_in_use("a lost completion", since),
    ));
    flowing(&f, "after a lost completion");

    // A tag check that fails on the device although the record is good: the CPU opens it,
    // and the connection goes on (the next new connection's first open meets the fault).
    let refused = f
        .daemon
        .metric("tlsaccel_record_device_refused_good_records_total");
    let since = Instant::now();
    control(&f.control, "corrupt-open-tag");
    report.push((
        "a corrupted tag on open",
        f.back_in_use("a corrupted tag", since),
    ));
    assert!(
        f.daemon
            .metric("tlsaccel_record_device_refused_good_records_total")
            > refused,
        "the record the device refused was not opened on the CPU"
    );
    flowing(&f, "after a corrupted tag");

    // A DMA fault: that direction moves to the CPU.
    let since = Instant::now();
    control(&f.control, "dma-fault");
    report.push(("a DMA fault", f.back_in_use("a DMA fault", since)));
    flowing(&f, "after a DMA fault");

    // FATAL: the device is lost, reset and self-checked.
    let lost = f.daemon.metric("tlsaccel_device_lost_total");
    let since = Instant::now();
    control(&f.control, "fatal");
    wait_until("FATAL noticed", Duration::from_secs(10), || {
        f.daemon.metric("tlsaccel_device_lost_total") > lost
    });
    report.push(("FATAL", f.back_in_use("FATAL", since)));
    flowing(&f, "after FATAL");

    // The device resets itself.
    let lost = f.daemon.metric("tlsaccel_device_lost_total");
    let since = Instant::now();
    control(&f.control, "reset");
    wait_until("the reset noticed", Duration::from_secs(10), || {
        f.daemon.metric("tlsaccel_device_lost_total") > lost
    });
    report.push(("a device reset", f.back_in_use("a device reset", since)));
    flowing(&f, "after a device reset");

    // The simulator process killed, and started again at the same socket.
    let lost = f.daemon.metric("tlsaccel_device_lost_total");
    let since = Instant::now();
    f.sim.kill().expect("kill the simulator");
    let _ = f.sim.wait();
    wait_until("the dead process noticed", Duration::from_secs(10), || {
        f.daemon.metric("tlsaccel_device_lost_total") > lost
    });
    f.sim = start_simulator(&f.socket, &f.control);
    report.push((
        "the simulator killed and started again",
        f.back_in_use("a restart", since),
    ));
    flowing(&f, "after a restart");

    stop.store(true, Ordering::Relaxed);
    let results: Vec<_> = f.rt.block_on(async {
        let mut out = Vec::new();
        for task in tasks {
            out.push(task.await.expect("connection task"));
        }
        out
    });
    let failures: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let bytes: u64 = results.iter().filter_map(|r| r.as_ref().ok()).sum();
    println!("faults under load: {CONNECTIONS} connections, {bytes} bytes echoed and compared");
    for (fault, took) in &report {
        println!("  {fault:<40} device back in use for new connections after {took:?}");
    }
    assert!(
        failures.is_empty(),
        "{} of {CONNECTIONS} connections failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    println!(
        "  record fallbacks {}, queues replaced {}, device lost {} times, recovered {} times",
        f.daemon.metric("tlsaccel_record_device_fallbacks_total"),
        f.daemon.metric("tlsaccel_device_queues_replaced_total"),
        f.daemon.metric("tlsaccel_device_lost_total"),
        f.daemon
            .metric("tlsaccel_device_recoveries_total{result=\"ok\"}"),
    );
    let _ = f.sim.kill();
    let _ = f.sim.wait();
}
