//! The report: `report.md` with every figure, its spread and the same-run ratios, and one
//! SVG bar chart per workload.

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

fn ratio(results: &Results, workload: Workload, a: Kind, b: Kind) -> String {
    match (find(results, workload, a), find(results, workload, b)) {
        (Some(x), Some(y)) => {
            let (x, y) = (x.spread().0, y.spread().0);
            if y > 0.0 && x.is_finite() {
                format!("{:.2}", x / y)
            } else {
                "–".into()
            }
        }
        _ => "–".into(),
    }
}

/// Proxy CPU seconds per GB moved (bulk) or per 1,000 handshakes.
fn cpu_cost(series: &Series, simulator: bool) -> Option<f64> {
    let pick = |s: &super::Sample| {
        if simulator {
            s.simulator_cpu
        } else {
            Some(s.proxy_cpu)
        }
    };
    series.median_of(|s| {
        let cpu = pick(s)?;
        match series.workload {
            Workload::Download1 | Workload::Download64 | Workload::Upload1 | Workload::Upload64 => {
                (s.bytes > 0).then(|| cpu / (s.bytes as f64 / 1e9))
            }
            Workload::FullHandshakesEcdsa
            | Workload::FullHandshakesRsa
            | Workload::ResumedHandshakes => {
                (s.operations > 0).then(|| cpu / (s.operations as f64 / 1000.0))
            }
            _ => None,
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
         (ECDSA P-256; RSA-2048 for the RSA handshake row), session resumption on (tickets).\n\
         * L4 TLS termination to the same plain HTTP/1.1 backend (this harness, own thread): \
         nginx `stream` with `ssl`, HAProxy `mode tcp` with `ssl`, tlsaccel `serve`.\n\
         * {} worker thread(s) or process(es) each (`worker_processes`, `nbthread`, \
         `worker_threads`). tlsaccel also runs handshake crypto on blocking threads.\n\
         * `tlsaccel-device`: the simulated device in a separate process over vfio-user \
         (its CPU is reported apart); handshakes on the device, and each connection \
         direction from its first record of 1 KiB or more (`cpu_below_bytes = 1024`). \
         `tlsaccel-cpu`: no device.\n\
         * Load generator: this harness (tokio + rustls), {} concurrent handshake loops; \
         {} idle connections (on freshly started systems); everything shares the \
         machine's cores.\n\
         * Figures are medians over the repetitions, with min–max in brackets; ratios are \
         of medians from this run.\n",
        s.workers, s.handshake_concurrency, s.idle_connections
    );
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
            ratio(results, w, Kind::TlsaccelDevice, Kind::Nginx),
            ratio(results, w, Kind::TlsaccelDevice, Kind::Haproxy),
            ratio(results, w, Kind::TlsaccelCpu, Kind::Nginx)
        );
        let _ = writeln!(md, "{row}");
    }
    if find(results, Workload::SmallRequests, systems[0]).is_some() {
        let _ = writeln!(
            md,
            "\nLatency of the small requests (median of the runs' percentiles):\n"
        );
        let _ = writeln!(md, "| system | p50 ms | p99 ms |\n|---|---|---|");
        for &k in systems {
            if let Some(series) = find(results, Workload::SmallRequests, k) {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} |",
                    k.name(),
                    series.median_of(|s| s.p50_ms).map_or("–".into(), figure),
                    series.median_of(|s| s.p99_ms).map_or("–".into(), figure)
                );
            }
        }
    }
    if find(results, Workload::ResumedHandshakes, systems[0]).is_some() {
        let _ = writeln!(
            md,
            "\nThe resumption row counts only handshakes that did resume; their share of all \
             handshakes in those runs:\n"
        );
        let _ = writeln!(md, "| system | resumed |\n|---|---|");
        for &k in systems {
            if let Some(series) = find(results, Workload::ResumedHandshakes, k) {
                let share = series
                    .median_of(|s| Some(s.resumed? as f64 / (s.operations.max(1)) as f64 * 100.0));
                let _ = writeln!(
                    md,
                    "| {} | {}% |",
                    k.name(),
                    share.map_or("–".into(), figure)
                );
            }
        }
    }

    if !results.crosscheck.is_empty() {
        let _ = writeln!(md, "\nCross-check with standard tools (one run each): `h2load --h1 -c 64` small requests, and `openssl s_time -new` full handshakes one connection at a time.\n");
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

    let _ = writeln!(md, "\n## CPU cost of the proxy process(es)\n");
    let _ = writeln!(
        md,
        "CPU seconds (user + system, all threads and worker processes) per GB moved or per \
         1,000 handshakes; the simulator process's own cost in brackets for `tlsaccel-device`.\n"
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
    for &w in &workloads {
        if w == Workload::SmallRequests || w == Workload::IdleConnections {
            continue;
        }
        let unit = if w.unit() == "MB/s" {
            "CPU s/GB"
        } else {
            "CPU s/1k hs"
        };
        let mut row = format!("| {} ({unit}) |", w.title());
        let mut device = None;
        let mut nginx = None;
        for &k in systems {
            let Some(series) = find(results, w, k) else {
                row.push_str(" – |");
                continue;
            };
            let proxy = cpu_cost(series, false);
            if k == Kind::TlsaccelDevice {
                device = proxy;
            }
            if k == Kind::Nginx {
                nginx = proxy;
            }
            let sim = cpu_cost(series, true)
                .map(|v| format!(" (sim {})", figure(v)))
                .unwrap_or_default();
            let _ = write!(row, " {}{sim} |", proxy.map_or("–".into(), figure));
        }
        let r = match (device, nginx) {
            (Some(d), Some(n)) if n > 0.0 => format!("{:.2}", d / n),
            _ => "–".into(),
        };
        let _ = writeln!(md, "{row} {r} |");
    }

    let _ = writeln!(md, "\n## Memory\n");
    let _ = writeln!(
        md,
        "| system | peak RSS MiB (holding the idle connections) | RSS per idle TLS connection, KiB |\n|---|---|---|"
    );
    for &k in systems {
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
        "\nRSS counts user-space memory only; the kernel's socket buffers come on top for \
         every system alike."
    );

    let _ = writeln!(md, "\n## Targets\n");
    let _ = writeln!(md, "| target | measured | met |\n|---|---|---|");
    let target = |md: &mut String, name: &str, value: Option<f64>, goal: f64, at_least: bool| {
        let (text, met) = match value {
            Some(v) if v.is_finite() => (
                figure(v),
                if (at_least && v >= goal) || (!at_least && v <= goal) {
                    "yes"
                } else {
                    "no"
                },
            ),
            _ => ("–".into(), "not measured"),
        };
        let _ = writeln!(md, "| {name} | {text} | {met} |");
    };
    let ratio_of = |w: Workload, a: Kind, b: Kind| -> Option<f64> {
        let x = find(results, w, a)?.spread().0;
        let y = find(results, w, b)?.spread().0;
        (y > 0.0).then_some(x / y)
    };
    target(
        &mut md,
        "full ECDSA handshakes/s, device ≥ 1.3 × nginx",
        ratio_of(
            Workload::FullHandshakesEcdsa,
            Kind::TlsaccelDevice,
            Kind::Nginx,
        ),
        1.3,
        true,
    );
    target(
        &mut md,
        "resumed handshakes/s, device ≥ 1.5 × nginx",
        ratio_of(
            Workload::ResumedHandshakes,
            Kind::TlsaccelDevice,
            Kind::Nginx,
        ),
        1.5,
        true,
    );
    for (w, label) in [
        (Workload::Download64, "64-connection download"),
        (Workload::Upload64, "64-connection upload"),
    ] {
        for other in [Kind::Nginx, Kind::Haproxy] {
            target(
                &mut md,
                &format!("{label} MB/s, device ≥ 1.0 × {}", other.name()),
                ratio_of(w, Kind::TlsaccelDevice, other),
                1.0,
                true,
            );
        }
    }
    let cpu_ratio = |w: Workload| -> Option<f64> {
        let d = cpu_cost(find(results, w, Kind::TlsaccelDevice)?, false)?;
        let n = cpu_cost(find(results, w, Kind::Nginx)?, false)?;
        (n > 0.0).then_some(d / n)
    };
    target(
        &mut md,
        "proxy CPU per GB (64-connection download), device ≤ 0.35 × nginx",
        cpu_ratio(Workload::Download64),
        0.35,
        false,
    );
    target(
        &mut md,
        "RSS per idle connection, tlsaccel-device ≤ 4 KiB",
        find(results, Workload::IdleConnections, Kind::TlsaccelDevice).map(|s| s.spread().0),
        4.0,
        false,
    );

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
                systems: vec![Kind::TlsaccelDevice, Kind::Nginx],
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
        // Median of three, with min–max, and the ratio of medians to nginx.
        assert!(
            text.contains("| 2800 (2600–3000) | 2000 (2000–2000) | 1.40 |"),
            "{text}"
        );
        assert!(text.contains("| full ECDSA handshakes/s, device ≥ 1.3 × nginx | 1.40 | yes |"));
        assert!(text.contains("| 64-connection download MB/s, device ≥ 1.0 × nginx | 0.50 | no |"));
        // 0.2 CPU s per GB against 1.0: within the 0.35 target.
        assert!(
            text.contains("device ≤ 0.35 × nginx | 0.20 | yes |"),
            "{text}"
        );
        assert!(text.contains("| tlsaccel-device | 10.0 |"));
        assert!(dir.join("download-64conn.svg").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
