//! NOP ring throughput at 1, 8, 32 and 128 jobs per doorbell, with the ring kept busy.
//! Criterion reports jobs/s; the summary after it reports driver-side CPU per job (time in
//! submit and in polls that found completions) next to wall time per job, from the same run.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tlsaccel_benches::{bench_queue, nop_jobs, open_device, pipeline, RunTime};

const BATCHES: [usize; 4] = [1, 8, 32, 128];

fn ring(c: &mut Criterion) {
    let device = open_device();
    let mut pair = bench_queue(&device, 1024);
    let jobs = nop_jobs();
    let mut group = c.benchmark_group("nop_ring");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_millis(500));
    group.throughput(Throughput::Elements(jobs.len() as u64));
    for batch in BATCHES {
        group.bench_function(format!("batch_{batch}"), |b| {
            b.iter_custom(|iters| pipeline(&mut pair, &jobs, batch, iters).wall)
        });
    }
    group.finish();

    if tlsaccel_benches::smoke_mode() {
        return;
    }
    println!("\nnop_ring summary (same process, 200k jobs per batch size)");
    println!(
        "{:>6} {:>14} {:>14} {:>16}",
        "batch", "jobs/s", "wall ns/job", "driver ns/job"
    );
    for batch in BATCHES {
        let rounds = 200;
        let RunTime { wall, driver } = pipeline(&mut pair, &jobs, batch, rounds);
        let total = (jobs.len() as u64 * rounds) as f64;
        println!(
            "{:>6} {:>14.0} {:>14.1} {:>16.1}",
            batch,
            total / wall.as_secs_f64(),
            wall.as_nanos() as f64 / total,
            driver.as_nanos() as f64 / total
        );
    }
}

criterion_group!(benches, ring);
criterion_main!(benches);
