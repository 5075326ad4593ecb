//! The device conformance suite (`tests/src/conformance.rs`), unchanged, on the RTL: every
//! case that needs neither the simulator's fault injection nor an engine the RTL lacks
//! (ChaCha20-Poly1305, TLS 1.2 records and the public-key engines are simulator-only;
//! the cases ask the CAPABILITIES register and use what it offers).

use std::sync::Arc;

use tlsaccel_driver::{Device, DeviceOptions, Transport};
use tlsaccel_rtl::RtlTransport;
use tlsaccel_tests::conformance::{Outcome, CASES};

/// The cases that run on the RTL. The others hold or break the device through the
/// simulator's fault injection (Skipped anywhere else) or need a simulator-only engine.
const ON_RTL: [&str; 10] = [
    "identity_and_capabilities",
    "nop_jobs_complete_with_their_cookies",
    "wycheproof_aes_gcm",
    "tls13_records_interoperate_with_rustls",
    "ring_wraps_many_times",
    "concurrent_submitters_on_several_queues",
    "out_of_order_completions_reach_their_callers",
    "hostile_descriptors_get_error_completions",
    "key_slots_are_released",
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
