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
    /// Run the simulated device as a separate process: a vfio-user server (`--vfio-user PATH`,
    /// for `vfio-user:PATH` addresses) or an ivshmem server for QEMU's ivshmem-doorbell device
    /// (`--ivshmem PATH`; QEMU: `-chardev socket,path=PATH,id=ivs -device
    /// ivshmem-doorbell,chardev=ivs,vectors=QUEUES`). Runs until killed.
    Sim {
        /// Serve ivshmem on this socket (for QEMU's ivshmem-doorbell).
        #[arg(
            long,
            conflicts_with = "vfio_user",
            required_unless_present = "vfio_user"
        )]
        ivshmem: Option<PathBuf>,
        /// Serve vfio-user on this socket (for `vfio-user:PATH` device addresses).
        #[arg(long, alias = "socket")]
        vfio_user: Option<PathBuf>,
        /// vfio-user connections served at once, each with a device function of its own.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Exit when the process that started this one exits (for tests and benchmarks).
        #[arg(long)]
        exit_with_parent: bool,
        /// Shared memory in MiB (a power of two): the register mailbox, rings and buffers.
        #[arg(long, default_value_t = 64)]
        memory_mib: usize,
        /// Queue pairs (and interrupt vectors).
        #[arg(long, default_value_t = 8)]
        queues: u32,
        /// Engine threads.
        #[arg(long, default_value_t = 2)]
        engines: usize,
    },
    /// Check a configuration file (syntax, meaning, certificate files); exits non-zero with
    /// the file, line and key of the first problem.
    CheckConfig {
        /// The TOML file.
        file: PathBuf,
    },
    /// Run known-answer tests on a device and print a table; exits non-zero on any failure.
    Selftest {
        /// Device address: `sim`, or `sim:queues=N,engines=N,key-slots=N`.
        #[arg(long, default_value = "sim")]
        device: String,
    },
}

/// Logs to stderr, filtered by `TLSACCEL_LOG` (default `warn`).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TLSACCEL_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Runs a parsed command.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Devices { sysfs, dev } => {
            print!("{}", crate::devices::report(&sysfs, &dev));
            Ok(ExitCode::SUCCESS)
        }
        Command::Sim {
            ivshmem,
            vfio_user,
            clients,
            exit_with_parent,
            memory_mib,
            queues,
            engines,
        } => {
            if exit_with_parent {
                rustix::process::set_parent_process_death_signal(Some(
                    rustix::process::Signal::KILL,
                ))?;
            }
            let config = tlsaccel_sim::DeviceConfig {
                queues,
                engines,
                ..tlsaccel_sim::DeviceConfig::default()
            };
            let memory = memory_mib
                .checked_mul(1 << 20)
                .ok_or_else(|| anyhow::anyhow!("--memory-mib {memory_mib} is too large"))?;
            if let Some(path) = vfio_user {
                let server = crate::simserver::VfioUserServer::bind(&path, config, clients)?;
                eprintln!(
                    "tlsaccel sim: vfio-user server on {}",
                    server.path().display()
                );
                server.run()?;
                return Ok(ExitCode::SUCCESS);
            }
            let path = ivshmem.ok_or_else(|| anyhow::anyhow!("give --ivshmem or --vfio-user"))?;
            let server = crate::simserver::IvshmemServer::bind(&path, memory, config)?;
            eprintln!(
                "tlsaccel sim: ivshmem server on {}",
                server.path().display()
            );
            let stop = std::sync::atomic::AtomicBool::new(false);
            server.run(&stop)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { file } => match crate::config::Config::load(&file) {
            Ok(config) => {
                println!(
                    "{}: ok ({} listeners, {} pools, {} routes, {} devices)",
                    file.display(),
                    config.listeners.len(),
                    config.pools.len(),
                    config.routes.len(),
                    config.devices.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(error) => {
                eprintln!("{error}");
                Ok(ExitCode::FAILURE)
            }
        },
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
