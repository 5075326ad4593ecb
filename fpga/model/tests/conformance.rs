//! The device conformance suite (`tests/src/conformance.rs`), unchanged, on the RTL: the
//! cases that need only what the RTL has built so far (identity, heartbeat, rings of NOP
//! jobs, interrupts with coalescing under the async API). The rest join as the record
//! engine lands (fpga/README.md).

use std::sync::Arc;

use tlsaccel_driver::{Device, DeviceOptions, Transport};
use tlsaccel_rtl::RtlTransport;
use tlsaccel_tests::conformance::{Outcome, CASES};

/// The cases that run on the RTL today. (`full_ring_applies_backpressure` also uses only
/// NOPs, but holds the device through the simulator's fault injection: Skipped anywhere else.)
const ON_RTL: [&str; 3] = [
    "identity_and_capabilities",
    "nop_jobs_complete_with_their_cookies",
    "async_queue_with_coalesced_interrupts",
];

#[test]
fn ring_conformance_cases_pass_on_the_rtl() {
    let transport: Arc<dyn Transport> =
        Arc::new(RtlTransport::new().expect("the RTL model is built (verilator installed)"));
    let device = Device::with_transport(transport, DeviceOptions::default()).expect("open");
    let mut ran = 0;
    for (name, case) in CASES.iter().filter(|(name, _)| ON_RTL.contains(name)) {
        match case(&device) {
            Ok(Outcome::Passed(detail)) => println!("{name}: passed ({detail})"),
            Ok(other) => panic!("{name}: {other:?}"),
            Err(error) => panic!("{name}: {error:#}"),
        }
        ran += 1;
    }
    assert_eq!(ran, ON_RTL.len(), "every listed case exists in the suite");
}
