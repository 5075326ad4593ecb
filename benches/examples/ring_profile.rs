//! Runs the NOP ring at batch 32 for a few seconds, for profilers (`perf record`).

fn main() {
    let device = tlsaccel_benches::open_device();
    let mut pair = tlsaccel_benches::bench_queue(&device, 1024);
    let jobs: Vec<_> = (0..1024)
        .map(|i| tlsaccel_driver::Job {
            user_data: i,
            op: tlsaccel_driver::JobOp::Nop,
        })
        .collect();
    let run = tlsaccel_benches::pipeline(&mut pair, &jobs, 32, 50_000);
    let total = 1024.0 * 50_000.0;
    println!(
        "{:.1} M jobs/s, driver {:.1} ns/job",
        total / run.wall.as_secs_f64() / 1e6,
        run.driver.as_nanos() as f64 / total
    );
}
