//! The plain HTTP/1.1 backend every system under test proxies to, on its own thread:
//! `GET /bytes/N` answers N bytes, `POST /upload` reads the body and answers its length,
//! `GET /small` answers 100 bytes.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// Largest `/bytes/N` answered.
const MAX_BYTES: usize = 64 << 20;

/// Starts the backend on a thread of its own; returns its address.
pub fn start() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let address = listener.local_addr()?;
    std::thread::Builder::new()
        .name("compare-backend".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("backend runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let payload = Bytes::from(vec![b'x'; MAX_BYTES]);
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let payload = payload.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            answer(request, payload.clone())
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        })?;
    Ok(address)
}

async fn answer(
    request: Request<Incoming>,
    payload: Bytes,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_owned();
    let body = if let Some(n) = path.strip_prefix("/bytes/") {
        let n = n.parse::<usize>().unwrap_or(0).min(MAX_BYTES);
        payload.slice(..n)
    } else if path == "/upload" {
        let mut body = request.into_body();
        let mut received = 0usize;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => received += frame.data_ref().map_or(0, |d| d.len()),
                Err(_) => break,
            }
        }
        Bytes::from(received.to_string())
    } else {
        payload.slice(..100)
    };
    Ok(Response::new(Full::new(body)))
}
