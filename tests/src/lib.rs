//! Integration suites that span crates.
//!
//! * [`conformance`]: the device conformance suite, one set of cases for every backend.
//! * [`peer`]: a real rustls client whose server side the device takes over after the
//!   handshake, the independent check of the device's record protection.
//! * [`wycheproof`]: the shared AEAD vectors.

pub mod conformance;
pub mod peer;
pub mod public_key;
pub mod wycheproof;
