//! TLS 1.3 AES-128-GCM record sealing through the device next to the same construction on
//! the CPU (aws-lc-rs), at 64 B, 1 KiB and 16 KiB, in one run. Both paths cycle through the
//! same number of distinct plaintext and record buffers (`BUFFERS`), so they touch the same
//! amount of memory. The summary prints the ratio device/CPU.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tlsaccel_benches::{open_device, CpuSeal, DeviceSeal};

const SIZES: [usize; 3] = [64, 1024, 16384];
/// Records in flight on the device path, and distinct buffers on both paths.
const BUFFERS: usize = 64;

fn record_seal(c: &mut Criterion) {
    let device = open_device();
    let mut group = c.benchmark_group("record_seal");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_millis(500));
    for size in SIZES {
        let mut on_device = DeviceSeal::new(&device, size, BUFFERS);
        let mut on_cpu = CpuSeal::new(size, BUFFERS);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("device/{size}"), |b| {
            b.iter_custom(|iters| {
                let rounds = iters.div_ceil(BUFFERS as u64);
                let t = on_device.run(rounds).wall;
                t.mul_f64(iters as f64 / (rounds * BUFFERS as u64) as f64)
            })
        });
        group.bench_function(format!("cpu/{size}"), |b| b.iter(|| on_cpu.seal_next()));
    }
    group.finish();
    if tlsaccel_benches::smoke_mode() {
        return;
    }

    println!(
        "\nrecord_seal summary (same process; device = simulator engines on this machine's cores)"
    );
    println!(
        "{:>7} {:>12} {:>12} {:>14}",
        "bytes", "device MB/s", "cpu MB/s", "device/cpu"
    );
    for size in SIZES {
        let mut on_device = DeviceSeal::new(&device, size, BUFFERS);
        let mut on_cpu = CpuSeal::new(size, BUFFERS);
        let records = (64 * 1024 * 1024 / size.max(1024)).max(20_000) as u64;
        let rounds = records.div_ceil(BUFFERS as u64);
        let total = rounds * BUFFERS as u64;
        let device_time = on_device.run(rounds).wall;
        let device_rate = (total * size as u64) as f64 / device_time.as_secs_f64() / 1e6;
        let start = Instant::now();
        for _ in 0..total {
            std::hint::black_box(on_cpu.seal_next());
        }
        let cpu_rate = (total * size as u64) as f64 / start.elapsed().as_secs_f64() / 1e6;
        println!(
            "{:>7} {:>12.0} {:>12.0} {:>14.2}",
            size,
            device_rate,
            cpu_rate,
            device_rate / cpu_rate
        );
    }
}

criterion_group!(benches, record_seal);
criterion_main!(benches);
