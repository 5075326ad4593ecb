//! The daemon's metrics and their Prometheus text exposition (format 0.0.4).
//!
//! Hot-path counters are plain atomics owned by the parts that move them; labelled counters
//! that move once per connection (handshakes per suite, alerts per type, backend errors) sit
//! in small maps. [`Exposition`] writes the text format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Upper bounds of the latency histograms, in seconds: 10 µs to 1 s.
const BOUNDS: [f64; 14] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.1, 0.25, 1.0,
];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BOUNDS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Records one observation of `seconds`.
    pub fn observe(&self, seconds: f64) {
        if let Some(i) = BOUNDS.iter().position(|&b| seconds <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add((seconds * 1e9) as u64, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Counters keyed by one label value.
#[derive(Debug, Default)]
pub struct LabelledCounter(Mutex<BTreeMap<String, u64>>);

impl LabelledCounter {
    /// Adds one to the counter for `label`.
    pub fn inc(&self, label: &str) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(label) {
            Some(value) => *value += 1,
            None => {
                map.insert(label.to_owned(), 1);
            }
        }
    }

    /// The counter for `label`.
    pub fn get(&self, label: &str) -> u64 {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(label).copied().unwrap_or(0)
    }

    /// Every label and its value.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

/// Prometheus text being written.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// Starts a metric family.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    /// One sample.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (key, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{key}=\"{}\"", escape(val));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    /// A family with one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: u64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// A histogram's samples (the family must have been started with kind `histogram`).
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], histogram: &Histogram) {
        let mut cumulative = 0;
        let bucket = format!("{name}_bucket");
        for (i, bound) in BOUNDS.iter().enumerate() {
            cumulative += histogram.buckets[i].load(Ordering::Relaxed);
            let le = bound.to_string();
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, cumulative);
        }
        let count = histogram.count.load(Ordering::Relaxed);
        let mut with_le = labels.to_vec();
        with_le.push(("le", "+Inf"));
        self.sample(&bucket, &with_le, count);
        let sum = histogram.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        self.sample(&format!("{name}_sum"), labels, sum);
        self.sample(&format!("{name}_count"), labels, count);
    }

    /// The text.
    pub fn finish(self) -> String {
        self.text
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_with_the_count() {
        let h = Histogram::default();
        h.observe(0.000_02);
        h.observe(0.003);
        h.observe(5.0);
        let mut e = Exposition::default();
        e.family("x_seconds", "histogram", "test");
        e.histogram("x_seconds", &[("queue", "0")], &h);
        let text = e.finish();
        assert!(text.contains("x_seconds_bucket{queue=\"0\",le=\"0.00001\"} 0\n"));
        assert!(text.contains("x_seconds_bucket{queue=\"0\",le=\"0.000025\"} 1\n"));
        assert!(text.contains("x_seconds_bucket{queue=\"0\",le=\"0.005\"} 2\n"));
        assert!(text.contains("x_seconds_bucket{queue=\"0\",le=\"1\"} 2\n"));
        assert!(text.contains("x_seconds_bucket{queue=\"0\",le=\"+Inf\"} 3\n"));
        assert!(text.contains("x_seconds_count{queue=\"0\"} 3\n"));
    }

    #[test]
    fn label_values_are_escaped() {
        let mut e = Exposition::default();
        e.sample("m", &[("name", "a\"b\\c\nd")], 1);
        assert_eq!(e.finish(), "m{name=\"a\\\"b\\\\c\\nd\"} 1\n");
    }
}
