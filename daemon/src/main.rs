use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    tlsaccel::cli::init_logging();
    match tlsaccel::cli::run(tlsaccel::cli::Cli::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("tlsaccel: {error:#}");
            ExitCode::from(2)
        }
    }
}
