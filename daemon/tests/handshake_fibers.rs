//! Handshakes waiting for the device hold no thread: `tlsaccel serve` with the simulator in
//! another process, stalled through its control socket, while many clients start handshakes.
//! Each handshake pauses on its fiber (`tlsaccel_handshakes_waiting_for_device`) and the
//! daemon's thread count stays where it was; once the device resumes every handshake
//! completes with its signature and key exchange done by the device.

mod support;

use std::time::Duration;

use support::{
    client_config, config, control, echo_server, runtime, start_simulator, wait_until, Daemon,
    Scratch,
};

const WAITING: u64 = 32;

fn threads(daemon: &Daemon) -> usize {
    std::fs::read_dir(format!("/proc/{}/task", daemon.child.id()))
        .expect("the daemon's threads")
        .count()
}

#[test]
fn handshakes_waiting_for_the_device_hold_no_thread() {
    let rt = runtime();
    let (backend, _echo) = rt.block_on(echo_server(None));
    let dir = Scratch::new("fibers");
    let cert = support::write_identity(&dir.0);
    let socket = dir.0.join("sim.sock");
    let control_path = dir.0.join("control.sock");
    let mut sim = start_simulator(&socket, &control_path);
    let text = config(&[backend], "", "").replace(
        "address = \"sim\"",
        &format!("address = \"vfio-user:{}\"", socket.display()),
    );
    let daemon = Daemon::start(&dir.0, &text);
    let client = client_config(&cert, &[&rustls::version::TLS13]);
    let device_ops = |daemon: &Daemon| {
        daemon.metric("tlsaccel_handshake_operations_total{op=\"sign\",engine=\"device\"}")
            + daemon.metric(
                "tlsaccel_handshake_operations_total{op=\"key_exchange\",engine=\"device\"}",
            )
    };

    // One handshake first: the device signs and exchanges keys, and the runtime has made the
    // threads it keeps.
    rt.block_on(async {
        let stream = support::connect(daemon.listen, &client).await;
        support::echo_transfer(stream, 4096, 1).await
    });
    assert!(
        device_ops(&daemon) >= 2,
        "the first handshake used the device"
    );
    let before = threads(&daemon);

    control(&control_path, "stall");
    let handshakes: Vec<_> = (0..WAITING)
        .map(|i| {
            let client = std::sync::Arc::clone(&client);
            let listen = daemon.listen;
            rt.spawn(async move {
                let stream = support::connect(listen, &client).await;
                support::echo_transfer(stream, 4096, 100 + i).await
            })
        })
        .collect();
    wait_until(
        "every handshake paused at the device",
        Duration::from_secs(30),
        || daemon.metric("tlsaccel_handshakes_waiting_for_device") == WAITING,
    );
    let during = threads(&daemon);
    assert!(
        during < before + 4,
        "{WAITING} handshakes waiting for the device took threads: {before} before, {during} now"
    );

    let ops = device_ops(&daemon);
    control(&control_path, "resume");
    for handshake in handshakes {
        let (sent, back) = rt.block_on(handshake).expect("handshake task");
        assert_eq!(sent, back, "a connection whose handshake waited");
    }
    assert_eq!(daemon.metric("tlsaccel_handshakes_waiting_for_device"), 0);
    assert!(
        device_ops(&daemon) >= ops + WAITING,
        "the waiting handshakes finished on the device"
    );
    drop(daemon);
    let _ = sim.kill();
    let _ = sim.wait();
}
