//! The admin endpoint: `GET /metrics` (Prometheus text) and `GET /status` (JSON), plain
//! HTTP/1.1 through hyper. Bind it to loopback or a management network.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tlsaccel_driver::abi::regs::Counter;
use tokio::net::TcpListener;

use crate::metrics::Exposition;
use crate::serve::Shared;

/// Binds `address` and serves the admin endpoint until the runtime stops; returns the bound
/// address.
pub async fn start(address: SocketAddr, shared: Arc<Shared>) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(address).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let shared = Arc::clone(&shared);
                    async move { Ok::<_, Infallible>(answer(&request, &shared)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(local)
}

fn answer(request: &Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics(shared),
        ),
        (&Method::GET, "/status") => (StatusCode::OK, "application/json", status(shared)),
        (&Method::GET, _) => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// The Prometheus exposition of every metric.
pub fn metrics(shared: &Shared) -> String {
    let s = &shared.stats;
    let r = &shared.records;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut e = Exposition::default();
    e.single(
        "tlsaccel_connections_accepted_total",
        "counter",
        "Client connections accepted.",
        load(&s.connections_accepted),
    );
    e.single(
        "tlsaccel_connections_active",
        "gauge",
        "Client connections open now.",
        load(&s.connections_active),
    );
    e.family(
        "tlsaccel_handshakes_total",
        "counter",
        "Completed handshakes by kind (full or resumed), version and suite.",
    );
    for (label, value) in s.handshakes.snapshot() {
        let mut parts = label.splitn(3, ' ');
        let (kind, version, suite) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        e.sample(
            "tlsaccel_handshakes_total",
            &[("kind", kind), ("version", version), ("suite", suite)],
            value,
        );
    }
    e.family(
        "tlsaccel_handshake_failures_total",
        "counter",
        "Failed handshakes by reason.",
    );
    for (reason, value) in s.handshake_failures.snapshot() {
        e.sample(
            "tlsaccel_handshake_failures_total",
            &[("reason", &reason)],
            value,
        );
    }
    e.family(
        "tlsaccel_proxy_headers_total",
        "counter",
        "PROXY protocol headers from clients: accepted, or refused (untrusted source, invalid, missing, timeout).",
    );
    for (result, value) in s.proxy_headers.snapshot() {
        e.sample(
            "tlsaccel_proxy_headers_total",
            &[("result", &result)],
            value,
        );
    }
    e.family(
        "tlsaccel_client_certificates_total",
        "counter",
        "Client certificates on listeners that ask for them: verified, none, or the alert that refused the client (certificate_required, unknown_ca, certificate_revoked...).",
    );
    for (result, value) in s.client_certificates.snapshot() {
        e.sample(
            "tlsaccel_client_certificates_total",
            &[("result", &result)],
            value,
        );
    }
    e.family(
        "tlsaccel_acl_decisions_total",
        "counter",
        "Access-rule decisions (allow, deny): per connection in L4 mode, per request in HTTP mode.",
    );
    for (result, value) in s.acl_decisions.snapshot() {
        e.sample(
            "tlsaccel_acl_decisions_total",
            &[("result", &result)],
            value,
        );
    }
    if let Some(audit) = &shared.audit {
        let a = &audit.stats;
        e.family(
            "tlsaccel_audit_records_total",
            "counter",
            "Audit log records: written to the file, waited for room in the queue (on_full = block), refused with their decision (on_full = refuse).",
        );
        for (result, counter) in [
            ("written", &a.written),
            ("waited", &a.waited),
            ("refused", &a.refused),
        ] {
            e.sample(
                "tlsaccel_audit_records_total",
                &[("result", result)],
                counter.load(Ordering::Relaxed),
            );
        }
        e.family(
            "tlsaccel_audit_write_errors_total",
            "counter",
            "Audit log opens and writes that failed (tried again every second with the same records).",
        );
        e.sample(
            "tlsaccel_audit_write_errors_total",
            &[],
            a.write_errors.load(Ordering::Relaxed),
        );
        e.family(
            "tlsaccel_audit_rotations_total",
            "counter",
            "Audit log files renamed to <file>.<UTC time> after passing max_bytes.",
        );
        e.sample(
            "tlsaccel_audit_rotations_total",
            &[],
            a.rotations.load(Ordering::Relaxed),
        );
    }
    e.family(
        "tlsaccel_client_auth_reloads_total",
        "counter",
        "Client CA/CRL files read again after they changed: ok, or failed (the old verifier stays).",
    );
    for (result, value) in s.client_auth_reloads.snapshot() {
        e.sample(
            "tlsaccel_client_auth_reloads_total",
            &[("result", &result)],
            value,
        );
    }
    e.family(
        "tlsaccel_http_responses_total",
        "counter",
        "HTTP mode: responses to clients by status class, the proxy's own included.",
    );
    for (class, value) in s.http_responses.snapshot() {
        e.sample("tlsaccel_http_responses_total", &[("code", &class)], value);
    }
    e.family(
        "tlsaccel_http_backend_errors_total",
        "counter",
        "HTTP mode: requests no backend answered (connect: none reachable, answered 503; exchange: failed mid-request, answered 502).",
    );
    for (kind, value) in s.http_backend_errors.snapshot() {
        e.sample(
            "tlsaccel_http_backend_errors_total",
            &[("kind", &kind)],
            value,
        );
    }
    e.family(
        "tlsaccel_http_refused_total",
        "counter",
        "HTTP mode: requests an inspection rule refused, by rule (method 405, path 403, header_fields and header_bytes 431, body 413).",
    );
    let refused = s.http_refused.snapshot();
    for rule in crate::inspect::Rule::ALL {
        let value = refused
            .iter()
            .find(|(k, _)| k == rule.as_str())
            .map_or(0, |(_, v)| *v);
        e.sample(
            "tlsaccel_http_refused_total",
            &[("rule", rule.as_str())],
            value,
        );
    }
    if let Some(pke) = &shared.pke {
        let h = pke.stats();
        e.family(
            "tlsaccel_handshake_operations_total",
            "counter",
            "Handshake public-key operations by engine.",
        );
        for (op, engine, value) in [
            ("sign", "device", load(&h.device_signatures)),
            ("key_exchange", "device", load(&h.device_key_exchanges)),
            ("any", "cpu_fallback", load(&h.cpu_fallbacks)),
            ("any", "cpu_by_choice", load(&h.cpu_by_choice)),
        ] {
            e.sample(
                "tlsaccel_handshake_operations_total",
                &[("op", op), ("engine", engine)],
                value,
            );
        }
        e.single(
            "tlsaccel_handshakes_waiting_for_device",
            "gauge",
            "Handshakes paused on their fiber until the device answers (no thread waits).",
            load(&h.waiting),
        );
        e.single(
            "tlsaccel_handshake_key_reloads_total",
            "counter",
            "Certificate keys loaded into the device again after it was reset.",
            load(&h.key_reloads),
        );
    }
    e.family(
        "tlsaccel_records_total",
        "counter",
        "TLS records protected, by operation and engine.",
    );
    e.family(
        "tlsaccel_record_bytes_total",
        "counter",
        "Plaintext bytes of those records.",
    );
    for (op, engine, records, bytes) in [
        (
            "seal",
            "device",
            &r.device_sealed_records,
            &r.device_sealed_bytes,
        ),
        ("seal", "cpu", &r.cpu_sealed_records, &r.cpu_sealed_bytes),
        (
            "open",
            "device",
            &r.device_opened_records,
            &r.device_opened_bytes,
        ),
        ("open", "cpu", &r.cpu_opened_records, &r.cpu_opened_bytes),
    ] {
        let labels = [("op", op), ("engine", engine)];
        e.sample("tlsaccel_records_total", &labels, load(records));
        e.sample("tlsaccel_record_bytes_total", &labels, load(bytes));
    }
    e.single(
        "tlsaccel_key_loads_total",
        "counter",
        "Traffic keys loaded into device slots.",
        load(&r.key_loads),
    );
    e.single(
        "tlsaccel_record_device_fallbacks_total",
        "counter",
        "Connection directions moved to the CPU because the device failed them.",
        load(&r.device_fallbacks),
    );
    e.single(
        "tlsaccel_record_device_refused_good_records_total",
        "counter",
        "Records the device refused (bad tag, malformed) that the CPU then opened: device faults.",
        load(&r.device_refused_good_records),
    );
    e.family(
        "tlsaccel_record_zero_copy_bytes_total",
        "counter",
        "Plaintext bytes the device sealed or opened in DMA memory a socket was read into, sent on from DMA memory: no host copy.",
    );
    e.sample(
        "tlsaccel_record_zero_copy_bytes_total",
        &[("op", "seal")],
        load(&r.zero_copy_sealed_bytes),
    );
    e.sample(
        "tlsaccel_record_zero_copy_bytes_total",
        &[("op", "open")],
        load(&r.zero_copy_opened_bytes),
    );
    e.single(
        "tlsaccel_record_device_saturated_total",
        "counter",
        "Record batches done on the CPU because device memory or key slots ran out.",
        load(&r.device_saturated),
    );
    e.family(
        "tlsaccel_key_updates_total",
        "counter",
        "TLS 1.3 KeyUpdates.",
    );
    e.sample(
        "tlsaccel_key_updates_total",
        &[("direction", "received")],
        load(&r.key_updates_received),
    );
    e.sample(
        "tlsaccel_key_updates_total",
        &[("direction", "sent")],
        load(&r.key_updates_sent),
    );
    e.family(
        "tlsaccel_alerts_sent_total",
        "counter",
        "TLS alerts sent, by description.",
    );
    for (alert, value) in s.alerts_sent.snapshot() {
        e.sample("tlsaccel_alerts_sent_total", &[("alert", &alert)], value);
    }
    e.single(
        "tlsaccel_renegotiations_refused_total",
        "counter",
        "TLS 1.2 renegotiation attempts refused.",
        load(&s.renegotiations_refused),
    );
    e.single(
        "tlsaccel_idle_timeouts_total",
        "counter",
        "Connections closed for idleness.",
        load(&s.idle_timeouts),
    );
    e.family(
        "tlsaccel_write_stalls_total",
        "counter",
        "Connections ended because a peer took no bytes for the idle timeout, by peer.",
    );
    e.sample(
        "tlsaccel_write_stalls_total",
        &[("peer", "client")],
        load(&s.client_write_stalls),
    );
    e.sample(
        "tlsaccel_write_stalls_total",
        &[("peer", "backend")],
        load(&s.backend_write_stalls),
    );
    e.family(
        "tlsaccel_peer_limits_total",
        "counter",
        "Connections ended because the client went over a limit (peer_limits), by limit.",
    );
    for limit in [
        "key_updates",
        "warning_alerts",
        "empty_records",
        "renegotiations",
    ] {
        e.sample(
            "tlsaccel_peer_limits_total",
            &[("limit", limit)],
            r.peer_limits.get(limit),
        );
    }
    e.single(
        "tlsaccel_key_exhausted_total",
        "counter",
        "TLS 1.2 connections closed because a key reached its suite's record limit.",
        load(&r.key_exhausted),
    );
    e.single(
        "tlsaccel_backend_unavailable_total",
        "counter",
        "Connections closed because no backend of their pool answered.",
        load(&s.backend_unavailable),
    );
    e.single(
        "tlsaccel_unrouted_total",
        "counter",
        "Connections no route matched and no default pool took.",
        load(&s.unrouted),
    );
    e.family(
        "tlsaccel_proxied_bytes_total",
        "counter",
        "Plaintext bytes proxied.",
    );
    e.sample(
        "tlsaccel_proxied_bytes_total",
        &[("direction", "client_to_backend")],
        load(&s.bytes_client_to_backend),
    );
    e.sample(
        "tlsaccel_proxied_bytes_total",
        &[("direction", "backend_to_client")],
        load(&s.bytes_backend_to_client),
    );
    e.single(
        "tlsaccel_client_bytes_dropped_total",
        "counter",
        "Client bytes dropped because the backend had stopped reading (its answer was delivered).",
        load(&s.client_bytes_dropped),
    );
    e.family(
        "tlsaccel_reloads_total",
        "counter",
        "Configuration reloads by result.",
    );
    e.sample(
        "tlsaccel_reloads_total",
        &[("result", "ok")],
        load(&s.reloads),
    );
    e.sample(
        "tlsaccel_reloads_total",
        &[("result", "refused")],
        load(&s.reload_failures),
    );
    device_metrics(shared, &mut e);
    backend_metrics(shared, &mut e);
    resumption_metrics(shared, &mut e);
    e.finish()
}

fn resumption_metrics(shared: &Shared, e: &mut Exposition) {
    let t = &shared.resumption.stats;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    e.single(
        "tlsaccel_tickets_issued_total",
        "counter",
        "Session tickets sealed.",
        load(&t.issued),
    );
    e.single(
        "tlsaccel_ticket_seal_failures_total",
        "counter",
        "Session tickets that could not be sealed (an empty ticket was sent).",
        load(&t.seal_failures),
    );
    e.family(
        "tlsaccel_tickets_accepted_total",
        "counter",
        "Session tickets that opened, by key (current or previous) and origin (this node or another).",
    );
    for (age, other, value) in t.accepted() {
        let origin = if other { "other_node" } else { "this_node" };
        e.sample(
            "tlsaccel_tickets_accepted_total",
            &[("key", age.label()), ("origin", origin)],
            value,
        );
    }
    e.family(
        "tlsaccel_tickets_rejected_total",
        "counter",
        "Session tickets refused (the client got a full handshake), by reason.",
    );
    for (reason, value) in t.rejected() {
        e.sample(
            "tlsaccel_tickets_rejected_total",
            &[("reason", reason.label())],
            value,
        );
    }
    e.single(
        "tlsaccel_ticket_key_rotations_total",
        "counter",
        "New sealing keys taken (random rotation or a changed key file).",
        load(&t.rotations),
    );
    e.single(
        "tlsaccel_ticket_key_file_errors_total",
        "counter",
        "Key file checks that failed (the keys loaded before stayed in use).",
        load(&t.key_file_errors),
    );
    e.single(
        "tlsaccel_ticket_keys",
        "gauge",
        "Keys in the ticket key ring (the sealing key and those that still open tickets).",
        shared.resumption.key_info().len() as u64,
    );
    e.single(
        "tlsaccel_ticket_key_shared_errors_total",
        "counter",
        "Refreshes of Redis-shared ticket keys that failed (the keys held stayed in use).",
        load(&t.shared_key_errors),
    );
    e.single(
        "tlsaccel_ticket_key_local_fallbacks_total",
        "counter",
        "Keys of this node's own made because no shared key could be had.",
        load(&t.local_fallbacks),
    );
    let Some(cluster) = &shared.resumption.shared else {
        return;
    };
    let link = &cluster.link;
    e.single(
        "tlsaccel_redis_up",
        "gauge",
        "1 when the last Redis call was answered.",
        u64::from(link.is_up()),
    );
    e.family(
        "tlsaccel_redis_calls_total",
        "counter",
        "Redis calls by result.",
    );
    for (result, counter) in [
        ("ok", &link.stats.ok),
        ("error", &link.stats.errors),
        ("timeout", &link.stats.timeouts),
    ] {
        e.sample(
            "tlsaccel_redis_calls_total",
            &[("result", result)],
            load(counter),
        );
    }
    e.family(
        "tlsaccel_ticket_keys_shared_total",
        "counter",
        "Shared epoch keys this node made first, fetched, wrote back to a Redis that had lost them, or replaced with the one Redis held.",
    );
    e.sample(
        "tlsaccel_ticket_keys_shared_total",
        &[("how", "made")],
        load(&cluster.keys_made),
    );
    for (how, counter) in [
        ("fetched", &cluster.keys_fetched),
        ("restored", &cluster.keys_restored),
        ("replaced", &cluster.keys_replaced),
    ] {
        e.sample(
            "tlsaccel_ticket_keys_shared_total",
            &[("how", how)],
            load(counter),
        );
    }
    let st = &cluster.sessions;
    e.family(
        "tlsaccel_session_store_lookups_total",
        "counter",
        "Session-ID lookups by result (local_only: off a fiber; over_allowance: past the first identity of a hello; Redis not asked for either).",
    );
    for (result, counter) in [
        ("local_hit", &st.local_hits),
        ("remote_hit", &st.remote_hits),
        ("miss", &st.misses),
        ("error", &st.errors),
        ("local_only", &st.local_only),
        ("over_allowance", &st.over_allowance),
    ] {
        e.sample(
            "tlsaccel_session_store_lookups_total",
            &[("result", result)],
            load(counter),
        );
    }
    e.family(
        "tlsaccel_session_store_writes_total",
        "counter",
        "Sessions queued for Redis, and those dropped because the queue was full.",
    );
    e.sample(
        "tlsaccel_session_store_writes_total",
        &[("result", "queued")],
        load(&st.writes),
    );
    e.sample(
        "tlsaccel_session_store_writes_total",
        &[("result", "dropped")],
        load(&st.writes_dropped),
    );
}

fn device_metrics(shared: &Shared, e: &mut Exposition) {
    let up = shared.offload.as_ref().is_some_and(|o| o.in_service());
    e.single(
        "tlsaccel_device_up",
        "gauge",
        "1 when a device is open and in service (not lost, self-check passed).",
        u64::from(up),
    );
    if let Some(device) = shared.device.as_ref().filter(|_| up) {
        e.family(
            "tlsaccel_device_counter",
            "counter",
            "The device's own counters (BAR0 counter block).",
        );
        for counter in Counter::ALL {
            e.sample(
                "tlsaccel_device_counter",
                &[("counter", counter.name())],
                device.counter(counter),
            );
        }
    }
    let Some(offload) = &shared.offload else {
        return;
    };
    let r = &offload.stats;
    let load = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::Relaxed);
    let events = offload.device.events();
    e.family(
        "tlsaccel_device_driver_events_total",
        "counter",
        "What the driver caught the device doing wrong: completions with unknown cookies or impossible contents, jobs past their timeout, jobs quarantined because the device never let go.",
    );
    for (event, value) in [
        ("unknown_cookie", &events.unknown_cookies),
        ("bad_completion", &events.bad_completions),
        ("timeout", &events.timeouts),
        ("quarantined_job", &events.quarantined_jobs),
    ] {
        e.sample(
            "tlsaccel_device_driver_events_total",
            &[("event", event)],
            load(value),
        );
    }
    e.single(
        "tlsaccel_device_lost_total",
        "counter",
        "Times the device was found lost (transport gone, FATAL, heartbeat stopped).",
        load(&r.device_lost),
    );
    e.family(
        "tlsaccel_device_recoveries_total",
        "counter",
        "Attempts to bring a lost device back, by result.",
    );
    e.sample(
        "tlsaccel_device_recoveries_total",
        &[("result", "ok")],
        load(&r.recoveries),
    );
    e.sample(
        "tlsaccel_device_recoveries_total",
        &[("result", "failed")],
        load(&r.recovery_failures),
    );
    e.single(
        "tlsaccel_device_last_recovery_milliseconds",
        "gauge",
        "How long the last recovery took, from the device found lost to back in service.",
        load(&r.last_recovery_ms),
    );
    e.single(
        "tlsaccel_device_queues_replaced_total",
        "counter",
        "Record queues replaced because they broke (a job timed out, or the device was reset).",
        load(&r.queues_replaced),
    );
    let stats = offload.batch_stats();
    e.family(
        "tlsaccel_device_queue_depth",
        "gauge",
        "Record jobs submitted and not yet answered, per queue.",
    );
    for (i, s) in stats.iter().enumerate() {
        let queue = i.to_string();
        e.sample(
            "tlsaccel_device_queue_depth",
            &[("queue", &queue)],
            s.in_flight.load(Ordering::Relaxed),
        );
    }
    e.family(
        "tlsaccel_device_batches_total",
        "counter",
        "Record batches (doorbells) submitted, per queue.",
    );
    for (i, s) in stats.iter().enumerate() {
        let queue = i.to_string();
        e.sample(
            "tlsaccel_device_batches_total",
            &[("queue", &queue)],
            s.batches.load(Ordering::Relaxed),
        );
    }
    e.family(
        "tlsaccel_device_job_latency_seconds",
        "histogram",
        "Time from a connection handing records to the batcher to their results.",
    );
    for (i, s) in stats.iter().enumerate() {
        let queue = i.to_string();
        e.histogram(
            "tlsaccel_device_job_latency_seconds",
            &[("queue", &queue)],
            &s.latency,
        );
    }
}

fn backend_metrics(shared: &Shared, e: &mut Exposition) {
    let state = shared.state();
    let mut pools: Vec<_> = state.pools.values().collect();
    pools.sort_by(|a, b| a.name.cmp(&b.name));
    let families = [
        (
            "tlsaccel_backend_up",
            "gauge",
            "1 while the backend is in rotation.",
        ),
        (
            "tlsaccel_backend_active_connections",
            "gauge",
            "Connections open to the backend.",
        ),
        (
            "tlsaccel_backend_connections_total",
            "counter",
            "Connections made to the backend.",
        ),
        (
            "tlsaccel_backend_errors_total",
            "counter",
            "Failed connection attempts.",
        ),
        (
            "tlsaccel_backend_health_check_failures_total",
            "counter",
            "Failed active health checks.",
        ),
    ];
    for (i, (name, kind, help)) in families.iter().enumerate() {
        e.family(name, kind, help);
        for pool in &pools {
            for backend in &pool.backends {
                let value = match i {
                    0 => u64::from(backend.is_healthy()),
                    1 => u64::from(backend.active()),
                    2 => backend.connections.load(Ordering::Relaxed),
                    3 => backend.errors.load(Ordering::Relaxed),
                    _ => backend.health_failures.load(Ordering::Relaxed),
                };
                e.sample(
                    name,
                    &[("pool", &pool.name), ("server", &backend.address)],
                    value,
                );
            }
        }
    }
    for (name, help, pick) in [
        (
            "tlsaccel_http_retries_total",
            "HTTP mode: requests sent on to another server of the pool.",
            (|p: &crate::pool::Pool| p.retry.retries.load(Ordering::Relaxed))
                as fn(&crate::pool::Pool) -> u64,
        ),
        (
            "tlsaccel_http_retries_refused_total",
            "HTTP mode: retries the pool's retry budget refused.",
            |p: &crate::pool::Pool| p.retry.refused.load(Ordering::Relaxed),
        ),
    ] {
        e.family(name, "counter", help);
        for pool in &pools {
            e.sample(name, &[("pool", &pool.name)], pick(pool));
        }
    }
    priority_metrics(e, &pools);
    buffer_metrics(e, &state.buffers);
    cache_metrics(e, &state);
}

/// HTTP mode's response caches, by listener.
fn cache_metrics(e: &mut crate::metrics::Exposition, state: &crate::serve::State) {
    let mut listeners: Vec<_> = state
        .listeners
        .values()
        .filter(|l| l.cache.is_some())
        .collect();
    listeners.sort_by(|a, b| a.name.cmp(&b.name));
    e.family(
        "tlsaccel_http_cache_total",
        "counter",
        "HTTP mode: response cache outcomes (hit: answered from the cache; miss; revalidated: a stale entry the backend confirmed with 304; stored; invalidated by an unsafe request).",
    );
    for l in &listeners {
        let Some(cache) = &l.cache else { continue };
        let st = &cache.stats;
        for (result, counter) in [
            ("hit", &st.hits),
            ("miss", &st.misses),
            ("revalidated", &st.revalidated),
            ("stored", &st.stored),
            ("invalidated", &st.invalidated),
        ] {
            e.sample(
                "tlsaccel_http_cache_total",
                &[("listener", &l.name), ("result", result)],
                counter.load(Ordering::Relaxed),
            );
        }
    }
    e.family(
        "tlsaccel_http_cache_bytes",
        "gauge",
        "HTTP mode: bytes the response cache holds (bodies, heads and keys).",
    );
    for l in &listeners {
        if let Some(cache) = &l.cache {
            e.sample(
                "tlsaccel_http_cache_bytes",
                &[("listener", &l.name)],
                cache.weighted_size(),
            );
        }
    }
}

/// HTTP mode's shared buffer pool.
fn buffer_metrics(e: &mut crate::metrics::Exposition, buffers: &crate::buffers::BufferPool) {
    let (size, used) = buffers.size_and_use();
    e.family(
        "tlsaccel_http_buffer_pool_bytes",
        "gauge",
        "HTTP mode: the buffer pool for held request bodies: its size, the part in use, and \
         the part kept allocated for reuse.",
    );
    for (what, value) in [
        ("size", size),
        ("used", used),
        ("kept_free", buffers.kept_free()),
    ] {
        e.sample("tlsaccel_http_buffer_pool_bytes", &[("state", what)], value);
    }
    e.family(
        "tlsaccel_http_buffer_pool_resizes_total",
        "counter",
        "HTTP mode: the buffer pool doubling (past 95 % in use) and halving (under 40 %).",
    );
    for (direction, counter) in [
        ("grow", &buffers.stats.grown),
        ("shrink", &buffers.stats.shrunk),
    ] {
        e.sample(
            "tlsaccel_http_buffer_pool_resizes_total",
            &[("direction", direction)],
            counter.load(Ordering::Relaxed),
        );
    }
    e.single(
        "tlsaccel_http_buffer_pool_waits_total",
        "counter",
        "HTTP mode: requests that waited for room in the buffer pool at its cap.",
        buffers.stats.waited.load(Ordering::Relaxed),
    );
    e.single(
        "tlsaccel_http_buffer_pool_refused_total",
        "counter",
        "HTTP mode: requests answered 503 because the buffer pool stayed full.",
        buffers.stats.refused.load(Ordering::Relaxed),
    );
}

/// HTTP mode's response times and admission queues.
fn priority_metrics(e: &mut crate::metrics::Exposition, pools: &[&Arc<crate::pool::Pool>]) {
    e.family(
        "tlsaccel_pool_response_seconds",
        "gauge",
        "HTTP mode: the pool's response time to the response head (peak EWMA).",
    );
    for pool in pools {
        let rt = pool.admission.response_time.get().as_secs_f64();
        e.sample(
            "tlsaccel_pool_response_seconds",
            &[("pool", &pool.name)],
            rt,
        );
    }
    e.family(
        "tlsaccel_server_response_seconds",
        "gauge",
        "HTTP mode: each server's response time (peak EWMA; least_response_time uses it).",
    );
    for pool in pools {
        for backend in &pool.backends {
            e.sample(
                "tlsaccel_server_response_seconds",
                &[("pool", &pool.name), ("server", &backend.address)],
                backend.response_time.get().as_secs_f64(),
            );
        }
    }
    e.family(
        "tlsaccel_admission_total",
        "counter",
        "HTTP mode: requests by priority level and admission (immediate, waited, refused: \
         the wait would pass max_wait_ms, timed_out, queue_full).",
    );
    for pool in pools {
        let levels = pool.admission.levels();
        for (i, level) in levels.iter().enumerate() {
            let s = &pool.admission.stats[i];
            for (result, counter) in [
                ("immediate", &s.immediate),
                ("waited", &s.waited),
                ("refused", &s.refused),
                ("timed_out", &s.timed_out),
                ("queue_full", &s.queue_full),
            ] {
                e.sample(
                    "tlsaccel_admission_total",
                    &[
                        ("pool", &pool.name),
                        ("level", &level.name),
                        ("result", result),
                    ],
                    counter.load(Ordering::Relaxed),
                );
            }
        }
    }
    e.family(
        "tlsaccel_admission_limit",
        "gauge",
        "HTTP mode: requests of a level the pool takes at once while it is slow for that \
         level (absent: not limited now).",
    );
    e.family(
        "tlsaccel_admission_waiting",
        "gauge",
        "HTTP mode: requests waiting in the pool's admission queue.",
    );
    for pool in pools {
        let (limits, waiting) = pool.admission.with_queue(|q| {
            let limits: Vec<Option<f64>> = (0..pool.admission.levels().len())
                .map(|i| q.limit(i))
                .collect();
            (limits, q.waiting())
        });
        for (level, limit) in pool.admission.levels().iter().zip(limits) {
            if let Some(limit) = limit {
                e.sample(
                    "tlsaccel_admission_limit",
                    &[("pool", &pool.name), ("level", &level.name)],
                    limit.floor().max(1.0),
                );
            }
        }
        e.sample(
            "tlsaccel_admission_waiting",
            &[("pool", &pool.name)],
            waiting,
        );
    }
}

/// The resumption part of `/status`: the key ring's ids and ages, never key bytes.
fn resumption_status(shared: &Shared) -> serde_json::Value {
    let keys: Vec<_> = shared
        .resumption
        .key_info()
        .into_iter()
        .map(|k| {
            if k.current {
                serde_json::json!({"id": k.id, "current": true, "age_seconds": k.seconds})
            } else {
                serde_json::json!({"id": k.id, "current": false, "dropped_in_seconds": k.seconds})
            }
        })
        .collect();
    let redis = shared.resumption.shared.as_ref().map(|s| {
        serde_json::json!({
            "up": s.link.is_up(),
            "epochs_known": s.known.lock().unwrap_or_else(|e| e.into_inner()).keys().copied().collect::<Vec<_>>(),
        })
    });
    serde_json::json!({
        "node": shared.resumption.node(),
        "ticket_keys": keys,
        "redis": redis,
    })
}

/// The daemon's state as JSON.
pub fn status(shared: &Shared) -> String {
    let state = shared.state();
    let mut listeners: Vec<_> = state.listeners.keys().cloned().collect();
    listeners.sort();
    let pools: serde_json::Map<String, serde_json::Value> = state
        .pools
        .values()
        .map(|pool| {
            let backends: Vec<_> = pool
                .backends
                .iter()
                .map(|b| {
                    serde_json::json!({
                        "server": b.address,
                        "healthy": b.is_healthy(),
                        "active_connections": b.active(),
                        "connections": b.connections.load(Ordering::Relaxed),
                        "errors": b.errors.load(Ordering::Relaxed),
                    })
                })
                .collect();
            (pool.name.clone(), serde_json::Value::from(backends))
        })
        .collect();
    let device = shared.offload.as_ref().map(|o| {
        let d = &o.device;
        let health = o.health();
        serde_json::json!({
            "name": d.info().name,
            "up": o.in_service(),
            "state": health.state.name(),
            "state_seconds": health.since.elapsed().as_secs(),
            "recovery_attempts": health.attempts,
            "last_error": health.last_error,
            "lost": o.stats.device_lost.load(Ordering::Relaxed),
            "recoveries": o.stats.recoveries.load(Ordering::Relaxed),
            "last_recovery_ms": o.stats.last_recovery_ms.load(Ordering::Relaxed),
            "queues_replaced": o.stats.queues_replaced.load(Ordering::Relaxed),
            "queues": d.info().queues,
            "key_slots": d.info().key_slots,
            "free_key_slots": d.free_key_slots(),
            "record_queues_used": o.queues().len(),
        })
    });
    let body = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": shared.started.elapsed().as_secs(),
        "draining": shared.is_draining(),
        "connections_active": shared.stats.connections_active.load(Ordering::Relaxed),
        "connections_accepted": shared.stats.connections_accepted.load(Ordering::Relaxed),
        "listeners": listeners,
        "device": device,
        "pools": pools,
        "resumption": resumption_status(shared),
    });
    let mut text = body.to_string();
    text.push('\n');
    text
}
