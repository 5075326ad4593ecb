//! `tlsaccel-compare`: tlsaccel next to nginx and HAProxy on this machine, in one run.
//!
//! ```sh
//! cargo run --release -p tlsaccel-benches --bin tlsaccel-compare -- [--quick] [--http] [--out DIR]
//!     [--systems NAME,...] [--workloads ID,...]
//! ```
//!
//! Installs nginx (stream module) and HAProxy from Debian's packages when missing (as root),
//! starts every system, drives them with its own load generator, and writes `report.md`,
//! `results.json` and SVG plots to the output folder (default `results/compare-DATE`).
//! `--systems` and `--workloads` narrow a run down for a focused measurement, e.g.
//! `--systems tlsaccel-cpu --workloads idle-connections`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tlsaccel_benches::compare::{self, systems::Kind, Settings, Workload};

#[derive(Debug, Parser)]
#[command(about = "tlsaccel side by side with nginx and HAProxy")]
struct Args {
    /// A few minutes instead of a long run (CI smoke: it must run, not meet targets).
    #[arg(long)]
    quick: bool,
    /// Output folder.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Systems to run, comma-separated (tlsaccel-device, tlsaccel-cpu, nginx, haproxy,
    /// haproxy-plain); default all.
    #[arg(long, value_delimiter = ',')]
    systems: Option<Vec<String>>,
    /// Workloads to run, comma-separated ids (full-handshakes-ecdsa, resumed-handshakes,
    /// download-1conn, download-64conn, upload-1conn, upload-64conn, small-requests,
    /// small-requests-h2, connection-per-request, full-handshakes-rsa, idle-connections);
    /// default all but small-requests-h2, or with --http small-requests, small-requests-h2
    /// and connection-per-request.
    #[arg(long, value_delimiter = ',')]
    workloads: Option<Vec<String>>,
    /// Every proxy in HTTP mode: tlsaccel `mode = "http"`, nginx's `http` proxy with
    /// upstream keep-alive, HAProxy `mode http` with connection reuse (the plaintext floor
    /// stays TCP).
    #[arg(long)]
    http: bool,
    /// Repetitions of every workload (default: 1 quick, 3 full).
    #[arg(long)]
    repeat: Option<usize>,
    /// Seconds per run (default: 1 quick, 5 full).
    #[arg(long)]
    seconds: Option<f64>,
    /// Worker threads or processes per system.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Idle connections held open for the memory figure (default: 500 quick, 10000 full).
    #[arg(long)]
    idle: Option<usize>,
    /// Only write the report again from an earlier run's results.json.
    #[arg(long, value_name = "RESULTS_JSON")]
    report_from: Option<PathBuf>,
}

/// The allocator `tlsaccel` ships with (daemon/src/main.rs): this binary runs as the
/// daemon under test.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Re-executed as `tlsaccel` (the daemon and the simulator under test).
    if std::env::var_os(compare::EXEC_ENV).is_some() {
        tlsaccel::cli::init_logging();
        let cli = <tlsaccel::cli::Cli as Parser>::parse();
        return match tlsaccel::cli::run(cli) {
            Ok(code) => code,
            Err(error) => {
                eprintln!("tlsaccel: {error:#}");
                ExitCode::from(2)
            }
        };
    }
    let args = Args::parse();
    if let Some(json) = &args.report_from {
        return match compare::report_from(json) {
            Ok(report) => {
                println!("tlsaccel-compare: report in {}", report.display());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("tlsaccel-compare: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    let systems = match chosen("system", &args.systems, Kind::parse, &Kind::ALL, Kind::name) {
        Ok(systems) => systems,
        Err(code) => return code,
    };
    let workloads = match chosen(
        "workload",
        &args.workloads,
        Workload::parse,
        &Workload::ALL,
        Workload::id,
    ) {
        Ok(_) if args.workloads.is_none() && args.http => Workload::HTTP.to_vec(),
        // HTTP/2 requests mean something only where the proxy parses HTTP.
        Ok(_) if args.workloads.is_none() => Workload::ALL
            .into_iter()
            .filter(|&w| w != Workload::SmallRequestsH2)
            .collect(),
        Ok(workloads) => workloads,
        Err(code) => return code,
    };
    raise_file_limit();
    let settings = Settings {
        quick: args.quick,
        repetitions: args.repeat.unwrap_or(if args.quick { 1 } else { 3 }),
        run_seconds: args.seconds.unwrap_or(if args.quick { 1.0 } else { 5.0 }),
        workers: args.workers,
        handshake_concurrency: if args.quick { 8 } else { 32 },
        idle_connections: args.idle.unwrap_or(if args.quick { 500 } else { 10_000 }),
        systems,
        http: args.http,
        workloads,
    };
    let out = args.out.unwrap_or_else(|| {
        let stamp = std::process::Command::new("date")
            .args(["-u", "+%Y%m%d-%H%M%S"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        PathBuf::from(format!("results/compare-{stamp}"))
    });
    match compare::run(settings, &out) {
        Ok(report) => {
            println!("tlsaccel-compare: report in {}", report.display());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("tlsaccel-compare: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The items named in `names`, in the order given, or `all` when the option was not given;
/// an unknown name is an error that lists the known ones (exit status 2).
fn chosen<T: Copy + PartialEq>(
    what: &str,
    names: &Option<Vec<String>>,
    parse: fn(&str) -> Option<T>,
    all: &[T],
    name_of: fn(T) -> &'static str,
) -> Result<Vec<T>, ExitCode> {
    let Some(names) = names else {
        return Ok(all.to_vec());
    };
    let mut items = Vec::new();
    for name in names {
        let Some(item) = parse(name) else {
            let known: Vec<&str> = all.iter().map(|&i| name_of(i)).collect();
            eprintln!(
                "tlsaccel-compare: unknown {what} {name:?} (known: {})",
                known.join(", ")
            );
            return Err(ExitCode::from(2));
        };
        if !items.contains(&item) {
            items.push(item);
        }
    }
    Ok(items)
}

/// Thousands of connections, each a socket in the load generator, the backend and (twice)
/// the proxy: lift the open-file limit as far as allowed, for this process and the systems
/// it starts.
fn raise_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let wanted = 400_000;
    let current = getrlimit(Resource::Nofile);
    let raised = Rlimit {
        current: Some(wanted),
        maximum: Some(wanted),
    };
    if setrlimit(Resource::Nofile, raised).is_err() {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: current.maximum,
                maximum: current.maximum,
            },
        );
    }
}
