//! `tlsaccel-compare`: tlsaccel side by side with nginx and HAProxy on this machine, in one
//! run, with a Markdown report and SVG plots. `docs/benchmarks.md` explains what is measured
//! and how to read it.

pub mod backend;
pub mod crosscheck;
pub mod load;
pub mod measure;
pub mod report;
pub mod systems;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use self::load::Outcome;
use self::systems::{Identity, Kind, Running};

/// Set in the environment of a re-executed harness that should act as `tlsaccel`.
pub const EXEC_ENV: &str = "TLSACCEL_COMPARE_EXEC";

/// Connections each system is configured to take: every connection costs the proxy two
/// sockets and this harness two (client and backend), within the open-file limit.
pub fn max_connections() -> u64 {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(1 << 20);
    (limit.saturating_sub(500) / 2).max(100)
}

/// A workload of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Workload {
    FullHandshakesEcdsa,
    FullHandshakesRsa,
    ResumedHandshakes,
    Download1,
    Download64,
    Upload1,
    Upload64,
    SmallRequests,
    IdleConnections,
}

impl Workload {
    /// Run on the ECDSA identity, systems started once (idle connections apart, on freshly
    /// started systems).
    pub const ECDSA: [Workload; 7] = [
        Workload::FullHandshakesEcdsa,
        Workload::ResumedHandshakes,
        Workload::Download1,
        Workload::Download64,
        Workload::Upload1,
        Workload::Upload64,
        Workload::SmallRequests,
    ];

    /// Short name (file names, JSON).
    pub fn id(self) -> &'static str {
        match self {
            Workload::FullHandshakesEcdsa => "full-handshakes-ecdsa",
            Workload::FullHandshakesRsa => "full-handshakes-rsa",
            Workload::ResumedHandshakes => "resumed-handshakes",
            Workload::Download1 => "download-1conn",
            Workload::Download64 => "download-64conn",
            Workload::Upload1 => "upload-1conn",
            Workload::Upload64 => "upload-64conn",
            Workload::SmallRequests => "small-requests",
            Workload::IdleConnections => "idle-connections",
        }
    }

    /// What it is, for the report.
    pub fn title(self) -> &'static str {
        match self {
            Workload::FullHandshakesEcdsa => "Full TLS 1.3 handshakes, ECDSA P-256 + X25519",
            Workload::FullHandshakesRsa => "Full TLS 1.3 handshakes, RSA-2048 + X25519",
            Workload::ResumedHandshakes => "Resumed TLS 1.3 handshakes (each + one 100 B request)",
            Workload::Download1 => "Bulk download, 1 connection, 1 MiB responses",
            Workload::Download64 => "Bulk download, 64 connections, 1 MiB responses",
            Workload::Upload1 => "Bulk upload, 1 connection, 1 MiB requests",
            Workload::Upload64 => "Bulk upload, 64 connections, 1 MiB requests",
            Workload::SmallRequests => "Small keep-alive requests (100 B), 64 connections",
            Workload::IdleConnections => "Idle TLS connections held open",
        }
    }

    /// The unit of its headline figure.
    pub fn unit(self) -> &'static str {
        match self {
            Workload::FullHandshakesEcdsa
            | Workload::FullHandshakesRsa
            | Workload::ResumedHandshakes => "handshakes/s",
            Workload::SmallRequests => "requests/s",
            Workload::IdleConnections => "KiB RSS per connection",
            _ => "MB/s",
        }
    }

    /// True when a higher figure is better.
    pub fn higher_is_better(self) -> bool {
        self != Workload::IdleConnections
    }
}

/// One measured run of one workload on one system.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    /// The headline figure, in the workload's unit.
    pub value: f64,
    pub operations: u64,
    pub bytes: u64,
    pub errors: u64,
    pub seconds: f64,
    /// CPU seconds of the proxy's processes during the run.
    pub proxy_cpu: f64,
    /// CPU seconds of the simulator process during the run (device path only).
    pub simulator_cpu: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Resumed handshakes among the operations.
    pub resumed: Option<u64>,
}

/// All runs of one workload on one system.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Series {
    pub workload: Workload,
    pub system: Kind,
    pub samples: Vec<Sample>,
}

impl Series {
    fn values(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self.samples.iter().map(|s| s.value).collect();
        v.sort_by(f64::total_cmp);
        v
    }

    /// Median, minimum and maximum of the headline figure.
    pub fn spread(&self) -> (f64, f64, f64) {
        let v = self.values();
        if v.is_empty() {
            return (f64::NAN, f64::NAN, f64::NAN);
        }
        (v[v.len() / 2], v[0], v[v.len() - 1])
    }

    /// Median of a per-sample figure.
    pub fn median_of(&self, f: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
        let mut v: Vec<f64> = self.samples.iter().filter_map(f).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(v[v.len() / 2])
    }
}

/// How long and how hard.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub quick: bool,
    pub repetitions: usize,
    pub run_seconds: f64,
    pub workers: usize,
    pub handshake_concurrency: usize,
    pub idle_connections: usize,
    pub systems: Vec<Kind>,
}

/// Everything a run found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub settings: Settings,
    pub started: String,
    pub machine: String,
    pub versions: Vec<(Kind, String)>,
    pub series: Vec<Series>,
    /// Peak RSS (KiB) of each proxy while it held the idle connections (first repetition).
    pub peak_rss_kib: Vec<(Kind, u64)>,
    /// `h2load` requests/s and `openssl s_time` connections/s, per system.
    #[serde(default)]
    pub crosscheck: Vec<(Kind, Option<f64>, Option<f64>)>,
}

/// Writes the report again from a `results.json` (into the folder that holds it).
pub fn report_from(results_json: &Path) -> anyhow::Result<PathBuf> {
    let results: Results = serde_json::from_str(&std::fs::read_to_string(results_json)?)?;
    report::write(&results, results_json.parent().unwrap_or(Path::new(".")))
}

/// Runs the comparison and writes the report under `out`.
pub fn run(settings: Settings, out: &Path) -> anyhow::Result<PathBuf> {
    systems::install_packages(&settings.systems)?;
    let mut settings = settings;
    let fits = max_connections() as usize;
    if settings.idle_connections > fits {
        eprintln!(
            "compare: {} idle connections do not fit the open-file limit; holding {fits}",
            settings.idle_connections
        );
        settings.idle_connections = fits;
    }
    std::fs::create_dir_all(out)?;
    // Configuration files name certificates by absolute path.
    let out = &std::fs::canonicalize(out)?;
    let work = out.join("work");
    std::fs::create_dir_all(&work)?;
    let exe = std::env::current_exe()?;
    let backend = backend::start()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let started = humantime_now();
    let mut series: Vec<Series> = Vec::new();
    let mut peaks = Vec::new();
    let mut crosscheck = Vec::new();
    let duration = Duration::from_secs_f64(settings.run_seconds);
    for rsa in [false, true] {
        let identity = Identity::generate(&work, rsa)?;
        let workloads: &[Workload] = if rsa {
            &[Workload::FullHandshakesRsa]
        } else {
            &Workload::ECDSA
        };
        let mut running = Vec::new();
        for &kind in &settings.systems {
            eprintln!("compare: starting {} ({})", kind.name(), identity.name);
            running.push(systems::start(
                kind,
                &identity,
                backend,
                settings.workers,
                &work,
                &exe,
            )?);
        }
        let full = load::client_config(&identity.der, false);
        let resume = load::client_config(&identity.der, true);
        // Warm up every system (page faults, session caches, lazily made state).
        for system in &running {
            runtime.block_on(load::small_requests(
                system.listen,
                std::sync::Arc::clone(&full),
                4,
                Duration::from_millis(300),
            ));
        }
        for &workload in workloads {
            for repetition in 0..settings.repetitions {
                // Systems take turns within a repetition, so drift hits them alike.
                for system in &running {
                    eprintln!(
                        "compare: {} on {} ({}/{})",
                        workload.id(),
                        system.kind.name(),
                        repetition + 1,
                        settings.repetitions
                    );
                    let sample = measure_one(
                        &runtime, system, workload, &settings, duration, &full, &resume,
                    );
                    match series
                        .iter_mut()
                        .find(|s| s.workload == workload && s.system == system.kind)
                    {
                        Some(s) => s.samples.push(sample),
                        None => series.push(Series {
                            workload,
                            system: system.kind,
                            samples: vec![sample],
                        }),
                    }
                }
            }
        }
        if !rsa {
            for system in &running {
                eprintln!(
                    "compare: h2load and openssl s_time on {}",
                    system.kind.name()
                );
                let requests = if settings.quick { 5_000 } else { 100_000 };
                let rps = crosscheck::h2load(system.listen, requests);
                let cps = crosscheck::s_time(system.listen, duration);
                crosscheck.push((system.kind, rps, cps));
            }
        }
    }
    // Memory per idle connection, on systems started afresh for each repetition: memory a
    // system's allocator kept from earlier workloads would otherwise hide the growth.
    let identity = Identity::generate(&work, false)?;
    let full = load::client_config(&identity.der, false);
    let resume = load::client_config(&identity.der, true);
    for repetition in 0..settings.repetitions {
        for &kind in &settings.systems {
            eprintln!(
                "compare: idle-connections on {} ({}/{})",
                kind.name(),
                repetition + 1,
                settings.repetitions
            );
            let system = systems::start(kind, &identity, backend, settings.workers, &work, &exe)?;
            runtime.block_on(load::small_requests(
                system.listen,
                std::sync::Arc::clone(&full),
                4,
                Duration::from_millis(300),
            ));
            let workload = Workload::IdleConnections;
            let sample = measure_one(
                &runtime, &system, workload, &settings, duration, &full, &resume,
            );
            match series
                .iter_mut()
                .find(|s| s.workload == workload && s.system == kind)
            {
                Some(s) => s.samples.push(sample),
                None => series.push(Series {
                    workload,
                    system: kind,
                    samples: vec![sample],
                }),
            }
            if repetition == 0 {
                peaks.push((kind, system.proxy_usage().peak_rss_kib));
            }
        }
    }
    let results = Results {
        versions: settings
            .systems
            .iter()
            .map(|&k| (k, systems::version(k)))
            .collect(),
        settings,
        started,
        machine: machine(),
        series,
        peak_rss_kib: peaks,
        crosscheck,
    };
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    let report = report::write(&results, out)?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(report)
}

fn measure_one(
    runtime: &tokio::runtime::Runtime,
    system: &Running,
    workload: Workload,
    settings: &Settings,
    duration: Duration,
    full: &std::sync::Arc<rustls::ClientConfig>,
    resume: &std::sync::Arc<rustls::ClientConfig>,
) -> Sample {
    use std::sync::Arc;
    let before = system.proxy_usage();
    let sim_before = system.simulator_usage();
    let address = system.listen;
    let concurrency = settings.handshake_concurrency;
    let (outcome, value, held): (Outcome, Option<f64>, Option<usize>) = runtime.block_on(async {
        match workload {
            Workload::FullHandshakesEcdsa | Workload::FullHandshakesRsa => {
                let o =
                    load::full_handshakes(address, Arc::clone(full), concurrency, duration).await;
                (o, None, None)
            }
            Workload::ResumedHandshakes => {
                let o =
                    load::resumed_handshakes(address, Arc::clone(resume), concurrency, duration)
                        .await;
                (o, None, None)
            }
            Workload::Download1 | Workload::Download64 | Workload::Upload1 | Workload::Upload64 => {
                let connections = if matches!(workload, Workload::Download1 | Workload::Upload1) {
                    1
                } else {
                    64
                };
                let direction = if matches!(workload, Workload::Download1 | Workload::Download64) {
                    load::Direction::Download
                } else {
                    load::Direction::Upload
                };
                let o =
                    load::bulk(address, Arc::clone(full), connections, duration, direction).await;
                let mbps = o.megabytes_per_second();
                (o, Some(mbps), None)
            }
            Workload::SmallRequests => {
                let o = load::small_requests(address, Arc::clone(full), 64, duration).await;
                (o, None, None)
            }
            Workload::IdleConnections => {
                let start = std::time::Instant::now();
                let open =
                    load::idle_connections(address, Arc::clone(full), settings.idle_connections)
                        .await;
                // Let the proxy finish setting up each connection's backend side.
                tokio::time::sleep(Duration::from_millis(500)).await;
                let held = open.len();
                let outcome = Outcome {
                    operations: held as u64,
                    elapsed: start.elapsed(),
                    ..Outcome::default()
                };
                let during = system.proxy_usage();
                drop(open);
                tokio::time::sleep(Duration::from_millis(500)).await;
                let per = (during.rss_kib as f64 - before.rss_kib as f64) / held.max(1) as f64;
                (outcome, Some(per), Some(held))
            }
        }
    });
    let after = system.proxy_usage();
    let sim_after = system.simulator_usage();
    let value = value.unwrap_or_else(|| {
        if workload == Workload::ResumedHandshakes {
            // Only the handshakes that did resume.
            outcome.resumed as f64 / outcome.elapsed.as_secs_f64().max(1e-9)
        } else {
            outcome.rate()
        }
    });
    let _ = held;
    Sample {
        value,
        operations: outcome.operations,
        bytes: outcome.bytes,
        errors: outcome.errors,
        seconds: outcome.elapsed.as_secs_f64(),
        proxy_cpu: (after.cpu.saturating_sub(before.cpu)).as_secs_f64(),
        simulator_cpu: match (sim_before, sim_after) {
            (Some(b), Some(a)) => Some(a.cpu.saturating_sub(b.cpu).as_secs_f64()),
            _ => None,
        },
        p50_ms: (!outcome.latencies.is_empty()).then(|| outcome.latency(0.50).as_secs_f64() * 1e3),
        p99_ms: (!outcome.latencies.is_empty()).then(|| outcome.latency(0.99).as_secs_f64() * 1e3),
        resumed: (workload == Workload::ResumedHandshakes).then_some(outcome.resumed),
    }
}

fn humantime_now() -> String {
    let output = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output();
    output
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(String::new(), |kib| format!(", {} GiB", kib / (1 << 20)));
    format!("{model}, {cores} cores{memory}")
}
