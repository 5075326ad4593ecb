use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TLSACCEL_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match tlsaccel::cli::run(tlsaccel::cli::Cli::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("tlsaccel: {error:#}");
            ExitCode::from(2)
        }
    }
}
