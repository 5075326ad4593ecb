//! The device in another process (vfio-user) next to the in-process simulator, in one run:
//! NOP ring throughput at 32 jobs per doorbell and 16 KiB TLS 1.3 record sealing. The
//! benchmark binary starts a copy of itself as the vfio-user server.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use tlsaccel_benches::{bench_queue, nop_jobs, pipeline, smoke_mode, DeviceSeal};
use tlsaccel_driver::Device;

const SERVE_ENV: &str = "TLSACCEL_BENCH_SERVE";

fn engines() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .saturating_sub(1)
        .max(1)
}

/// Runs as the vfio-user server when started that way by `start_server`.
fn serve_if_asked() -> bool {
    let Some(path) = std::env::var_os(SERVE_ENV) else {
        return false;
    };
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    let config = tlsaccel_sim::DeviceConfig {
        engines: engines(),
        ..Default::default()
    };
    let server = tlsaccel::simserver::VfioUserServer::bind(&PathBuf::from(path), config, 2)
        .expect("the benchmark server binds");
    let _ = server.run();
    true
}

fn start_server() -> (Child, PathBuf) {
    let path = std::env::temp_dir().join(format!("tlsaccel-bench-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let child = Command::new(std::env::current_exe().expect("own path"))
        .env(SERVE_ENV, &path)
        .spawn()
        .expect("the server process starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(Instant::now() < deadline, "the server did not come up");
        std::thread::sleep(Duration::from_millis(10));
    }
    (child, path)
}

fn open(address: &str) -> Arc<Device> {
    Device::open(address).expect("benchmark device opens")
}

fn process(c: &mut Criterion, vfio_user: &str) {
    let in_process = open(&format!("sim:engines={}", engines()));
    let remote = open(vfio_user);
    let jobs = nop_jobs();
    let mut group = c.benchmark_group("process");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_millis(500));
    group.sample_size(20);
    for (name, device) in [("in_process", &in_process), ("vfio_user", &remote)] {
        let mut pair = bench_queue(device, 1024);
        group.throughput(Throughput::Elements(jobs.len() as u64));
        group.bench_function(format!("nop_batch32/{name}"), |b| {
            b.iter_custom(|iters| pipeline(&mut pair, &jobs, 32, iters).wall)
        });
        drop(pair);
        let mut seal = DeviceSeal::new(device, 16384, 64);
        group.throughput(Throughput::Bytes(16384 * 64));
        group.bench_function(format!("seal_16k/{name}"), |b| {
            b.iter_custom(|iters| seal.run(iters).wall)
        });
    }
    group.finish();
    if smoke_mode() {
        return;
    }

    println!("\nprocess summary (same run; vfio-user = simulator in another process)");
    println!(
        "{:>24} {:>14} {:>14} {:>10}",
        "workload", "in-process", "vfio-user", "ratio"
    );
    let nops = |device: &Arc<Device>| {
        let mut pair = bench_queue(device, 1024);
        let rounds = 100;
        let run = pipeline(&mut pair, &jobs, 32, rounds);
        (jobs.len() as u64 * rounds) as f64 / run.wall.as_secs_f64()
    };
    let (a, b) = (nops(&in_process), nops(&remote));
    println!(
        "{:>24} {:>12.0}/s {:>12.0}/s {:>10.3}",
        "NOP, 32 per doorbell",
        a,
        b,
        b / a
    );
    let seals = |device: &Arc<Device>| {
        let mut seal = DeviceSeal::new(device, 16384, 64);
        let rounds = 300;
        let run = seal.run(rounds);
        (rounds * 64 * 16384) as f64 / run.wall.as_secs_f64() / 1e6
    };
    let (a, b) = (seals(&in_process), seals(&remote));
    println!(
        "{:>24} {:>10.0} MB/s {:>10.0} MB/s {:>10.3}",
        "TLS 1.3 seal, 16 KiB",
        a,
        b,
        b / a
    );
}

fn main() {
    if serve_if_asked() {
        return;
    }
    let (mut child, path) = start_server();
    let mut criterion = Criterion::default().configure_from_args();
    process(&mut criterion, &format!("vfio-user:{}", path.display()));
    criterion.final_summary();
    let _ = child.kill();
    let _ = child.wait();
}
