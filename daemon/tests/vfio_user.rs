//! The device conformance suite against the simulator in a separate process, over vfio-user,
//! and what happens when that process dies with jobs in flight.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant};

use tlsaccel_driver::abi::AeadAlgorithm;
use tlsaccel_driver::{Device, Job, JobError, JobOp, KeyMaterial, QueueConfig};

fn spawn_simulator(path: &Path) -> std::io::Result<Child> {
    let _ = std::fs::remove_file(path);
    let child = Command::new(env!("CARGO_BIN_EXE_tlsaccel"))
        .args(["sim", "--vfio-user"])
        .arg(path)
        .args([
            "--exit-with-parent",
            "--clients",
            "4",
            "--queues",
            "8",
            "--engines",
            "2",
        ])
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(std::io::Error::other(
                "the simulator did not create its socket",
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(child)
}

/// One simulator process for the whole test binary. It is started from a thread that lives as
/// long as the process, because the parent-death signal fires when the starting thread ends.
fn shared_simulator() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("tlsaccel-vu-{}.sock", std::process::id()));
        let (ready, started) = mpsc::channel();
        let socket = path.clone();
        std::thread::spawn(move || {
            let child = spawn_simulator(&socket);
            let _ = ready.send(child.as_ref().map(|_| ()).map_err(|e| e.to_string()));
            loop {
                std::thread::park();
            }
        });
        started
            .recv()
            .expect("the spawning thread reports")
            .expect("the simulator starts");
        path
    })
}

fn open() -> anyhow::Result<Arc<Device>> {
    Ok(Device::open(&format!(
        "vfio-user:{}",
        shared_simulator().display()
    ))?)
}

tlsaccel_tests::conformance_suite!(open());

#[test]
fn killing_the_simulator_fails_jobs_in_flight_and_a_new_one_at_the_same_socket_takes_over() {
    let path = std::env::temp_dir().join(format!("tlsaccel-vu-kill-{}.sock", std::process::id()));
    let mut child = spawn_simulator(&path).expect("simulator starts");
    let device = Device::open(&format!("vfio-user:{}", path.display())).expect("device opens");
    let mut pair = device
        .queue(QueueConfig {
            size: 256,
            ..QueueConfig::default()
        })
        .expect("queue");
    let key = KeyMaterial::raw(AeadAlgorithm::AES_256_GCM, &[5; 32]).expect("key");
    let slot = device.load_key(&key).expect("key loads");
    let size = 64 * 1024;
    let input = device.pool().alloc(size).expect("dma");
    let output = device.pool().alloc(size + 16).expect("dma");
    let job = |i: u64| Job {
        user_data: i,
        op: JobOp::AeadSeal {
            slot: slot.slot_ref(),
            nonce: [i as u8; 12],
            aad: None,
            src: input.whole(),
            dst: output.whole(),
        },
    };

    // Keep the ring full, and kill the simulator once 2,000 jobs have gone in (the ring is
    // busy then): whatever was submitted after it died, or was still queued, can only end as
    // DeviceLost.
    let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("a child has a pid");
    let mut killed = false;
    let mut results = Vec::new();
    let mut submitted = 0u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !device.is_lost() {
        assert!(
            Instant::now() < deadline,
            "the device was never reported lost"
        );
        pair.poll(|done| results.push(done));
        let batch: Vec<Job> = (submitted..submitted + u64::from(pair.free_slots()))
            .map(job)
            .collect();
        match pair.submit(&batch) {
            Ok(n) => submitted += n as u64,
            Err(_) => break,
        }
        if !killed && submitted >= 2000 {
            rustix::process::kill_process(pid, rustix::process::Signal::KILL)
                .expect("kill delivered");
            killed = true;
        }
    }
    assert!(killed, "the device was lost before the test killed it");
    child.wait().expect("reap");
    while (results.len() as u64) < submitted {
        assert!(
            Instant::now() < deadline,
            "hung: {} of {submitted} jobs answered",
            results.len()
        );
        pair.poll(|done| results.push(done));
    }
    let mut tags: Vec<u64> = results.iter().map(|c| c.user_data).collect();
    tags.sort_unstable();
    assert_eq!(
        tags,
        (0..submitted).collect::<Vec<_>>(),
        "every job is answered exactly once"
    );
    let lost = results
        .iter()
        .filter(|c| c.result == Err(JobError::DeviceLost))
        .count();
    assert!(lost > 0, "no job failed with DeviceLost");
    assert!(
        results
            .iter()
            .all(|c| c.result.is_ok() || c.result == Err(JobError::DeviceLost)),
        "jobs fail only with DeviceLost"
    );
    assert!(
        pair.submit(&[job(submitted)]).is_err(),
        "a dead queue takes no jobs"
    );
    assert!(pair.held() > 0, "jobs of a lost device stay held");
    assert!(device.recover().is_err(), "nothing to reconnect to yet");

    // A simulator started again at the same socket takes over: the transport reconnects,
    // hands it the pool's memory, and the device works again with fresh queues and slots.
    let mut again = spawn_simulator(&path).expect("simulator starts again");
    let recovery = Instant::now();
    device.recover().expect("the device comes back");
    let took = recovery.elapsed();
    assert!(!device.is_lost());
    pair.poll(|_| {});
    assert_eq!(pair.held(), 0, "a reset releases what the old queue held");
    drop(pair);
    drop(slot);
    let mut fresh = device.queue(QueueConfig::default()).expect("a new queue");
    let slot = device.load_key(&key).expect("a new key loads");
    let plain = device.pool().alloc(100).expect("dma");
    plain.write(0, &[0x33; 100]).expect("write");
    let sealed = device.pool().alloc(116).expect("dma");
    let opened = device.pool().alloc(100).expect("dma");
    let mut results = Vec::new();
    let ops = [
        JobOp::AeadSeal {
            slot: slot.slot_ref(),
            nonce: [9; 12],
            aad: None,
            src: plain.whole(),
            dst: sealed.whole(),
        },
        JobOp::AeadOpen {
            slot: slot.slot_ref(),
            nonce: [9; 12],
            aad: None,
            src: sealed.whole(),
            dst: opened.whole(),
        },
    ];
    for (i, op) in ops.into_iter().enumerate() {
        fresh
            .run(
                &[Job {
                    user_data: i as u64,
                    op,
                }],
                Duration::from_secs(5),
                |done| results.push(done.result),
            )
            .expect("runs");
    }
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(opened.to_vec(0, 100).expect("read"), vec![0x33; 100]);
    println!("vfio-user device back in service {took:?} after the new process started");
    drop((slot, fresh));
    let _ = again.kill();
    let _ = again.wait();
}

#[test]
fn several_processes_share_one_simulator() {
    let address = format!("vfio-user:{}", shared_simulator().display());
    let runs: Vec<_> = (0..3)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_tlsaccel"))
                .args(["selftest", "--device", &address])
                .output()
                .expect("selftest starts")
        })
        .collect();
    for run in runs {
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(run.status.success(), "selftest failed:\n{stdout}");
        assert!(stdout.contains("28 passed, 0 failed"), "{stdout}");
    }
}

#[test]
fn concurrent_processes_each_get_a_device_function() {
    let address = format!("vfio-user:{}", shared_simulator().display());
    let children: Vec<_> = (0..3)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_tlsaccel"))
                .args(["selftest", "--device", &address])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("selftest starts")
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().expect("selftest finishes");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn crate_defects_are_worked_around() {
    use tlsaccel_driver::vfio_user::VfioUserTransport;
    use tlsaccel_driver::Transport;
    let transport = VfioUserTransport::connect(shared_simulator()).expect("connects");
    // The server declares itself resettable; the crate's client reports the opposite.
    assert!(
        transport.resettable(),
        "the inverted reset flag was not corrected"
    );
    // Reads the server cannot serve come back as all-ones, not as an error reply the client
    // would misread: the connection stays in step.
    assert_eq!(transport.read32(0x7fff_fff0), u32::MAX);
    assert_eq!(transport.read64(0x7fff_fff0), u64::MAX);
    assert_eq!(
        transport.read32(tlsaccel_driver::abi::regs::MAGIC),
        tlsaccel_driver::abi::DEVICE_MAGIC
    );
    assert!(!transport.is_lost());
}
