use std::process::ExitCode;

use clap::Parser;

/// mimalloc, not glibc's malloc: an idle connection's state is many small allocations made
/// while handshakes (paused on fibers, resumed on other threads) allocate and free
/// temporaries; glibc's per-thread arenas left 0.35 KiB of fragments per connection between
/// them (docs/daemon.md, "Memory"), mimalloc's size-class pages do not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
