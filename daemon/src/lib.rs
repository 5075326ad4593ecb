//! tlsaccel: TLS termination with record and handshake crypto offloaded to a tlsaccel device.
//!
//! This crate holds the command-line tool's logic; `main.rs` only parses arguments.
//! * [`config`]: the TOML configuration, strictly validated.
//! * [`devices`]: which devices this host can reach.
//! * [`handshake`]: a rustls `CryptoProvider` with signatures and key exchange on the device.
//! * [`selftest`]: known-answer tests of a device.
//! * [`simserver`]: the simulator as a separate process behind QEMU's ivshmem device.
//! * [`serve`]: `tlsaccel serve`, the daemon: listeners, the connection pipeline, reload and
//!   drain; with [`tls`] (handshakes), [`record`] and [`batch`] (the record layer on the device
//!   or the CPU), [`pool`] (backends), [`admin`] and [`metrics`] (the admin endpoint) and
//!   [`demo`] (`serve --demo`).

#![forbid(unsafe_code)]

pub mod admin;
pub mod batch;
pub mod cli;
pub mod config;
pub mod demo;
pub mod devices;
pub mod handshake;
pub mod metrics;
pub mod offload;
pub mod pool;
pub mod record;
pub mod selftest;
pub mod serve;
pub mod simcontrol;
pub mod simserver;
pub mod tls;
