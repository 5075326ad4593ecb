//! Seals 16 KiB TLS 1.3 records on the device for a few seconds, for profilers.

fn main() {
    let device = tlsaccel_benches::open_device();
    let mut seal = tlsaccel_benches::DeviceSeal::new(&device, 16384, 64);
    let rounds = 2400;
    let run = seal.run(rounds);
    let bytes = (rounds * 64 * 16384) as f64;
    println!("{:.0} MB/s", bytes / run.wall.as_secs_f64() / 1e6);
}
