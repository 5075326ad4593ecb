//! The report: `report.md` with every figure, its spread and the same-run ratios (against
//! nginx and HAProxy, and for host CPU against the plaintext floor), the targets, and one SVG
//! bar chart per workload.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::systems::Kind;
use super::{Results, Series, Workload};

fn find(results: &Results, workload: Workload, system: Kind) -> Option<&Series> {
    results
        .series
        .iter()
        .find(|s| s.workload == workload && s.system == system)
}

fn figure(value: f64) -> String {
    if !value.is_finite() {
        "–".into()
    } else if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// `x / y` when both are measured and `y` is positive.
fn quotient(x: Option<f64>, y: Option<f64>) -> Option<f64> {
    let (x, y) = (x?, y?);
    (x.is_finite() && y > 0.0).then_some(x / y)
}

/// A ratio as the tables show it, "–" when not measured.
fn shown(ratio: Option<f64>) -> String {
    ratio.map_or("–".into(), |r| format!("{r:.2}"))
}

/// The median headline figure of `workload` on `system`.
fn median(results: &Results, workload: Workload, system: Kind) -> Option<f64> {
    Some(find(results, workload, system)?.spread().0)
}

/// Median headline figure of `a` over `b`'s.
fn ratio(results: &Results, workload: Workload, a: Kind, b: Kind) -> Option<f64> {
    quotient(median(results, workload, a), median(results, workload, b))
}

/// The median proxy CPU cost (see [`cpu_cost`]) of `workload` on `system`.
fn proxy_cpu(results: &Results, workload: Workload, system: Kind) -> Option<f64> {
    cpu_cost(find(results, workload, system)?, false)
}

/// Proxy CPU cost of `a` over `b`'s.
fn cpu_ratio(results: &Results, workload: Workload, a: Kind, b: Kind) -> Option<f64> {
    quotient(
        proxy_cpu(results, workload, a),
        proxy_cpu(results, workload, b),
    )
}

/// The unit of a workload's CPU cost, `None` for rows that have none in the report.
fn cpu_unit(workload: Workload) -> Option<&'static str> {
    match workload {
        Workload::FullHandshakesEcdsa
        | Workload::FullHandshakesRsa
        | Workload::ResumedHandshakes => Some("CPU s/1k hs"),
        Workload::ConnectionPerRequest => Some("CPU s/1k req"),
        Workload::SmallRequests | Workload::SmallRequestsH2 | Workload::IdleConnections => None,
        _ => Some("CPU s/GB"),
    }
}

/// Proxy CPU seconds per GB moved (bulk), per 1,000 handshakes or per 1,000 requests on
/// fresh connections.
fn cpu_cost(series: &Series, simulator: bool) -> Option<f64> {
    let pick = |s: &super::Sample| {
        if simulator {
            s.simulator_cpu
        } else {
            Some(s.proxy_cpu)
        }
    };
    let workload = series.workload;
    cpu_unit(workload)?;
    series.median_of(|s| {
        let cpu = pick(s)?;
        if workload.is_bulk() {
            (s.bytes > 0).then(|| cpu / (s.bytes as f64 / 1e9))
        } else {
            (s.operations > 0).then(|| cpu / (s.operations as f64 / 1000.0))
        }
    })
}

/// Writes `report.md` and the plots into `out`; returns the report's path.
pub fn write(results: &Results, out: &Path) -> anyhow::Result<PathBuf> {
    let systems = &results.settings.systems;
    let mut md = String::new();
    let s = &results.settings;
    let _ = writeln!(md, "# tlsaccel compared with nginx and HAProxy\n");
    let _ = writeln!(
        md,
        "Run {} on {} ({} mode: {} repetition(s) of {:.0} s per workload and system).\n",
        results.started,
        results.machine,
        if s.quick { "quick" } else { "full" },
        s.repetitions,
        s.run_seconds
    );
    let _ = writeln!(md, "## Settings, the same for every system\n");
    let _ = writeln!(
        md,
        "* TLS 1.3 only, `TLS_AES_128_GCM_SHA256`, X25519; one certificate for `localhost` \
         (ECDSA P-256; RSA-2048 for the RSA handshake row), session resumption on (tickets; \
         tlsaccel's ticket keys shared through a Redis the harness runs, one key per epoch, as \
         in a cluster).\n\
         * {}\n\
         * {} worker thread(s) or process(es) each (`worker_processes`, `nbthread`, \
         `worker_threads`). tlsaccel-device's handshakes pause on fibers while the device works \
         (no extra threads); tlsaccel-cpu's run on the worker.\n\
         * `tlsaccel-device`: the simulated device in a separate process over vfio-user \
         (its CPU is reported apart); handshakes on the device, and each connection \
         direction from its first record of 1 KiB or more (`cpu_below_bytes = 1024`). \
         `tlsaccel-cpu`: no device.\n\
         * Load generator: this harness (tokio + rustls), {} concurrent handshake loops; \
         {} idle connections (on freshly started systems); everything shares the \
         machine's cores.\n\
         * Figures are medians over the repetitions, with min–max in brackets; ratios are \
         of medians from this run.",
        if results.settings.http {
            "HTTP termination (`--http`) to the same plain HTTP/1.1 backend (this harness, own \
             thread), HTTP/1.1 and HTTP/2 to the clients (ALPN), HTTP/1.1 kept alive to the \
             backend: nginx `http` with `proxy_pass` to an `upstream` with `keepalive 64`, \
             HAProxy `mode http` with `http-reuse always`, tlsaccel `serve` with `mode = \"http\"`."
        } else {
            "L4 TLS termination to the same plain HTTP/1.1 backend (this harness, own thread): \
             nginx `stream` with `ssl`, HAProxy `mode tcp` with `ssl`, tlsaccel `serve`."
        },
        s.workers,
        s.handshake_concurrency,
        s.idle_connections
    );
    if systems.contains(&Kind::TlsaccelRedis) {
        let _ = writeln!(
            md,
            "* `tlsaccel-redis`: `tlsaccel-cpu` with `tickets = false` and \
             `session_store = \"redis\"`: each resumption takes its session from Redis \
             (`GETDEL`, the handshake pausing on a fiber) and each handshake stores its new \
             sessions there; run on the handshake and connection-per-request rows only (\"–\" elsewhere)."
        );
    }
    if systems.contains(&Kind::PlainTcp) {
        let _ = writeln!(
            md,
            "* `haproxy-plain`: HAProxy `mode tcp` with no TLS at all, the same backend and \
             `nbthread`: the plaintext floor, run on the bulk and keep-alive request rows \
             only (\"–\" elsewhere)."
        );
    }
    if s.workloads.len() < Workload::ALL.len() {
        let ids: Vec<&str> = Workload::ALL
            .iter()
            .filter(|w| s.workloads.contains(w))
            .map(|w| w.id())
            .collect();
        let _ = writeln!(md, "* Workloads run: only {}.", ids.join(", "));
    }
    md.push('\n');
    let _ = writeln!(
        md,
        "Versions: {}\n",
        results
            .versions
            .iter()
            .map(|(k, v)| format!("{} ({v})", k.name()))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let _ = writeln!(md, "## Results\n");
    let mut header = String::from("| workload | unit |");
    let mut rule = String::from("|---|---|");
    for k in systems {
        let _ = write!(header, " {} |", k.name());
        rule.push_str("---|");
    }
    header.push_str(" device/nginx | device/HAProxy | cpu/nginx |");
    rule.push_str("---|---|---|");
    let _ = writeln!(md, "{header}\n{rule}");
    let workloads: Vec<Workload> = {
        let mut w: Vec<Workload> = Vec::new();
        for series in &results.series {
            if !w.contains(&series.workload) {
                w.push(series.workload);
            }
        }
        w
    };
    for &w in &workloads {
        let mut row = format!("| {} | {} |", w.title(), w.unit());
        for &k in systems {
            match find(results, w, k) {
                Some(series) => {
                    let (median, low, high) = series.spread();
                    let _ = write!(
                        row,
                        " {} ({}–{}) |",
                        figure(median),
                        figure(low),
                        figure(high)
                    );
                }
                None => row.push_str(" – |"),
            }
        }
        let _ = write!(
            row,
            " {} | {} | {} |",
            shown(ratio(results, w, Kind::TlsaccelDevice, Kind::Nginx)),
            shown(ratio(results, w, Kind::TlsaccelDevice, Kind::Haproxy)),
            shown(ratio(results, w, Kind::TlsaccelCpu, Kind::Nginx))
        );
        let _ = writeln!(md, "{row}");
    }
    latency_section(&mut md, results);
    if ran(results, Workload::ResumedHandshakes) {
        let _ = writeln!(
            md,
            "\nThe resumption row counts only handshakes that did resume; their share of all \
             handshakes in those runs:\n"
        );
        let _ = writeln!(
            md,
            "| system | resumed | proxy CPU per resumed connection ÷ per fresh one (both with one request) |\n|---|---|---|"
        );
        for &k in systems {
            if let Some(series) = find(results, Workload::ResumedHandshakes, k) {
                let share = series
                    .median_of(|s| Some(s.resumed? as f64 / (s.operations.max(1)) as f64 * 100.0));
                let _ = writeln!(
                    md,
                    "| {} | {}% | {} |",
                    k.name(),
                    share.map_or("–".into(), figure),
                    shown(resumed_over_full(results, k))
                );
            }
        }
    }

    if !results.crosscheck.is_empty() {
        let _ = writeln!(md, "\nCross-check with standard tools (one run each): `h2load --h1 -c 64` small requests (plain HTTP to `haproxy-plain`), and `openssl s_time -new` full handshakes one connection at a time.\n");
        let _ = writeln!(
            md,
            "| system | h2load requests/s | s_time connections/s |\n|---|---|---|"
        );
        for (kind, rps, cps) in &results.crosscheck {
            let _ = writeln!(
                md,
                "| {} | {} | {} |",
                kind.name(),
                rps.map_or("–".into(), figure),
                cps.map_or("–".into(), figure)
            );
        }
    }

    cpu_section(&mut md, results, &workloads);
    floor_section(&mut md, results, &workloads);

    let _ = writeln!(md, "\n## Memory\n");
    let _ = writeln!(
        md,
        "| system | peak RSS MiB (holding the idle connections) | RSS per idle TLS connection, KiB |\n|---|---|---|"
    );
    // The plaintext floor holds no TLS connections.
    for &k in systems.iter().filter(|k| k.speaks_tls()) {
        let peak = results
            .peak_rss_kib
            .iter()
            .find(|(kind, _)| *kind == k)
            .map_or("–".into(), |(_, kib)| figure(*kib as f64 / 1024.0));
        let idle = find(results, Workload::IdleConnections, k)
            .map_or("–".into(), |s| figure(s.spread().0));
        let _ = writeln!(md, "| {} | {peak} | {idle} |", k.name());
    }
    let _ = writeln!(
        md,
        "\nThe proxy's RSS holds both legs of each connection (client and backend). RSS \
         counts user-space memory only; the kernel's socket buffers come on top for every \
         system alike."
    );

    let _ = writeln!(md, "\n## Targets\n");
    let _ = writeln!(md, "| target | measured | met |\n|---|---|---|");
    for target in targets(results) {
        let (text, met) = match target.measured {
            Some(v) if v.is_finite() => (figure(v), if target.goal.met(v) { "yes" } else { "no" }),
            _ => ("–".into(), "not measured"),
        };
        let _ = writeln!(md, "| {} | {text} | {met} |", target.name);
    }

    let _ = writeln!(md, "\n## Plots\n");
    for &w in &workloads {
        let file = format!("{}.svg", w.id());
        plot(results, w, &out.join(&file))?;
        let _ = writeln!(md, "![{}]({file})", w.title());
    }
    let _ = writeln!(md, "\nRaw samples: `results.json`.");
    let path = out.join("report.md");
    std::fs::write(&path, md)?;
    Ok(path)
}

/// A system's proxy CPU per resumed connection over its CPU per fresh one, both carrying
/// one 100 B request (the resumption row over the connection-per-request row); the session
/// sharing seed reports about 50%.
fn resumed_over_full(results: &Results, system: Kind) -> Option<f64> {
    let cost = |w| find(results, w, system).and_then(|s| cpu_cost(s, false));
    quotient(
        cost(Workload::ResumedHandshakes),
        cost(Workload::ConnectionPerRequest),
    )
}

/// True when any system ran `workload`.
fn ran(results: &Results, workload: Workload) -> bool {
    results.series.iter().any(|s| s.workload == workload)
}

/// Request latencies: keep-alive requests, and requests on a fresh connection each (from
/// the connect to the response's last byte).
fn latency_section(md: &mut String, results: &Results) {
    let rows = [
        Workload::SmallRequests,
        Workload::SmallRequestsH2,
        Workload::ConnectionPerRequest,
    ];
    let rows: Vec<Workload> = rows.into_iter().filter(|&w| ran(results, w)).collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "\nRequest latency (median of the runs' percentiles); a fresh connection's runs from \
         the connect to the response's last byte:\n"
    );
    let mut header = String::from("| system |");
    let mut rule = String::from("|---|");
    for &w in &rows {
        let name = match w {
            Workload::SmallRequests => "keep-alive",
            Workload::SmallRequestsH2 => "HTTP/2",
            _ => "fresh connection",
        };
        let _ = write!(header, " {name} p50 ms | {name} p99 ms |");
        rule.push_str("---|---|");
    }
    let _ = writeln!(md, "{header}\n{rule}");
    for &k in &results.settings.systems {
        if rows.iter().all(|&w| find(results, w, k).is_none()) {
            continue;
        }
        let mut row = format!("| {} |", k.name());
        for &w in &rows {
            let (p50, p99) = find(results, w, k).map_or((None, None), |series| {
                (
                    series.median_of(|s| s.p50_ms),
                    series.median_of(|s| s.p99_ms),
                )
            });
            let _ = write!(
                row,
                " {} | {} |",
                p50.map_or("–".into(), figure),
                p99.map_or("–".into(), figure)
            );
        }
        let _ = writeln!(md, "{row}");
    }
}

/// Proxy CPU per GB, per 1,000 handshakes or per 1,000 fresh-connection requests, with the
/// simulator's own in brackets, and the device over nginx.
fn cpu_section(md: &mut String, results: &Results, workloads: &[Workload]) {
    let systems = &results.settings.systems;
    let _ = writeln!(md, "\n## CPU cost of the proxy process(es)\n");
    let _ = writeln!(
        md,
        "CPU seconds (user + system, all threads and worker processes) per GB moved, per \
         1,000 handshakes or per 1,000 requests on fresh connections; the simulator \
         process's own cost in brackets for `tlsaccel-device`.\n"
    );
    let mut header = String::from("| workload |");
    let mut rule = String::from("|---|");
    for k in systems {
        let _ = write!(header, " {} |", k.name());
        rule.push_str("---|");
    }
    header.push_str(" device/nginx |");
    rule.push_str("---|");
    let _ = writeln!(md, "{header}\n{rule}");
    for &w in workloads {
        let Some(unit) = cpu_unit(w) else {
            continue;
        };
        let mut row = format!("| {} ({unit}) |", w.title());
        for &k in systems {
            let Some(series) = find(results, w, k) else {
                row.push_str(" – |");
                continue;
            };
            let sim = cpu_cost(series, true)
                .map(|v| format!(" (sim {})", figure(v)))
                .unwrap_or_default();
            let proxy = cpu_cost(series, false);
            let _ = write!(row, " {}{sim} |", proxy.map_or("–".into(), figure));
        }
        let device_over_nginx = cpu_ratio(results, w, Kind::TlsaccelDevice, Kind::Nginx);
        let _ = writeln!(md, "{row} {} |", shown(device_over_nginx));
    }
}

/// Every TLS system's proxy CPU per GB over the plaintext floor's, for the bulk rows: 1.00
/// is a host that spends on a TLS connection what a plain relay does, crypto gone from it.
fn floor_section(md: &mut String, results: &Results, workloads: &[Workload]) {
    let bulk: Vec<Workload> = workloads
        .iter()
        .copied()
        .filter(|&w| w.is_bulk() && find(results, w, Kind::PlainTcp).is_some())
        .collect();
    if bulk.is_empty() {
        return;
    }
    let tls: Vec<Kind> = results
        .settings
        .systems
        .iter()
        .copied()
        .filter(|k| k.speaks_tls())
        .collect();
    let _ = writeln!(
        md,
        "\nProxy CPU per GB over the plaintext floor's (`haproxy-plain`: HAProxy relaying \
         the same bytes without TLS). 1.00 means crypto has vanished from the host: the \
         proxy spends on a TLS connection what a plain relay does; what is above 1 is what \
         TLS still costs the host.\n"
    );
    let mut header = String::from("| workload (CPU per GB ÷ floor's) |");
    let mut rule = String::from("|---|");
    for k in &tls {
        let _ = write!(header, " {} |", k.name());
        rule.push_str("---|");
    }
    let _ = writeln!(md, "{header}\n{rule}");
    for w in bulk {
        let mut row = format!("| {} |", w.title());
        for &k in &tls {
            let _ = write!(
                row,
                " {} |",
                shown(cpu_ratio(results, w, k, Kind::PlainTcp))
            );
        }
        let _ = writeln!(md, "{row}");
    }
}

/// What a target asks of its measured figure.
#[derive(Debug, Clone, Copy)]
enum Goal {
    AtLeast(f64),
    AtMost(f64),
    Below(f64),
}

impl Goal {
    fn met(self, value: f64) -> bool {
        match self {
            Goal::AtLeast(goal) => value >= goal,
            Goal::AtMost(goal) => value <= goal,
            Goal::Below(goal) => value < goal,
        }
    }
}

/// A row of the targets table.
#[derive(Debug)]
struct Target {
    name: String,
    measured: Option<f64>,
    goal: Goal,
}

impl Target {
    fn new(name: impl Into<String>, measured: Option<f64>, goal: Goal) -> Self {
        Self {
            name: name.into(),
            measured,
            goal,
        }
    }
}

/// The project's targets, each with its figure from this run.
fn targets(results: &Results) -> Vec<Target> {
    use Kind::{Haproxy, Nginx, PlainTcp, TlsaccelCpu as Cpu, TlsaccelDevice as Device};
    let r = |w, a, b| ratio(results, w, a, b);
    let c = |w, a, b| cpu_ratio(results, w, a, b);
    let bulk64 = [
        (Workload::Download64, "64-connection download"),
        (Workload::Upload64, "64-connection upload"),
    ];
    let mut t = vec![
        Target::new(
            "full ECDSA handshakes/s, device ≥ 1.3 × nginx",
            r(Workload::FullHandshakesEcdsa, Device, Nginx),
            Goal::AtLeast(1.3),
        ),
        Target::new(
            "resumed handshakes/s, device ≥ 1.5 × nginx",
            r(Workload::ResumedHandshakes, Device, Nginx),
            Goal::AtLeast(1.5),
        ),
        Target::new(
            "resumed handshakes/s with sessions in Redis, tlsaccel-redis ≥ 1.5 × nginx",
            r(Workload::ResumedHandshakes, Kind::TlsaccelRedis, Nginx),
            Goal::AtLeast(1.5),
        ),
    ];
    for (w, label) in bulk64 {
        for other in [Nginx, Haproxy] {
            t.push(Target::new(
                format!("{label} MB/s, device ≥ 1.0 × {}", other.name()),
                r(w, Device, other),
                Goal::AtLeast(1.0),
            ));
        }
    }
    for (w, label) in [
        (Workload::Download1, "1-connection download"),
        (Workload::Upload1, "1-connection upload"),
    ] {
        t.push(Target::new(
            format!("{label} MB/s, device ≥ 0.8 × tlsaccel-cpu"),
            r(w, Device, Cpu),
            Goal::AtLeast(0.8),
        ));
    }
    t.push(Target::new(
        "proxy CPU per GB (64-connection download), device ≤ 0.35 × nginx",
        c(Workload::Download64, Device, Nginx),
        Goal::AtMost(0.35),
    ));
    for (w, label) in bulk64 {
        t.push(Target::new(
            format!("proxy CPU per GB ({label}), device ≤ 1.15 × plaintext floor"),
            c(w, Device, PlainTcp),
            Goal::AtMost(1.15),
        ));
    }
    for (w, label) in bulk64 {
        t.push(Target::new(
            format!("proxy CPU per GB ({label}), device < 1.0 × tlsaccel-cpu"),
            c(w, Device, Cpu),
            Goal::Below(1.0),
        ));
    }
    t.push(Target::new(
        "proxy CPU per 1,000 full RSA-2048 handshakes, device ≤ 0.5 × tlsaccel-cpu",
        c(Workload::FullHandshakesRsa, Device, Cpu),
        Goal::AtMost(0.5),
    ));
    t.push(Target::new(
        "proxy CPU per 1,000 full ECDSA P-256 handshakes, device ≤ 0.75 × tlsaccel-cpu",
        c(Workload::FullHandshakesEcdsa, Device, Cpu),
        Goal::AtMost(0.75),
    ));
    for system in [Device, Cpu] {
        for other in [Nginx, Haproxy] {
            t.push(Target::new(
                format!(
                    "connection-per-request requests/s, {} ≥ 1.2 × {}",
                    system.name(),
                    other.name()
                ),
                r(Workload::ConnectionPerRequest, system, other),
                Goal::AtLeast(1.2),
            ));
        }
    }
    for system in [Device, Cpu] {
        t.push(Target::new(
            format!("RSS per idle connection, {} ≤ 4 KiB", system.name()),
            median(results, Workload::IdleConnections, system),
            Goal::AtMost(4.0),
        ));
    }
    t
}

/// A bar per system (median) with a line from min to max.
fn plot(results: &Results, workload: Workload, path: &Path) -> anyhow::Result<()> {
    let bars: Vec<(&str, f64, f64, f64)> = results
        .settings
        .systems
        .iter()
        .filter_map(|&k| {
            let (m, lo, hi) = find(results, workload, k)?.spread();
            m.is_finite().then_some((k.name(), m, lo, hi))
        })
        .collect();
    let top = bars.iter().map(|b| b.3).fold(0.0f64, f64::max).max(1e-9) * 1.15;
    let count = bars.len() as i32;
    let root = SVGBackend::new(path, (640, 360)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(workload.title(), ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d((0..(count - 1).max(0)).into_segmented(), 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len())
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => bars
                .get(*i as usize)
                .map_or(String::new(), |b| b.0.to_owned()),
            _ => String::new(),
        })
        .y_desc(workload.unit())
        .draw()?;
    let colors = [
        RGBColor(200, 80, 40),
        RGBColor(230, 150, 60),
        RGBColor(60, 120, 190),
        RGBColor(90, 160, 90),
        RGBColor(140, 140, 140),
    ];
    for (i, (_, median, low, high)) in bars.iter().enumerate() {
        let i = i as i32;
        let color = colors[i as usize % colors.len()];
        chart.draw_series(
            Histogram::vertical(&chart)
                .style(color.filled())
                .margin(24)
                .data([(i, *median)]),
        )?;
        chart.draw_series(std::iter::once(PathElement::new(
            vec![
                (SegmentValue::CenterOf(i), *low),
                (SegmentValue::CenterOf(i), *high),
            ],
            BLACK.stroke_width(2),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            figure(*median),
            (SegmentValue::CenterOf(i), *median + top * 0.03),
            ("sans-serif", 12),
        )))?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{Sample, Settings};
    use super::*;

    fn sample(value: f64, proxy_cpu: f64, operations: u64, bytes: u64) -> Sample {
        Sample {
            value,
            operations,
            bytes,
            errors: 0,
            seconds: 1.0,
            proxy_cpu,
            simulator_cpu: None,
            p50_ms: None,
            p99_ms: None,
            resumed: None,
        }
    }

    fn results() -> Results {
        let series = |workload, system, samples| Series {
            workload,
            system,
            samples,
        };
        Results {
            settings: Settings {
                quick: true,
                repetitions: 3,
                run_seconds: 1.0,
                workers: 1,
                handshake_concurrency: 8,
                idle_connections: 100,
                systems: vec![Kind::TlsaccelDevice, Kind::Nginx, Kind::PlainTcp],
                http: false,
                workloads: Workload::ALL.to_vec(),
            },
            started: "now".into(),
            machine: "test".into(),
            versions: Vec::new(),
            series: vec![
                series(
                    Workload::FullHandshakesEcdsa,
                    Kind::TlsaccelDevice,
                    vec![
                        sample(2600.0, 1.0, 2600, 0),
                        sample(3000.0, 1.0, 3000, 0),
                        sample(2800.0, 1.0, 2800, 0),
                    ],
                ),
                series(
                    Workload::FullHandshakesEcdsa,
                    Kind::Nginx,
                    vec![sample(2000.0, 1.0, 2000, 0)],
                ),
                series(
                    Workload::Download64,
                    Kind::TlsaccelDevice,
                    vec![sample(500.0, 0.2, 500, 1_000_000_000)],
                ),
                series(
                    Workload::Download64,
                    Kind::Nginx,
                    vec![sample(1000.0, 1.0, 1000, 1_000_000_000)],
                ),
                series(
                    Workload::Download64,
                    Kind::PlainTcp,
                    vec![sample(2000.0, 0.25, 2000, 1_000_000_000)],
                ),
                series(
                    Workload::ConnectionPerRequest,
                    Kind::TlsaccelDevice,
                    vec![sample(1300.0, 2.6, 1300, 130_000)],
                ),
                series(
                    Workload::ConnectionPerRequest,
                    Kind::Nginx,
                    vec![sample(1000.0, 3.0, 1000, 100_000)],
                ),
            ],
            peak_rss_kib: vec![(Kind::TlsaccelDevice, 10240)],
            crosscheck: Vec::new(),
        }
    }

    #[test]
    fn the_report_gives_medians_spreads_ratios_and_targets() {
        let dir = std::env::temp_dir().join(format!("compare-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = write(&results(), &dir).expect("report");
        let text = std::fs::read_to_string(path).expect("read");
        // Median of three, with min–max, and the ratio of medians to nginx; the plaintext
        // floor runs no handshakes.
        assert!(
            text.contains("| 2800 (2600–3000) | 2000 (2000–2000) | – | 1.40 |"),
            "{text}"
        );
        assert!(text.contains("* `haproxy-plain`: HAProxy `mode tcp` with no TLS at all"));
        assert!(text.contains("| full ECDSA handshakes/s, device ≥ 1.3 × nginx | 1.40 | yes |"));
        assert!(text.contains("| 64-connection download MB/s, device ≥ 1.0 × nginx | 0.50 | no |"));
        // 0.2 CPU s per GB against 1.0: within the 0.35 target.
        assert!(
            text.contains("device ≤ 0.35 × nginx | 0.20 | yes |"),
            "{text}"
        );
        assert!(text.contains("| tlsaccel-device | 10.0 |"));
        // Neither the latency nor the memory table lists the floor, which ran neither.
        assert!(!text.contains("\n| haproxy-plain | –"), "{text}");
        // The floor ratio: 0.2 and 1.0 CPU s per GB against the floor's 0.25.
        assert!(
            text.contains("| Bulk download, 64 connections, 1 MiB responses | 0.80 | 4.00 |"),
            "{text}"
        );
        assert!(text.contains(
            "| proxy CPU per GB (64-connection download), device ≤ 1.15 × plaintext floor | 0.80 | yes |"
        ));
        assert!(text.contains(
            "| proxy CPU per GB (64-connection upload), device ≤ 1.15 × plaintext floor | – | not measured |"
        ));
        // A fresh connection per request: CPU per 1,000 requests, and 1.3 × nginx's rate.
        assert!(
            text.contains("(full handshake, one 100 B request, close) (CPU s/1k req) | 2.00 | 3.00 | – | 0.67 |"),
            "{text}"
        );
        assert!(text.contains(
            "| connection-per-request requests/s, tlsaccel-device ≥ 1.2 × nginx | 1.30 | yes |"
        ));
        assert!(
            text.contains("| RSS per idle connection, tlsaccel-cpu ≤ 4 KiB | – | not measured |")
        );
        assert!(dir.join("download-64conn.svg").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
