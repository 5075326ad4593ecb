//! How HTTP mode sends a request to a pool's server: over hyper-util's pooled HTTP/1.1
//! client, or, for a pool with `http_version = "2"`, over one multiplexed HTTP/2 connection
//! per server (h2c with prior knowledge to a plain pool, ALPN `h2` to a TLS pool), made on
//! first use and made again once it has closed.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::http::Body;
use crate::pool::{BackendIo, BackendStream, Pool};

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection to a server could be made: nothing of the request was sent.
    #[error("connect: {0}")]
    Connect(#[source] std::io::Error),
    /// The exchange failed (the request may have reached the server).
    #[error("exchange: {0}")]
    Exchange(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl SendError {
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_))
    }

    fn from_legacy(error: hyper_util::client::legacy::Error) -> Self {
        if error.is_connect() {
            SendError::Connect(std::io::Error::other(error))
        } else {
            SendError::Exchange(Box::new(error))
        }
    }
}

/// A pool's HTTP/2 connections, one per server.
#[derive(Debug, Default)]
pub struct H2Connections {
    slots: Vec<tokio::sync::Mutex<Option<hyper::client::conn::http2::SendRequest<Body>>>>,
}

impl H2Connections {
    pub fn new(servers: usize) -> Self {
        Self {
            slots: (0..servers)
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
        }
    }

    /// A sender on server `i`'s connection, connecting first when there is none open.
    async fn sender(
        &self,
        pool: &Pool,
        i: usize,
    ) -> Result<hyper::client::conn::http2::SendRequest<Body>, SendError> {
        let slot = self
            .slots
            .get(i)
            .ok_or_else(|| SendError::Connect(std::io::Error::other("no such server")))?;
        let mut slot = slot.lock().await;
        if let Some(sender) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(sender.clone());
        }
        let (lease, stream) = pool
            .connect_server(i, None)
            .await
            .map_err(SendError::Connect)?;
        let io: Box<dyn BackendIo> = match stream {
            BackendStream::Tcp(tcp) => Box::new(tcp),
            BackendStream::Stream(io) => io,
        };
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(std::time::Duration::from_secs(30))
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| SendError::Connect(std::io::Error::other(e)))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "HTTP/2 backend connection ended");
            }
            // The server counts as connected while the connection lives.
            drop(lease);
        });
        *slot = Some(sender.clone());
        Ok(sender)
    }
}

/// Sends `request` (its URI `http://s<i>/target` or `http://any/target`, its `Host` the
/// client's) to server `server` of `pool`, or to the one the pool's connect picks.
pub async fn send(
    pool: &Arc<Pool>,
    server: Option<usize>,
    mut request: Request<Body>,
) -> Result<Response<Incoming>, SendError> {
    let Some(h2) = pool.h2.as_ref() else {
        let client = pool.http_client();
        return client
            .request(request)
            .await
            .map_err(SendError::from_legacy);
    };
    let i = match server {
        Some(i) => i,
        None => pool
            .pick(&[])
            .ok_or_else(|| SendError::Connect(std::io::Error::other("no server")))?,
    };
    let mut sender = h2.sender(pool, i).await?;
    // HTTP/2 names the target by :scheme and :authority (the client's host), not Host.
    let scheme = if pool.is_tls() { "https" } else { "http" };
    let authority = request
        .headers_mut()
        .remove(hyper::header::HOST)
        .and_then(|h| h.to_str().ok().map(str::to_owned))
        .unwrap_or_else(|| "localhost".to_owned());
    let target = request
        .uri()
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    *request.uri_mut() = format!("{scheme}://{authority}{target}")
        .parse()
        .map_err(|e| SendError::Exchange(Box::new(e)))?;
    *request.version_mut() = hyper::Version::HTTP_2;
    sender
        .ready()
        .await
        .map_err(|e| SendError::Exchange(Box::new(e)))?;
    sender
        .send_request(request)
        .await
        .map_err(|e| SendError::Exchange(Box::new(e)))
}
