//! `tlsaccel-compare`: tlsaccel side by side with nginx and HAProxy on this machine, in one
//! run, with a plaintext floor (HAProxy relaying without TLS), a Markdown report and SVG
//! plots. `docs/benchmarks.md` explains what is measured and how to read it.

pub mod backend;
pub mod crosscheck;
pub mod load;
pub mod measure;
pub mod report;
pub mod systems;

use std::path::{Path, PathBuf};
use std::sync::Arc;
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
    /// Small requests over HTTP/2 (HTTP-mode runs: `--http`).
    SmallRequestsH2,
    ConnectionPerRequest,
    IdleConnections,
}

impl Workload {
    /// Run on the ECDSA identity, systems started once (idle connections apart, on freshly
    /// started systems).
    pub const ECDSA: [Workload; 9] = [
        Workload::FullHandshakesEcdsa,
        Workload::ResumedHandshakes,
        Workload::Download1,
        Workload::Download64,
        Workload::Upload1,
        Workload::Upload64,
        Workload::SmallRequests,
        Workload::SmallRequestsH2,
        Workload::ConnectionPerRequest,
    ];

    /// Every workload, in the order a run measures them.
    pub const ALL: [Workload; 11] = [
        Workload::FullHandshakesEcdsa,
        Workload::ResumedHandshakes,
        Workload::Download1,
        Workload::Download64,
        Workload::Upload1,
        Workload::Upload64,
        Workload::SmallRequests,
        Workload::SmallRequestsH2,
        Workload::ConnectionPerRequest,
        Workload::FullHandshakesRsa,
        Workload::IdleConnections,
    ];

    /// Parses an id (see [`Workload::id`]).
    pub fn parse(id: &str) -> Option<Workload> {
        Workload::ALL.into_iter().find(|w| w.id() == id)
    }

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
            Workload::SmallRequestsH2 => "small-requests-h2",
            Workload::ConnectionPerRequest => "connection-per-request",
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
            Workload::SmallRequestsH2 => {
                "Small requests (100 B) over HTTP/2, 8 connections x 8 streams"
            }
            Workload::ConnectionPerRequest => {
                "Fresh TLS connection per small request (full handshake, one 100 B request, close)"
            }
            Workload::IdleConnections => "Idle TLS connections held open",
        }
    }

    /// The unit of its headline figure.
    pub fn unit(self) -> &'static str {
        match self {
            Workload::FullHandshakesEcdsa
            | Workload::FullHandshakesRsa
            | Workload::ResumedHandshakes => "handshakes/s",
            Workload::SmallRequests
            | Workload::SmallRequestsH2
            | Workload::ConnectionPerRequest => "requests/s",
            Workload::IdleConnections => "KiB RSS per connection",
            _ => "MB/s",
        }
    }

    /// True when a higher figure is better.
    pub fn higher_is_better(self) -> bool {
        self != Workload::IdleConnections
    }

    /// True for a bulk transfer row, whose CPU cost is per GB moved.
    pub fn is_bulk(self) -> bool {
        matches!(
            self,
            Workload::Download1 | Workload::Download64 | Workload::Upload1 | Workload::Upload64
        )
    }

    /// False for the rows that mean nothing without TLS (handshakes, TLS connections), which
    /// the plaintext floor does not run.
    pub fn runs_on(self, system: Kind) -> bool {
        if system == Kind::TlsaccelRedis {
            // It differs from tlsaccel-cpu only in where sessions are kept.
            return matches!(
                self,
                Workload::FullHandshakesEcdsa
                    | Workload::ResumedHandshakes
                    | Workload::ConnectionPerRequest
            );
        }
        if self == Workload::SmallRequestsH2 {
            // HTTP/2 by ALPN: TLS systems only (the backend speaks HTTP/1.1).
            return system.speaks_tls();
        }
        system.speaks_tls() || self.is_bulk() || self == Workload::SmallRequests
    }

    /// The workloads of an HTTP-mode run (`--http`), where every proxy parses requests.
    pub const HTTP: [Workload; 3] = [
        Workload::SmallRequests,
        Workload::SmallRequestsH2,
        Workload::ConnectionPerRequest,
    ];
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
    /// Every proxy in HTTP mode (`--http`): tlsaccel `mode = "http"`, nginx's `http`
    /// proxy with upstream keep-alive, HAProxy `mode http`; results from before the
    /// option are L4.
    #[serde(default)]
    pub http: bool,
    /// The workloads run (`--workloads`); results from before the option hold all of them.
    #[serde(default = "all_workloads")]
    pub workloads: Vec<Workload>,
}

fn all_workloads() -> Vec<Workload> {
    Workload::ALL.to_vec()
}

/// The client configurations of one identity: full handshakes only, and with resumption.
struct Clients {
    full: Arc<rustls::ClientConfig>,
    resume: Arc<rustls::ClientConfig>,
}

impl Clients {
    fn new(identity: &Identity) -> Self {
        Self {
            full: load::client_config(&identity.der, false),
            resume: load::client_config(&identity.der, true),
        }
    }

    /// How the keep-alive HTTP rows reach `system`: TLS without resumption, or plain TCP
    /// to the plaintext floor.
    fn http(&self, system: Kind) -> load::Client {
        if system.speaks_tls() {
            load::Client::Tls(Arc::clone(&self.full))
        } else {
            load::Client::Plain
        }
    }
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
    let store = if settings.systems.iter().any(|k| k.is_tlsaccel()) {
        Some(systems::ClusterStore::start(&work.join("redis"))?)
    } else {
        None
    };
    let harness = Harness {
        store,
        exe: std::env::current_exe()?,
        backend: backend::start()?,
        runtime: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?,
        work,
        settings: &settings,
    };
    let started = humantime_now();
    let mut series: Vec<Series> = Vec::new();
    let mut crosscheck = Vec::new();
    for rsa in [false, true] {
        let phase: &[Workload] = if rsa {
            &[Workload::FullHandshakesRsa]
        } else {
            &Workload::ECDSA
        };
        let workloads: Vec<Workload> = phase
            .iter()
            .copied()
            .filter(|w| settings.workloads.contains(w))
            .collect();
        if !workloads.is_empty() {
            harness.shared_phase(rsa, &workloads, &mut series, &mut crosscheck)?;
        }
    }
    let mut peaks = Vec::new();
    if settings.workloads.contains(&Workload::IdleConnections) {
        harness.idle_phase(&mut series, &mut peaks)?;
    }
    // The harness borrows the settings, which the results take; its runtime goes with it.
    let work = harness.work.clone();
    drop(harness);
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

/// What every phase of a run shares.
struct Harness<'a> {
    /// The Redis the tlsaccel systems share resumption through.
    store: Option<systems::ClusterStore>,
    /// This harness, which runs as `tlsaccel` when asked to.
    exe: PathBuf,
    backend: std::net::SocketAddr,
    runtime: tokio::runtime::Runtime,
    /// Configuration files, certificates and logs of the systems.
    work: PathBuf,
    settings: &'a Settings,
}

impl Harness<'_> {
    /// Starts every system that runs one of `workloads`.
    fn start_for(
        &self,
        identity: &Identity,
        workloads: &[Workload],
    ) -> anyhow::Result<Vec<Running>> {
        let mut running = Vec::new();
        for &kind in &self.settings.systems {
            if workloads.iter().any(|w| w.runs_on(kind)) {
                eprintln!("compare: starting {} ({})", kind.name(), identity.name);
                running.push(self.start(kind, identity)?);
            }
        }
        Ok(running)
    }

    fn start(&self, kind: Kind, identity: &Identity) -> anyhow::Result<Running> {
        systems::start(
            kind,
            identity,
            self.backend,
            self.settings,
            &self.work,
            &self.exe,
            self.store.as_ref(),
        )
    }

    /// Warms a system up (page faults, session caches, lazily made state).
    fn warm_up(&self, system: &Running, clients: &Clients) {
        self.runtime.block_on(load::small_requests(
            system.listen,
            clients.http(system.kind),
            4,
            Duration::from_millis(300),
        ));
    }

    /// `workloads` on the ECDSA (`rsa` false) or RSA identity, on systems started once for
    /// all of them; then, on ECDSA, the cross-check with standard tools.
    fn shared_phase(
        &self,
        rsa: bool,
        workloads: &[Workload],
        series: &mut Vec<Series>,
        crosscheck: &mut Vec<(Kind, Option<f64>, Option<f64>)>,
    ) -> anyhow::Result<()> {
        let identity = Identity::generate(&self.work, rsa)?;
        let clients = Clients::new(&identity);
        let running = self.start_for(&identity, workloads)?;
        for system in &running {
            self.warm_up(system, &clients);
        }
        let repetitions = self.settings.repetitions;
        for &workload in workloads {
            for repetition in 0..repetitions {
                // Systems take turns within a repetition, so drift hits them alike.
                for system in running.iter().filter(|s| workload.runs_on(s.kind)) {
                    eprintln!(
                        "compare: {} on {} ({}/{repetitions})",
                        workload.id(),
                        system.kind.name(),
                        repetition + 1,
                    );
                    let sample = self.measure(system, workload, &clients);
                    record(series, workload, system.kind, sample);
                }
            }
        }
        if !rsa {
            for system in &running {
                if let Some(entry) = self.crosscheck(system, workloads) {
                    crosscheck.push(entry);
                }
            }
        }
        Ok(())
    }

    /// `h2load` when the small requests ran, `openssl s_time` when the full ECDSA
    /// handshakes did (on TLS systems); `None` when neither applies.
    fn crosscheck(
        &self,
        system: &Running,
        workloads: &[Workload],
    ) -> Option<(Kind, Option<f64>, Option<f64>)> {
        let kind = system.kind;
        let h2load = workloads.contains(&Workload::SmallRequests);
        let s_time = workloads.contains(&Workload::FullHandshakesEcdsa) && kind.speaks_tls();
        if !h2load && !s_time {
            return None;
        }
        eprintln!("compare: h2load and openssl s_time on {}", kind.name());
        let requests = if self.settings.quick { 5_000 } else { 100_000 };
        let duration = Duration::from_secs_f64(self.settings.run_seconds);
        let rps = h2load
            .then(|| crosscheck::h2load(system.listen, kind.speaks_tls(), requests))
            .flatten();
        let cps = s_time
            .then(|| crosscheck::s_time(system.listen, duration))
            .flatten();
        Some((kind, rps, cps))
    }

    /// Memory per idle connection, on systems started afresh for each repetition: memory a
    /// system's allocator kept from earlier workloads would otherwise hide the growth.
    fn idle_phase(
        &self,
        series: &mut Vec<Series>,
        peaks: &mut Vec<(Kind, u64)>,
    ) -> anyhow::Result<()> {
        let workload = Workload::IdleConnections;
        let identity = Identity::generate(&self.work, false)?;
        let clients = Clients::new(&identity);
        let repetitions = self.settings.repetitions;
        for repetition in 0..repetitions {
            for &kind in &self.settings.systems {
                if !workload.runs_on(kind) {
                    continue;
                }
                eprintln!(
                    "compare: {} on {} ({}/{repetitions})",
                    workload.id(),
                    kind.name(),
                    repetition + 1,
                );
                let system = self.start(kind, &identity)?;
                self.warm_up(&system, &clients);
                let sample = self.measure(&system, workload, &clients);
                record(series, workload, kind, sample);
                if repetition == 0 {
                    peaks.push((kind, system.proxy_usage().peak_rss_kib));
                }
            }
        }
        Ok(())
    }

    fn measure(&self, system: &Running, workload: Workload, clients: &Clients) -> Sample {
        measure_one(&self.runtime, system, workload, self.settings, clients)
    }
}

/// Adds `sample` to the series of `workload` on `system`.
fn record(series: &mut Vec<Series>, workload: Workload, system: Kind, sample: Sample) {
    match series
        .iter_mut()
        .find(|s| s.workload == workload && s.system == system)
    {
        Some(s) => s.samples.push(sample),
        None => series.push(Series {
            workload,
            system,
            samples: vec![sample],
        }),
    }
}

fn measure_one(
    runtime: &tokio::runtime::Runtime,
    system: &Running,
    workload: Workload,
    settings: &Settings,
    clients: &Clients,
) -> Sample {
    let Clients { full, resume } = clients;
    let duration = Duration::from_secs_f64(settings.run_seconds);
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
                let client = clients.http(system.kind);
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
                let o = load::bulk(address, client, connections, duration, direction).await;
                let mbps = o.megabytes_per_second();
                (o, Some(mbps), None)
            }
            Workload::SmallRequests => {
                let client = clients.http(system.kind);
                let o = load::small_requests(address, client, 64, duration).await;
                (o, None, None)
            }
            Workload::SmallRequestsH2 => {
                let o = load::small_requests_h2(address, Arc::clone(full), 8, 8, duration).await;
                (o, None, None)
            }
            Workload::ConnectionPerRequest => {
                let o =
                    load::connection_per_request(address, Arc::clone(full), concurrency, duration)
                        .await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_workload_has_an_id_that_parses_back_and_tls_rows_skip_the_floor() {
        for w in Workload::ALL {
            assert_eq!(Workload::parse(w.id()), Some(w));
            assert!(w.runs_on(Kind::TlsaccelCpu));
        }
        assert_eq!(Workload::parse("no-such-workload"), None);
        let floor: Vec<&str> = Workload::ALL
            .into_iter()
            .filter(|w| w.runs_on(Kind::PlainTcp))
            .map(Workload::id)
            .collect();
        assert_eq!(
            floor,
            [
                "download-1conn",
                "download-64conn",
                "upload-1conn",
                "upload-64conn",
                "small-requests"
            ]
        );
        // Every workload of a run is in ALL once, and the ECDSA ones first, in order.
        assert_eq!(Workload::ALL[..Workload::ECDSA.len()], Workload::ECDSA);
    }
}
