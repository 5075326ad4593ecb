//! tlsaccel: TLS termination with record and handshake crypto offloaded to a tlsaccel device.
//!
//! This crate holds the command-line tool's logic; `main.rs` only parses arguments.
//! * [`config`]: the TOML configuration, strictly validated.
//! * [`devices`]: which devices this host can reach.
//! * [`handshake`]: a rustls `CryptoProvider` with signatures and key exchange on the device.
//! * [`selftest`]: known-answer tests of a device.
//! * [`simserver`]: the simulator as a separate process behind QEMU's ivshmem device.

#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod devices;
pub mod handshake;
pub mod selftest;
pub mod simserver;
