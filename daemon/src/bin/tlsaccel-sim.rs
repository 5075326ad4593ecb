//! `tlsaccel-sim`: the simulated device as a server process.
//!
//! * `tlsaccel-sim serve --socket PATH` serves vfio-user (same as `tlsaccel sim --socket PATH`);
//! * `tlsaccel-sim ivshmem --socket PATH` serves QEMU's ivshmem-doorbell device.
//!
//! Every other option of `tlsaccel sim` is accepted after the socket.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    tlsaccel::cli::init_logging();
    let mut args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_default();
    let flag = match mode.as_str() {
        "serve" => "--vfio-user",
        "ivshmem" => "--ivshmem",
        _ => {
            eprintln!("usage: tlsaccel-sim serve --socket PATH [options of `tlsaccel sim`]");
            eprintln!("       tlsaccel-sim ivshmem --socket PATH [options of `tlsaccel sim`]");
            return ExitCode::from(2);
        }
    };
    for arg in args.iter_mut().skip(2) {
        if arg == "--socket" {
            *arg = flag.to_string();
        }
    }
    let mut cli = vec!["tlsaccel".to_string(), "sim".to_string()];
    cli.extend(args.into_iter().skip(2));
    match tlsaccel::cli::run(tlsaccel::cli::Cli::parse_from(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("tlsaccel-sim: {error:#}");
            ExitCode::from(2)
        }
    }
}
