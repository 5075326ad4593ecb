//! The device conformance suite (`tests/src/conformance.rs`), unchanged, on the RTL: every
//! case that needs neither the reference model's fault injection (the RTL has no fault
//! window: its CAPABILITIES lacks MODEL_FAULTS, and those cases must say so and skip) nor an
//! engine the RTL lacks (ChaCha20-Poly1305, TLS 1.2 records and the public-key engines are
//! simulator-only; the cases ask the CAPABILITIES register and use what it offers).

use std::sync::Arc;

use tlsaccel_driver::{Device, DeviceOptions, Transport};
use tlsaccel_rtl::RtlTransport;
use tlsaccel_tests::conformance::{Outcome, CASES};

/// The cases that run on the RTL. The others hold or break the device through the model's
/// fault injection ([`NEED_MODEL_FAULTS`]) or need a simulator-only engine.
const ON_RTL: [&str; 11] = [
    "identity_and_capabilities",
    "nop_jobs_complete_with_their_cookies",
    "wycheproof_aes_gcm",
    "tls13_records_interoperate_with_rustls",
    "ring_wraps_many_times",
    "records_of_one_key_keep_submission_order",
    "concurrent_submitters_on_several_queues",
    "out_of_order_completions_reach_their_callers",
    "hostile_descriptors_get_error_completions",
    "key_slots_are_released",
    "async_queue_with_coalesced_interrupts",
];

/// The cases that need the model's fault-injection window, which the RTL does not have.
const NEED_MODEL_FAULTS: [&str; 7] = [
    "full_ring_applies_backpressure",
    "bogus_completions_are_detected",
    "corrupted_tag_fails_authentication",
    "lost_completion_times_out",
    "reset_fails_jobs_in_flight",
    "disabled_queue_is_held_until_the_engine_lets_go",
    "unmap_under_a_held_job_faults_it",
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

    // The fault-injection cases skip, and say it is for want of MODEL_FAULTS.
    let mut skipped = 0;
    for (name, case) in CASES
        .iter()
        .filter(|(name, _)| NEED_MODEL_FAULTS.contains(name))
    {
        match case(&device) {
            Ok(Outcome::Skipped(why)) if why.contains("MODEL_FAULTS") => {
                println!("{name}: skipped ({why})")
            }
            Ok(other) => panic!("{name}: {other:?}, expected a skip naming MODEL_FAULTS"),
            Err(error) => panic!("{name}: {error:#}"),
        }
        skipped += 1;
    }
    assert_eq!(
        skipped,
        NEED_MODEL_FAULTS.len(),
        "every listed case exists in the suite"
    );
}
