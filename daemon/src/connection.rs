//! One client connection from accept to close: handshake ([`crate::tls`]) → route
//! ([`crate::route`]) → connect to a backend ([`crate::pool`]) → the record session
//! ([`crate::session`]) driven by the pump ([`crate::pump`]) until both sides have closed.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use rustls::AlertDescription;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::pump;
use crate::record::Version;
use crate::serve::{ListenerState, Shared, State};
use crate::session::{self, Engines, Outgoing, Sender, Settings};
use crate::tls;

/// Serves one accepted connection to its end.
pub async fn serve(
    mut stream: TcpStream,
    listener: Arc<ListenerState>,
    state: Arc<State>,
    shared: &Arc<Shared>,
) {
    // The handshake's and the backend connect's futures are large and short-lived: they
    // live on the heap for their moment, so an established connection's task stays small.
    let mut established = match Box::pin(tokio::time::timeout(
        listener.handshake_timeout,
        tls::handshake(&mut stream, &listener.tls),
    ))
    .await
    {
        Ok(Ok(established)) => established,
        Ok(Err(error)) => {
            shared.stats.handshake_failures.inc(error.kind());
            if let Some(alert) = error.alert_sent() {
                shared.stats.alerts_sent.inc(&format!("{alert:?}"));
            }
            tracing::info!(%error, "handshake failed");
            return;
        }
        Err(_) => {
            shared.stats.handshake_failures.inc("timeout");
            tracing::info!("handshake timed out");
            return;
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
    let alpn = established
        .alpn
        .as_deref()
        .map(|a| String::from_utf8_lossy(a).into_owned());
    let pool = crate::route::route(
        &state,
        &listener,
        established.server_name.as_deref(),
        alpn.as_deref(),
    );
    let early = std::mem::take(&mut established.early_plaintext);
    let settings = Settings {
        limits: state.limits,
        rekey_after: state.rekey_after,
    };
    let (receiver, mut sender) = match session::start(established, settings) {
        Ok(halves) => halves,
        Err(error) => {
            tracing::error!(%error, "record layer set-up failed");
            return;
        }
    };
    let ctx = pump::Context {
        shared,
        queue_number: shared.offload.as_ref().map_or(0, |o| o.assign()),
        policy: state.policy,
        idle_timeout: listener.idle_timeout,
    };
    let Some(pool) = pool else {
        shared.stats.unrouted.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("no route and no default pool");
        Box::pin(refuse(&ctx, &mut sender, &mut stream)).await;
        return;
    };
    let (lease, backend) = match Box::pin(pool.connect()).await {
        Ok(connected) => connected,
        Err(error) => {
            shared
                .stats
                .backend_unavailable
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%error, "no backend");
            Box::pin(refuse(&ctx, &mut sender, &mut stream)).await;
            return;
        }
    };
    tracing::debug!(backend = %lease.backend().address, "backend connected");
    if let Err(error) = pump::run(ctx, receiver, sender, stream, backend, early).await {
        tracing::info!(%error, "connection ended with an error");
    }
    drop(lease);
}

/// Tells a client nobody can serve it: an `internal_error` alert, written within the
/// linger time.
async fn refuse(ctx: &pump::Context<'_>, sender: &mut Sender, stream: &mut TcpStream) {
    let device = ctx.shared.record_device(ctx.queue_number);
    let engines = Engines {
        device: device.as_ref(),
        policy: ctx.policy,
        stats: &ctx.shared.records,
    };
    let sealed = sender
        .seal(
            vec![Outgoing::Alert(AlertDescription::InternalError)],
            engines,
        )
        .await;
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
