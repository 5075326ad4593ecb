//! The `tlsaccel` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tlsaccel_driver::Device;

/// TLS termination with crypto offloaded to a tlsaccel accelerator.
#[derive(Debug, Parser)]
#[command(name = "tlsaccel", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the devices this host can reach: the simulator and functions bound to vfio-pci.
    Devices {
        /// Root of sysfs (for inspecting another system's tree).
        #[arg(long, default_value = "/sys")]
        sysfs: PathBuf,
        /// Root of /dev.
        #[arg(long, default_value = "/dev")]
        dev: PathBuf,
    },
    /// Run known-answer tests on a device and print a table; exits non-zero on any failure.
    Selftest {
        /// Device address: `sim`, or `sim:queues=N,engines=N,key-slots=N`.
        #[arg(long, default_value = "sim")]
        device: String,
    },
}

/// Runs a parsed command.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Devices { sysfs, dev } => {
            print!("{}", crate::devices::report(&sysfs, &dev));
            Ok(ExitCode::SUCCESS)
        }
        Command::Selftest { device } => {
            let opened = Device::open(&device)
                .map_err(|e| anyhow::anyhow!("cannot open device {device:?}: {e}"))?;
            let checks = crate::selftest::run(&opened)?;
            print!("{}", crate::selftest::table(&checks));
            let failed = checks.iter().filter(|c| c.result.is_err()).count();
            println!("{} passed, {} failed", checks.len() - failed, failed);
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
