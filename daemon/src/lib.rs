//! tlsaccel: TLS termination with record and handshake crypto offloaded to a tlsaccel device.
//!
//! This crate holds the command-line tool's logic; `main.rs` only parses arguments.
//! * [`config`]: the TOML configuration, strictly validated.
//! * [`devices`]: which devices this host can reach.
//! * [`handshake`]: a rustls `CryptoProvider` with signatures and key exchange on the device.
//! * [`selftest`]: known-answer tests of a device.
//! * [`simserver`]: the simulator as a separate process behind QEMU's ivshmem device.
//! * [`serve`]: `tlsaccel serve`, the daemon's lifecycle (start, reload, drain); with
//!   [`listen`] (accept), [`connection`] (one connection from accept to close), [`tls`]
//!   (handshakes), [`route`] and [`pool`] (backends), [`session`] (the sans-I/O record
//!   session) and [`pump`] (its I/O), [`record`] and [`batch`] (record crypto on the device or
//!   the CPU), [`offload`] (device queues and recovery), [`admin`] and [`metrics`] (the admin
//!   endpoint) and [`demo`] (`serve --demo`).

// One `unsafe` call in the whole crate: pausing a handshake's fiber on a device job
// (`handshake::PkeEngine::run_on_fiber`), allowed there with its safety argument.
#![deny(unsafe_code)]

pub mod acl;
pub mod admin;
pub mod admission;
pub mod audit;
pub mod batch;
pub mod buffers;
pub mod cache;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod demo;
pub mod devices;
pub mod handshake;
pub mod http;
pub mod identity;
pub mod inspect;
pub mod listen;
pub mod metrics;
pub mod offload;
pub mod pool;
pub mod proxy_protocol;
pub mod pump;
pub mod record;
pub mod route;
pub mod selftest;
pub mod serve;
pub mod session;
pub mod simcontrol;
pub mod simserver;
pub mod tls;
pub mod upstream;
