//! One client connection from accept to close: handshake ([`crate::tls`]) → route
//! ([`crate::route`]) → connect to a backend ([`crate::pool`]) → the record session
//! ([`crate::session`]) driven by the pump ([`crate::pump`]) until both sides have closed.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rustls::AlertDescription;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::proxy_protocol::{self, Parsed};
use crate::pump;
use crate::record::Version;
use crate::serve::{ListenerState, Shared, State};
use crate::session::{self, Engines, Outgoing, Sender, Settings};
use crate::tls;

/// Serves one accepted connection to its end.
///
/// Everything before the record session (handshake, routing, the backend connect) has large,
/// short-lived futures and state: it runs in a future of its own on the heap, so what stays
/// for the connection's life (this task) holds little beside the pump. (A plain `async fn`
/// would also keep its arguments' storage next to the pump's.)
#[allow(clippy::manual_async_fn)] // see above: the async block uses its captures in place
pub fn serve(
    mut stream: TcpStream,
    listener: Arc<ListenerState>,
    state: Arc<State>,
    shared: &Arc<Shared>,
) -> impl std::future::Future<Output = ()> + Send + '_ {
    async move {
        if listener.tls.is_none() {
            Box::pin(serve_plain(stream, &listener, &state, shared)).await;
            return;
        }
        let Some(Proxied {
            ctx,
            receiver,
            sender,
            backend,
            early,
            lease,
            http,
        }) = Box::pin(establish(&mut stream, &listener, &state, shared)).await
        else {
            return;
        };
        let pumped = async {
            if let Err(error) = pump::run(ctx, receiver, sender, stream, backend, early).await {
                tracing::info!(%error, "connection ended with an error");
            }
        };
        match http {
            // In HTTP mode the pump and hyper (each end of the pipe) share this task: a
            // request and its answer cross the pipe without a wake-up of another task.
            Some(http) => {
                tokio::join!(pumped, http);
            }
            None => pumped.await,
        }
        drop(lease);
    }
}

/// A plain-HTTP listener's connection: its PROXY header (if the source is trusted), then
/// HTTP on the socket itself.
async fn serve_plain(
    mut stream: TcpStream,
    listener: &Arc<ListenerState>,
    state: &Arc<State>,
    shared: &Arc<Shared>,
) {
    let deadline = Instant::now() + listener.handshake_timeout;
    let Some((client, _, initial)) = preface(&mut stream, listener, shared, deadline).await else {
        return;
    };
    let trusted_forwarder = !listener.proxy_from.is_empty()
        && stream
            .peer_addr()
            .is_ok_and(|peer| listener.proxy_from.contains(peer.ip()));
    let conn = crate::http::Conn {
        client,
        trusted_forwarder,
        server_name: None,
        alpn: None,
        tls: false,
        client_certificate: None,
        listener: Arc::clone(listener),
        state: Arc::clone(state),
        shared: Arc::clone(shared),
    };
    crate::http::serve(crate::http::Prefixed::new(initial, stream), conn).await;
}

/// A connection ready for its record session.
struct Proxied<'a> {
    ctx: pump::Context<'a>,
    receiver: session::Receiver,
    sender: Sender,
    backend: crate::pool::BackendStream,
    early: Vec<u8>,
    /// The backend server's (none in HTTP mode: requests hold their own).
    lease: Option<crate::pool::Lease>,
    /// HTTP mode: hyper serving the other end of `backend`, the in-memory pipe.
    http: Option<crate::http::Serving>,
}

/// Handshake, route and backend connect; `None` when the connection ended there (after
/// an alert where one is due).
async fn establish<'a>(
    stream: &mut TcpStream,
    listener_arc: &Arc<ListenerState>,
    state_arc: &Arc<State>,
    shared: &'a Arc<Shared>,
) -> Option<Proxied<'a>> {
    let (listener, state) = (&**listener_arc, &**state_arc);
    let listener_tls = listener.tls.as_ref()?;
    // The PROXY header and the handshake share the handshake timeout.
    let deadline = Instant::now() + listener.handshake_timeout;
    let (client, local, initial) = preface(stream, listener, shared, deadline).await?;
    let trusted_forwarder = !listener.proxy_from.is_empty()
        && stream
            .peer_addr()
            .is_ok_and(|peer| listener.proxy_from.contains(peer.ip()));
    let mut established = match Box::pin(tokio::time::timeout_at(
        deadline,
        tls::handshake(stream, listener_tls, initial),
    ))
    .await
    {
        Ok(Ok(established)) => established,
        Ok(Err(error)) => {
            shared.stats.handshake_failures.inc(error.kind());
            if let Some(alert) = tls::client_certificate_refusal(&error) {
                let result = snake_case(alert);
                shared.stats.client_certificates.inc(&result);
                // Refused already: a full audit queue cannot refuse it more.
                audit(shared, || crate::audit::Record {
                    event: "connection",
                    listener: &listener.name,
                    client: client.to_string(),
                    sni: None,
                    certificate: None,
                    route: None,
                    method: None,
                    path: None,
                    rule: None,
                    result: &result,
                    backend: None,
                })
                .await;
            }
            if let Some(alert) = error.alert_sent() {
                shared.stats.alerts_sent.inc(&format!("{alert:?}"));
            }
            tracing::info!(%error, "handshake failed");
            return None;
        }
        Err(_) => {
            shared.stats.handshake_failures.inc("timeout");
            tracing::info!("handshake timed out");
            return None;
        }
    };
    let kind = if established.resumed {
        "resumed"
    } else {
        "full"
    };
    let version = match established.version {
        Version::Tls12 => "TLSv1_2",
        Version::Tls13 => "TLSv1_3",
    };
    shared
        .stats
        .handshakes
        .inc(&format!("{kind} {version} {}", established.suite));
    tracing::debug!(
        sni = established.server_name.as_deref().unwrap_or(""),
        suite = %established.suite,
        kind,
        "handshake complete"
    );
    // Client certificates: refused ones get their alert once the record layer is up.
    let identity = listener_tls.client_identity(&established);
    match &identity {
        Ok(Some(_)) => shared.stats.client_certificates.inc("verified"),
        Ok(None) if listener_tls.client_auth.is_some() => {
            shared.stats.client_certificates.inc("none")
        }
        Ok(None) => {}
        Err(alert) => {
            shared.stats.client_certificates.inc(&snake_case(*alert));
            tracing::info!(?alert, "client certificate refused");
        }
    }
    let alpn = established
        .alpn
        .as_deref()
        .map(|a| String::from_utf8_lossy(a).into_owned());
    let server_name = established.server_name.clone();
    let routed = crate::route::route(state, listener, server_name.as_deref(), alpn.as_deref());
    let proxy_header = routed
        .as_ref()
        .filter(|r| r.pool.proxy_protocol == crate::config::ProxyProtocol::V2)
        .map(|_| {
            let cipher = established
                .suite
                .strip_prefix("TLS13_")
                .map_or_else(|| established.suite.clone(), |rest| format!("TLS_{rest}"));
            proxy_protocol::v2_header(
                client,
                local,
                &proxy_protocol::TlsValues {
                    server_name: established.server_name.as_deref(),
                    alpn: established.alpn.as_deref(),
                    version: match established.version {
                        Version::Tls12 => "TLSv1.2",
                        Version::Tls13 => "TLSv1.3",
                    },
                    cipher: &cipher,
                    client_certificate: identity.as_ref().ok().and_then(Option::as_deref),
                    resumed: established.resumed,
                },
            )
        });
    let early = std::mem::take(&mut established.early_plaintext);
    let settings = Settings {
        limits: state.limits,
        rekey_after: state.rekey_after,
    };
    let (receiver, mut sender) = match session::start(established, settings) {
        Ok(halves) => halves,
        Err(error) => {
            tracing::error!(%error, "record layer set-up failed");
            return None;
        }
    };
    let ctx = pump::Context {
        shared,
        queue_number: shared.offload.as_ref().map_or(0, |o| o.assign()),
        policy: state.policy,
        idle_timeout: listener.idle_timeout,
    };
    // What the audit log says of this connection's decision.
    let record = |result: &'static str, rule: Option<usize>| crate::audit::Record {
        event: "connection",
        listener: &listener.name,
        client: client.to_string(),
        sni: server_name.as_deref(),
        certificate: identity
            .as_ref()
            .ok()
            .and_then(Option::as_deref)
            .map(Into::into),
        route: routed.as_ref().map(|r| r.pool.name.as_str()),
        method: None,
        path: None,
        rule,
        result,
        backend: None,
    };
    if let Err(alert) = &identity {
        let result = snake_case(*alert);
        audit(shared, || {
            let mut refused = record("", None);
            refused.result = &result;
            refused
        })
        .await;
    } else if listener.http && !audit(shared, || record("allow", None)).await {
        // The audit log could not take the decision: the client is not let in.
        refuse(&ctx, &mut sender, stream, AlertDescription::InternalError).await;
        return None;
    }
    let identity = match identity {
        Ok(identity) => identity,
        Err(alert) => {
            refuse(&ctx, &mut sender, stream, alert).await;
            return None;
        }
    };
    if listener.http {
        // The requests are routed one by one; the pump's backend is the HTTP server.
        let (pipe, serving) = crate::http::start(crate::http::Conn {
            client,
            trusted_forwarder,
            server_name: server_name.clone(),
            alpn: alpn.clone(),
            tls: true,
            client_certificate: identity,
            listener: Arc::clone(listener_arc),
            state: Arc::clone(state_arc),
            shared: Arc::clone(shared),
        });
        return Some(Proxied {
            ctx,
            receiver,
            sender,
            backend: crate::pool::BackendStream::Stream(Box::new(pipe)),
            early,
            lease: None,
            http: Some(serving),
        });
    }
    let Some(crate::route::Routed { pool, acl }) = routed else {
        shared.stats.unrouted.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("no route and no default pool");
        refuse(&ctx, &mut sender, stream, AlertDescription::InternalError).await;
        return None;
    };
    // Access rules, once for the connection; each decision goes to the audit log.
    let decision = acl
        .as_ref()
        .map(|acl| acl.decide(identity.as_deref(), client.ip()));
    let rule = decision.and_then(|d| d.rule);
    let record = |result: &'static str, backend: Option<String>| {
        let mut record = audit_record(
            &listener.name,
            client,
            server_name.as_deref(),
            identity.as_deref(),
            &pool.name,
        );
        record.rule = rule;
        record.result = result;
        record.backend = backend;
        record
    };
    if let Some(decision) = decision {
        shared.stats.acl_decisions.inc(decision.label());
        if !decision.allowed {
            tracing::info!(rule = ?decision.rule, "connection denied by an access rule");
            audit(shared, || record("deny", None)).await;
            refuse(&ctx, &mut sender, stream, AlertDescription::AccessDenied).await;
            return None;
        }
    }
    let (lease, backend) = match pool.connect(proxy_header.as_deref()).await {
        Ok(connected) => connected,
        Err(error) => {
            shared
                .stats
                .backend_unavailable
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%error, "no backend");
            // Let in by the rules, with no server to go to: recorded without a backend.
            audit(shared, || record("allow", None)).await;
            refuse(&ctx, &mut sender, stream, AlertDescription::InternalError).await;
            return None;
        }
    };
    tracing::debug!(backend = %lease.backend().address, "backend connected");
    let server = &lease.backend().address;
    if !audit(shared, || record("allow", Some(server.clone()))).await {
        refuse(&ctx, &mut sender, stream, AlertDescription::InternalError).await;
        return None;
    }
    Some(Proxied {
        ctx,
        receiver,
        sender,
        backend,
        early,
        lease: Some(lease),
        http: None,
    })
}

/// The client's and the listener's addresses, and the client bytes already read, once the
/// connection's start has been checked: a listener with `accept_proxy_from` takes them from
/// the PROXY header a trusted source must send, and refuses one from any other source.
/// `None` when the connection ends here (counted in `tlsaccel_proxy_headers_total`).
async fn preface(
    stream: &mut TcpStream,
    listener: &ListenerState,
    shared: &Shared,
    deadline: Instant,
) -> Option<(SocketAddr, SocketAddr, Vec<u8>)> {
    let (peer, local) = (stream.peer_addr().ok()?, stream.local_addr().ok()?);
    let trusted = &listener.proxy_from;
    if trusted.is_empty() {
        return Some((peer, local, Vec::new()));
    }
    let refuse = |result: &str, why: &dyn std::fmt::Display| {
        shared.stats.proxy_headers.inc(result);
        tracing::info!(%why, "connection refused at its PROXY header");
        None
    };
    if !trusted.contains(peer.ip()) {
        // Only a trusted load balancer may say who the client is.
        let mut start = [0u8; 12];
        return match tokio::time::timeout_at(deadline, stream.peek(&mut start)).await {
            Ok(Ok(n)) if proxy_protocol::looks_like_header(&start[..n]) => refuse(
                "untrusted",
                &format_args!("a PROXY header from {peer}, not a trusted source"),
            ),
            Ok(Ok(_)) => Some((peer, local, Vec::new())),
            Ok(Err(_)) => None,
            Err(_) => {
                shared.stats.handshake_failures.inc("timeout");
                None
            }
        };
    }
    let mut input = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        match proxy_protocol::parse(&input) {
            Parsed::Incomplete => {}
            Parsed::Header {
                len,
                source,
                destination,
            } => {
                shared.stats.proxy_headers.inc("accepted");
                let client = source.unwrap_or(peer);
                tracing::Span::current().record("client", tracing::field::display(client));
                let rest = input.split_off(len);
                return Some((client, destination.unwrap_or(local), rest));
            }
            Parsed::Invalid(why) => {
                let result = if proxy_protocol::looks_like_header(&input) {
                    "invalid"
                } else {
                    "missing"
                };
                return refuse(result, &why);
            }
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => input.extend_from_slice(&chunk[..n]),
            Err(_) => return refuse("timeout", &"no complete PROXY header in time"),
        }
    }
}

/// A connection's audit record, its result and rule still to fill in.
fn audit_record<'a>(
    listener: &'a str,
    client: std::net::SocketAddr,
    sni: Option<&'a str>,
    identity: Option<&'a crate::identity::PeerIdentity>,
    route: &'a str,
) -> crate::audit::Record<'a> {
    crate::audit::Record {
        event: "connection",
        listener,
        client: client.to_string(),
        sni,
        certificate: identity.map(Into::into),
        route: Some(route),
        method: None,
        path: None,
        rule: None,
        result: "",
        backend: None,
    }
}

/// Hands the record `make` builds to the audit log, if there is one (without one, nothing
/// is built); `false` when the log could not take it and the decision must be refused.
pub async fn audit<'a>(shared: &Shared, make: impl FnOnce() -> crate::audit::Record<'a>) -> bool {
    match &shared.audit {
        Some(log) => log.record(&make()).await,
        None => true,
    }
}

/// An alert's name as RFC 8446 writes it (`certificate_required`).
fn snake_case(alert: AlertDescription) -> String {
    let mut out = String::new();
    let mut lower_before = false;
    for c in format!("{alert:?}").chars() {
        if c.is_ascii_uppercase() && lower_before {
            out.push('_');
        }
        lower_before = c.is_ascii_lowercase();
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// Ends a client's connection with `alert` (`internal_error`: nobody can serve it), written
/// within the linger time.
async fn refuse(
    ctx: &pump::Context<'_>,
    sender: &mut Sender,
    stream: &mut TcpStream,
    alert: AlertDescription,
) {
    let device = ctx.shared.record_device(ctx.queue_number);
    let engines = Engines {
        device: device.as_ref(),
        policy: ctx.policy,
        stats: &ctx.shared.records,
    };
    let sealed = sender.seal(vec![Outgoing::Alert(alert)], engines).await;
    for alert in &sealed.alerts {
        ctx.shared.stats.alerts_sent.inc(&format!("{alert:?}"));
    }
    let bytes: Vec<u8> = sealed
        .records
        .into_iter()
        .flat_map(crate::record::Chunk::into_heap)
        .collect();
    let _ = tokio::time::timeout(pump::LINGER, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await;
}
