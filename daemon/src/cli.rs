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
    /// Terminate TLS and proxy to backend pools, as the configuration file says. SIGTERM or
    /// Ctrl-C drains and exits; SIGHUP reloads the file.
    Serve {
        /// The TOML configuration (see examples/tlsaccel.toml).
        #[arg(long, required_unless_present = "demo", conflicts_with = "demo")]
        config: Option<PathBuf>,
        /// Run with nothing configured: simulated device, self-signed certificate for
        /// localhost, a built-in HTTP backend. Try `curl -k https://localhost:8443/`.
        #[arg(long)]
        demo: bool,
        /// Where the demo listens for TLS.
        #[arg(long, default_value = "127.0.0.1:8443", requires = "demo")]
        listen: String,
        /// Where the demo's admin endpoint listens.
        #[arg(long, default_value = "127.0.0.1:9901", requires = "demo")]
        admin: String,
    },
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
        /// Microseconds an engine polls for doorbells after work before it sleeps (0: sleep
        /// at once; spinning buys latency with CPU the device's host may need).
        #[arg(long, default_value_t = 50)]
        idle_spin_us: u64,
        /// Also listen for fault-injection commands on this socket (the reference model's
        /// control socket, device-spec §9: `stall`, `resume`, `drop-completion`,
        /// `corrupt-tag`, `dma-fault`, `oversize-length`, `fatal`, `reset`, one per line).
        #[arg(long)]
        control: Option<PathBuf>,
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
        Command::Serve {
            config,
            demo,
            listen,
            admin,
        } => serve(config, demo, &listen, &admin),
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
            idle_spin_us,
            control,
        } => {
            if exit_with_parent {
                rustix::process::set_parent_process_death_signal(Some(
                    rustix::process::Signal::KILL,
                ))?;
            }
            let config = tlsaccel_sim::DeviceConfig {
                queues,
                engines,
                idle_spin: std::time::Duration::from_micros(idle_spin_us),
                ..tlsaccel_sim::DeviceConfig::default()
            };
            let memory = memory_mib
                .checked_mul(1 << 20)
                .ok_or_else(|| anyhow::anyhow!("--memory-mib {memory_mib} is too large"))?;
            if let Some(path) = vfio_user {
                let server = crate::simserver::VfioUserServer::bind(&path, config, clients)?;
                if let Some(control) = &control {
                    crate::simcontrol::serve(control, server.functions())?;
                    eprintln!("tlsaccel sim: control socket on {}", control.display());
                }
                eprintln!(
                    "tlsaccel sim: vfio-user server on {}",
                    server.path().display()
                );
                server.run()?;
                return Ok(ExitCode::SUCCESS);
            }
            let path = ivshmem.ok_or_else(|| anyhow::anyhow!("give --ivshmem or --vfio-user"))?;
            let server = crate::simserver::IvshmemServer::bind(&path, memory, config)?;
            if let Some(control) = &control {
                crate::simcontrol::serve(control, server.functions())?;
                eprintln!("tlsaccel sim: control socket on {}", control.display());
            }
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

fn serve(
    config: Option<PathBuf>,
    demo: bool,
    listen: &str,
    admin: &str,
) -> anyhow::Result<ExitCode> {
    raise_file_limit();
    let preloaded = match &config {
        Some(file) => Some(crate::config::Config::load(file).map_err(|e| anyhow::anyhow!("{e}"))?),
        None => None,
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = preloaded.as_ref().and_then(|c| c.worker_threads.as_ref()) {
        builder.worker_threads(*threads.get_ref() as usize);
    }
    let runtime = builder
        .enable_all()
        .thread_name("tlsaccel-worker")
        .build()?;
    let result = runtime.block_on(async {
        let (file, loaded) = match (config, preloaded) {
            (Some(file), Some(loaded)) => (file, loaded),
            _ => {
                debug_assert!(demo);
                let backend = crate::demo::start_backend(([127, 0, 0, 1], 0).into()).await?;
                let dir =
                    std::env::temp_dir().join(format!("tlsaccel-demo-{}", std::process::id()));
                let file = crate::demo::write_config(&dir, listen, backend, admin)?;
                println!(
                    "tlsaccel: demo backend on http://{backend}/, configuration in {}",
                    file.display()
                );
                let loaded =
                    crate::config::Config::load(&file).map_err(|e| anyhow::anyhow!("{e}"))?;
                (file, loaded)
            }
        };
        let server = crate::serve::Server::start(loaded, Some(file)).await?;
        let state = server.shared.state();
        for (name, address) in &server.listeners {
            let plain = state.listeners.get(name).is_some_and(|l| l.tls.is_none());
            let scheme = if plain { "http" } else { "https" };
            println!("tlsaccel: listener {name} on {scheme}://{address}/");
        }
        if let Some(address) = server.admin {
            println!("tlsaccel: admin on http://{address}/metrics and /status");
        }
        match &server.shared.device {
            Some(device) => println!("tlsaccel: device {}", device.info().name),
            None => println!("tlsaccel: no device; all crypto on the CPU"),
        }
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut hangup = signal(SignalKind::hangup())?;
        loop {
            tokio::select! {
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
                _ = hangup.recv() => {
                    match server.reload() {
                        Ok(()) => println!("tlsaccel: configuration reloaded"),
                        Err(error) => println!("tlsaccel: reload refused: {error:#}"),
                    }
                }
            }
        }
        println!("tlsaccel: draining");
        let left = server.drain().await;
        println!("tlsaccel: stopped ({left} connections cut at the drain deadline)");
        anyhow::Ok(())
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result.map(|()| ExitCode::SUCCESS)
}

/// Each connection holds two sockets (client and backend): take the whole hard limit on
/// open files rather than the often much lower soft one.
fn raise_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(error) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(%error, "could not raise the open-file limit");
        }
    }
}
