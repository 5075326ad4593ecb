//! The device conformance suite (`tests/src/conformance.rs`), unchanged, on the RTL: every
//! case that needs no engine the RTL lacks (ChaCha20-Poly1305, TLS 1.2 records and the
//! public-key engines are simulator-only; the cases ask the CAPABILITIES register and use
//! what it offers) and no fault the RTL's test bench cannot inject.
//!
//! The RTL has no fault-injection window (CAPABILITIES.MODEL_FAULTS is clear, as on a card):
//! `ModelFaults` reaches the test bench instead (`RtlTransport::testbench_faults`), which
//! stalls the queue engine (a hold input built into the model only), swallows a completion
//! write and drives the fatal input. So the quiesce cases (a queue disabled, a mapping removed
//! under a held job), backpressure, a lost completion and a reset under held jobs run here;
//! the cases that need the device itself to corrupt a tag or invent a completion skip, and
//! must say the test bench cannot inject the fault.

use std::sync::Arc;

use tlsaccel_driver::abi::Capabilities;
use tlsaccel_driver::{Device, DeviceOptions, Transport};
use tlsaccel_rtl::RtlTransport;
use tlsaccel_tests::conformance::{Outcome, CASES};

/// The cases that run on the RTL. The others need a fault only the reference model shows
/// ([`BENCH_CANNOT_INJECT`]) or a simulator-only engine.
const ON_RTL: [&str; 16] = [
    "identity_and_capabilities",
    "nop_jobs_complete_with_their_cookies",
    "wycheproof_aes_gcm",
    "tls13_records_interoperate_with_rustls",
    "ring_wraps_many_times",
    "records_of_one_key_keep_submission_order",
    "full_ring_applies_backpressure",
    "concurrent_submitters_on_several_queues",
    "out_of_order_completions_reach_their_callers",
    "hostile_descriptors_get_error_completions",
    "key_slots_are_released",
    "async_queue_with_coalesced_interrupts",
    "lost_completion_times_out",
    "reset_fails_jobs_in_flight",
    "disabled_queue_is_held_until_the_engine_lets_go",
    "unmap_under_a_held_job_faults_it",
];

/// The cases whose faults the test bench cannot inject from outside the device: a bogus
/// completion and an oversize result length, a corrupted tag.
const BENCH_CANNOT_INJECT: [&str; 2] = [
    "bogus_completions_are_detected",
    "corrupted_tag_fails_authentication",
];

#[test]
fn conformance_cases_pass_on_the_rtl() {
    let transport: Arc<dyn Transport> =
        Arc::new(RtlTransport::new().expect("the RTL model is built (verilator installed)"));
    let device = Device::with_transport(transport, DeviceOptions::default()).expect("open");
    // The faults come from the bench: the device still says it has no window, as a card.
    assert!(!device
        .info()
        .capabilities
        .contains(Capabilities::MODEL_FAULTS));
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

    // The cases the bench cannot serve skip, and say why.
    let mut skipped = 0;
    for (name, case) in CASES
        .iter()
        .filter(|(name, _)| BENCH_CANNOT_INJECT.contains(name))
    {
        match case(&device) {
            Ok(Outcome::Skipped(why)) if why.contains("test bench cannot inject") => {
                println!("{name}: skipped ({why})")
            }
            Ok(other) => {
                panic!("{name}: {other:?}, expected a skip saying the test bench cannot inject")
            }
            Err(error) => panic!("{name}: {error:#}"),
        }
        skipped += 1;
    }
    assert_eq!(
        skipped,
        BENCH_CANNOT_INJECT.len(),
        "every listed case exists in the suite"
    );
}
