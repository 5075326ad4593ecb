//! Listeners: binding with the configured socket options, and the accept loop that holds a
//! connection permit for each connection until it has ended.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::Instrument as _;

use crate::config;
use crate::serve::Shared;

pub fn bind(listener: &config::Listener) -> anyhow::Result<TcpListener> {
    let address: SocketAddr = listener.address.get_ref().parse()?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if let Some(mss) = &listener.tcp_mss {
        socket.set_tcp_mss(*mss.get_ref())?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    Ok(TcpListener::from_std(socket.into())?)
}

pub async fn accept_loop(
    socket: TcpListener,
    name: String,
    limit: Arc<Semaphore>,
    shared: Arc<Shared>,
) {
    loop {
        // At the limit, further connections wait in the kernel's accept queue.
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
            return;
        };
        let (stream, peer) = match socket.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::error!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = shared.state();
        let Some(listener) = state.listeners.get(&name).cloned() else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        if let Some(idle) = listener.keepalive {
            let keepalive = socket2::TcpKeepalive::new().with_time(idle);
            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        shared
            .stats
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        shared
            .stats
            .connections_active
            .fetch_add(1, Ordering::Relaxed);
        // `client`: the address a trusted PROXY header gave.
        let span = tracing::info_span!(
            "conn",
            id,
            %peer,
            client = tracing::field::Empty,
            listener = %name
        );
        let shared = Arc::clone(&shared);
        tokio::spawn(
            async move {
                crate::connection::serve(stream, listener, state, &shared).await;
                drop(permit);
                shared
                    .stats
                    .connections_closed
                    .fetch_add(1, Ordering::Relaxed);
                if shared
                    .stats
                    .connections_active
                    .fetch_sub(1, Ordering::Relaxed)
                    == 1
                {
                    shared.drained.notify_waiters();
                }
            }
            .instrument(span),
        );
    }
}
