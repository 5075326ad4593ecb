//! Cross-checks with standard tools: `h2load --h1` for small keep-alive requests and
//! `openssl s_time -new` for full handshakes (one connection at a time), so the harness's
//! own load generator is not the only witness. The plaintext floor gets `h2load` over plain
//! HTTP only.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

/// Requests per second `h2load` reached: `requests` small requests over 64 connections, over
/// TLS or (`tls` false, the plaintext floor) plain TCP.
pub fn h2load(address: SocketAddr, tls: bool, requests: u64) -> Option<f64> {
    let scheme = if tls { "https" } else { "http" };
    let output = Command::new("h2load")
        .args(["--h1", "-t", "1", "-c", "64", "-n"])
        .arg(requests.to_string())
        .arg(format!("{scheme}://localhost:{}/small", address.port()))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    // "finished in 1.23s, 8123.45 req/s, 1.23MB/s"
    let line = text.lines().find(|l| l.starts_with("finished in"))?;
    let rate = line.split(", ").nth(1)?.strip_suffix(" req/s")?;
    let failed = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .is_some_and(|l| !l.contains(" 0 failed"));
    if failed {
        return None;
    }
    rate.trim().parse().ok()
}

/// New connections per second `openssl s_time` made in `time`.
pub fn s_time(address: SocketAddr, time: Duration) -> Option<f64> {
    let output = Command::new("openssl")
        .args(["s_time", "-new", "-connect"])
        .arg(address.to_string())
        .arg("-time")
        .arg(time.as_secs().max(1).to_string())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    // "1234 connections in 4 real seconds, 0 bytes read per connection"
    let line = text.lines().find(|l| l.contains("real seconds"))?;
    let mut words = line.split_whitespace();
    let connections: f64 = words.next()?.parse().ok()?;
    let seconds: f64 = words.nth(2)?.parse().ok()?;
    (seconds > 0.0).then(|| connections / seconds)
}
