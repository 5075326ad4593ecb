//! HTTP mode (`mode = "http"` on a listener): HTTP/1.1 and HTTP/2 (by ALPN or the client's
//! preface) served by hyper over the connection's decrypted stream, each request routed by
//! host and path to a pool and sent over that pool's kept-alive backend connections. A
//! request whose body is held (up to `retry_body_bytes`) fails over to another server
//! (`failover`).
//!
//! The record layer stays the daemon's own (device or CPU, with its limits, alerts and key
//! updates): the pump ([`crate::pump`]) treats one end of an in-memory pipe as the
//! connection's backend, and hyper serves the other end, both polled by the connection's
//! one task. What crosses the pipe is plaintext in process memory, bounded by the pipe's
//! size.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::pool::{BackendIo, BackendStream, Lease, Pool};
use crate::route::{self, Target};
use crate::serve::{ListenerState, Shared, State};

/// Bytes the pipe between the record session and hyper holds each way.
const PIPE: usize = 64 * 1024;
/// The largest request head (HTTP/1.1 buffer, HTTP/2 header list): larger ones get 431
/// (RFC 6585 §5) or a stream error, and no more memory.
const MAX_HEAD: usize = 64 * 1024;
/// Header fields in an HTTP/1.1 request at most.
const MAX_FIELDS: usize = 100;
/// Streams an HTTP/2 client may have open at once.
const MAX_STREAMS: u32 = 128;
/// How long a request head may take to arrive.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle backend connections a pool keeps per client (hyper's pool), and for how long.
const IDLE_PER_POOL: usize = 64;
const IDLE_FOR: Duration = Duration::from_secs(60);

/// A body of either side.
pub type Body = BoxBody<Bytes, BoxError>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// hyper-util's pooled client over a pool's servers.
pub type Client = hyper_util::client::legacy::Client<PoolConnector, Body>;

/// What handling a request needs of its connection.
#[derive(Debug)]
pub struct Conn {
    /// The client (as a trusted PROXY header gave it, if one did).
    pub client: SocketAddr,
    /// The direct peer is a trusted load balancer: the forwarding headers it sent are kept
    /// and added to.
    pub trusted_forwarder: bool,
    pub server_name: Option<String>,
    pub alpn: Option<String>,
    /// False on a plain-HTTP listener.
    pub tls: bool,
    /// The client's verified certificate, when the listener asks for one.
    pub client_certificate: Option<Arc<crate::identity::PeerIdentity>>,
    pub listener: Arc<ListenerState>,
    pub state: Arc<State>,
    pub shared: Arc<Shared>,
}

/// hyper serving one connection, to be polled beside its pump.
pub type Serving = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Serves HTTP for one connection: returns the pipe's other end, for the pump to use as
/// the backend, and the future that serves this end (the connection's task polls both).
pub fn start(conn: Conn) -> (tokio::io::DuplexStream, Serving) {
    let (ours, theirs) = tokio::io::duplex(PIPE);
    (theirs, Box::pin(serve(ours, conn)))
}

/// Serves HTTP on `io` (a plain-HTTP listener's connection, or the pipe of [`start`]) until
/// either side ends it.
pub async fn serve<I>(io: I, conn: Conn)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(conn);
    let service = hyper::service::service_fn(move |request| {
        let conn = Arc::clone(&conn);
        async move { Ok::<_, Infallible>(handle(request, &conn).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .max_headers(MAX_FIELDS);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEAD as u32);
    if let Err(error) = builder.serve_connection(TokioIo::new(io), service).await {
        tracing::debug!(%error, "HTTP connection ended with an error");
    }
}

/// One request: routed, forwarded, answered.
async fn handle(request: Request<Incoming>, conn: &Conn) -> Response<Body> {
    let response = forward(request, conn).await;
    let class = match response.status().as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    conn.shared.stats.http_responses.inc(class);
    response
}

async fn forward(request: Request<Incoming>, conn: &Conn) -> Response<Body> {
    use hyper::body::Body as _;
    let (mut parts, body) = request.into_parts();
    // The inspection point: the listener's rules, before anything else.
    if let Some(rules) = &conn.listener.inspect {
        let declared = body.size_hint().exact();
        if let Err(rule) = rules.check(&parts.method, parts.uri.path(), &parts.headers, declared) {
            conn.shared.stats.http_refused.inc(rule.as_str());
            tracing::debug!(
                rule = rule.as_str(),
                "request refused by an inspection rule"
            );
            let mut response = status(rule.status(), "refused by this server's rules\n");
            if rule == crate::inspect::Rule::Method {
                if let Ok(allow) = HeaderValue::from_str(&rules.allow()) {
                    response.headers_mut().insert(header::ALLOW, allow);
                }
            }
            return response;
        }
    }
    let host = request_host(&parts.uri, &parts.headers);
    let target = Target {
        host: host.as_deref(),
        path: parts.uri.path(),
    };
    let Some(routed) = route::route_request(
        &conn.state,
        &conn.listener,
        conn.server_name.as_deref(),
        conn.alpn.as_deref(),
        Some(target),
    ) else {
        // RFC 9110 §15.5.20: this server does not answer for that target.
        return status(
            StatusCode::MISDIRECTED_REQUEST,
            "no route for this host and path\n",
        );
    };
    if let Some(acl) = &routed.acl {
        let decision = acl.decide(conn.client_certificate.as_deref(), conn.client.ip());
        conn.shared.stats.acl_decisions.inc(decision.label());
        let record = || crate::audit::Record {
            event: "request",
            listener: &conn.listener.name,
            client: conn.client.to_string(),
            sni: conn.server_name.as_deref(),
            certificate: conn.client_certificate.as_deref().map(Into::into),
            route: Some(&routed.pool.name),
            method: Some(parts.method.as_str()),
            path: Some(crate::audit::short_path(parts.uri.path())),
            rule: decision.rule,
            result: decision.label(),
            backend: None,
        };
        if !crate::connection::audit(&conn.shared, record).await {
            return retry_later(Duration::from_secs(1));
        }
        if !decision.allowed {
            tracing::info!(rule = ?decision.rule, path = parts.uri.path(), "request denied by an access rule");
            return status(
                StatusCode::FORBIDDEN,
                "denied by this server's access rules\n",
            );
        }
    }
    let pool = routed.pool;
    remove_hop_by_hop(&mut parts.headers);
    set_client_certificate(&mut parts.headers, conn);
    let Some(cache) = conn.listener.cache.as_ref() else {
        return send(parts, body, &pool, host.as_deref(), conn).await;
    };
    // The response cache: a fresh entry answers here; a stale one is revalidated.
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut view = crate::cache::view(
        &parts.method,
        host.as_deref().unwrap_or(""),
        target,
        &parts.headers,
    );
    if conn.client_certificate.is_some() {
        // A request made with a client certificate is an authenticated one (RFC 9111
        // §3.5): its answer is shared only when the backend says it may be.
        view.headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("client-certificate"),
        );
    }
    let mut revalidating = None;
    match cache.lookup(&view) {
        crate::cache::Lookup::Fresh(head, bytes) => return cached(head, bytes),
        crate::cache::Lookup::Stale(entry, validators) => {
            for (name, value) in &validators {
                parts.headers.insert(name, value.clone());
            }
            revalidating = Some(entry);
        }
        crate::cache::Lookup::Miss => {}
    }
    let response = send(parts, body, &pool, host.as_deref(), conn).await;
    if let Some(entry) = revalidating {
        if let Some((head, bytes)) =
            cache.revalidated(&view, &entry, response.status(), response.headers())
        {
            return cached(head, bytes);
        }
    }
    cache.after_unsafe(&view, response.status());
    let (head, body) = response.into_parts();
    if !cache.wants(&view, &head, body.size_hint().exact()) {
        return Response::from_parts(head, body);
    }
    match body.collect().await {
        Ok(collected) => {
            let bytes = collected.to_bytes();
            cache.store(&view, &head, bytes.clone());
            Response::from_parts(head, full(bytes))
        }
        Err(error) => {
            tracing::warn!(pool = %pool.name, %error, "backend response body failed");
            status(StatusCode::BAD_GATEWAY, "the backend did not answer\n")
        }
    }
}

/// A body of bytes in hand.
fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// An answer from the cache.
fn cached(head: http::response::Parts, bytes: Bytes) -> Response<Body> {
    Response::from_parts(head, full(bytes))
}

/// Sends a routed request to its pool (admission, held body and failover, or streamed)
/// and returns the answer for the client.
async fn send(
    mut parts: http::request::Parts,
    body: Incoming,
    pool: &Arc<Pool>,
    host: Option<&str>,
    conn: &Conn,
) -> Response<Body> {
    let pool = Arc::clone(pool);
    if !parts.headers.contains_key(header::HOST) {
        // HTTP/2 carries the host in :authority; HTTP/1.1 backends need it as Host.
        if let Some(value) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(header::HOST, value);
        }
    }
    add_forwarding(&mut parts.headers, conn, host);
    // Priority: a request of a level held back waits for a place or is refused.
    let level = pool
        .admission
        .levels()
        .classify(conn.client.ip(), conn.listener.priority);
    let _ticket = match pool.admission.admit(level).await {
        Ok(ticket) => ticket,
        Err(why) => {
            tracing::debug!(pool = %pool.name, level, reason = why.as_str(), "request not admitted");
            let wait = pool.admission.levels().get(level).max_wait;
            return retry_later(wait);
        }
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    use tower::retry::budget::Budget as _;
    pool.retry.budget.deposit();
    let head = Head {
        method: parts.method,
        path,
        headers: parts.headers,
    };
    match hold_body(body, pool.retry.body_bytes, &conn.state.buffers).await {
        Ok(Held::Body(held)) => {
            let bytes = held.as_ref().map_or_else(Bytes::new, |h| h.to_bytes());
            // The chunks stay held until the answer: another try may need them.
            let response = failover(&pool, &head, bytes, conn).await;
            drop(held);
            response
        }
        Ok(Held::Incomplete) => {
            status(StatusCode::BAD_REQUEST, "the request body did not arrive\n")
        }
        Ok(Held::NoRoom) => {
            tracing::warn!("the HTTP buffer pool stayed full; request refused");
            retry_later(Duration::from_secs(1))
        }
        Err(streamed) => {
            // Too long to hold: sent once, to the server the pool's connect chooses; cut
            // at the listener's body limit, if it has one.
            // A body that fails on the client's side (malformed chunks, cut short, over
            // the limit) is the client's error, not the backend's.
            let client_failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = Arc::clone(&client_failed);
            let noted = move |error: BoxError| {
                flag.store(true, Ordering::Relaxed);
                error
            };
            let limit = conn
                .listener
                .inspect
                .as_ref()
                .and_then(|r| r.max_body_bytes);
            let body = match limit {
                Some(max) => crate::inspect::limit_body(streamed, max)
                    .map_err(noted)
                    .boxed(),
                None => streamed.map_err(move |e| noted(e.into())).boxed(),
            };
            let Some(request) = head.request("any", body) else {
                return status(StatusCode::BAD_REQUEST, "bad request target\n");
            };
            let started = Instant::now();
            match crate::upstream::send(&pool, None, request).await {
                Ok(response) => {
                    pool.admission
                        .response_time
                        .observe(started.elapsed(), Instant::now());
                    from_backend(response)
                }
                Err(error) if over_body_limit(&error) => {
                    conn.shared
                        .stats
                        .http_refused
                        .inc(crate::inspect::Rule::Body.as_str());
                    status(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "refused by this server's rules\n",
                    )
                }
                Err(error) if client_failed.load(Ordering::Relaxed) => {
                    tracing::debug!(%error, "the client's request body failed");
                    conn.shared.stats.http_backend_errors.inc("client_body");
                    status(
                        StatusCode::BAD_REQUEST,
                        "the request body was malformed or cut short\n",
                    )
                }
                Err(error) => backend_failed(&pool, conn, &error),
            }
        }
    }
}

/// True when a request failed because its body passed the listener's limit.
fn over_body_limit(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// What is sent of a request again on each try.
struct Head {
    method: hyper::Method,
    /// Path and query.
    path: String,
    headers: HeaderMap,
}

impl Head {
    /// The request for `server` (`s<index>`, or `any` for the pool's choice).
    fn request(&self, server: &str, body: Body) -> Option<Request<Body>> {
        let mut request = Request::builder()
            .method(self.method.clone())
            .uri(format!("http://{server}{}", self.path))
            .version(hyper::Version::HTTP_11)
            .body(body)
            .ok()?;
        *request.headers_mut() = self.headers.clone();
        Some(request)
    }
}

/// What became of a body to hold.
enum Held {
    /// All of it, in the buffer pool's chunks (`None`: no body).
    Body(Option<crate::buffers::Held>),
    /// The client did not finish sending it (or sent more than it said).
    Incomplete,
    /// The buffer pool stayed full.
    NoRoom,
}

/// The body, held in the shared buffer pool when it is known to be at most `limit`
/// bytes; `Err` gives back a longer or unknown-length body to stream.
async fn hold_body(
    mut body: Incoming,
    limit: usize,
    buffers: &Arc<crate::buffers::BufferPool>,
) -> Result<Held, Incoming> {
    use hyper::body::Body as _;
    let size = match body.size_hint().upper() {
        Some(n) if n <= limit as u64 => n as usize,
        _ => return Err(body),
    };
    if size == 0 && body.is_end_stream() {
        return Ok(Held::Body(None));
    }
    let Some(mut held) = buffers.take(size).await else {
        return Ok(Held::NoRoom);
    };
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Ok(Held::Incomplete);
        };
        if let Ok(data) = frame.into_data() {
            if !held.push(&data) {
                return Ok(Held::Incomplete);
            }
        }
    }
    Ok(Held::Body(Some(held)))
}

/// Sends a request whose body is held, moving on to another server (RFC 9110 §9.2.2) when
/// the server could not be reached (any request: nothing of it was sent), or, for an
/// idempotent request, when the exchange failed or the answer is one of the pool's
/// `retry_on` statuses. Each server is tried once; each try after the first needs the
/// pool's retry budget.
async fn failover(pool: &Arc<Pool>, head: &Head, body: Bytes, conn: &Conn) -> Response<Body> {
    use tower::retry::budget::Budget as _;
    let idempotent = head.method.is_idempotent();
    let mut tried = Vec::new();
    let mut kept: Option<Response<Incoming>> = None;
    let mut last_error: Option<crate::upstream::SendError> = None;
    while let Some(server) = pool.pick(&tried) {
        if !tried.is_empty() {
            if !pool.retry.budget.withdraw() {
                pool.retry.refused.fetch_add(1, Ordering::Relaxed);
                break;
            }
            pool.retry.retries.fetch_add(1, Ordering::Relaxed);
        }
        tried.push(server);
        let full = Full::new(body.clone())
            .map_err(|never| match never {})
            .boxed();
        let Some(request) = head.request(&format!("s{server}"), full) else {
            return status(StatusCode::BAD_REQUEST, "bad request target\n");
        };
        let backend = &pool.backends[server];
        let started = Instant::now();
        let pending = InFlight::new(&backend.requests_in_flight);
        let answer = crate::upstream::send(pool, Some(server), request).await;
        drop(pending);
        if answer.is_ok() {
            // To the response head: the time the server took (a 5xx too).
            let (took, now) = (started.elapsed(), Instant::now());
            backend.response_time.observe(took, now);
            pool.admission.response_time.observe(took, now);
        }
        match answer {
            Ok(response) if idempotent && pool.retry.on.contains(&response.status().as_u16()) => {
                kept = Some(response);
            }
            Ok(response) => return from_backend(response),
            Err(error) if error.is_connect() || idempotent => last_error = Some(error),
            Err(error) => return backend_failed(pool, conn, &error),
        }
    }
    match (kept, last_error) {
        (Some(response), _) => from_backend(response),
        (None, Some(error)) => backend_failed(pool, conn, &error),
        (None, None) => status(StatusCode::SERVICE_UNAVAILABLE, "no server\n"),
    }
}

/// A request counted in flight to a server until dropped (also when the client goes away
/// and the request with it).
struct InFlight<'a>(&'a std::sync::atomic::AtomicU32);

impl<'a> InFlight<'a> {
    fn new(counter: &'a std::sync::atomic::AtomicU32) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A plain-HTTP connection with the bytes already read from it (after a PROXY header) put
/// back in front.
#[derive(Debug)]
pub struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    pub fn new(prefix: Vec<u8>, inner: T) -> Self {
        Self {
            prefix: Bytes::from(prefix),
            inner,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A backend's answer on its way to the client.
fn from_backend(response: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body.map_err(Into::into).boxed())
}

/// No answer from the pool: 503 when no server could be reached, 502 when an exchange
/// failed; counted.
fn backend_failed(pool: &Pool, conn: &Conn, error: &crate::upstream::SendError) -> Response<Body> {
    let (kind, code) = if error.is_connect() {
        ("connect", StatusCode::SERVICE_UNAVAILABLE)
    } else {
        ("exchange", StatusCode::BAD_GATEWAY)
    };
    conn.shared.stats.http_backend_errors.inc(kind);
    tracing::warn!(pool = %pool.name, %error, "backend request failed");
    status(code, "the backend did not answer\n")
}

/// 503 with `Retry-After` (RFC 9110 §10.2.3): the pool is too slow for the request's
/// priority level now.
fn retry_later(wait: Duration) -> Response<Body> {
    let mut response = status(
        StatusCode::SERVICE_UNAVAILABLE,
        "the service is busy; retry later\n",
    );
    let seconds = wait.as_secs().max(1);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

/// A short plain-text answer of the proxy's own.
fn status(code: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = code;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The request's host, lower case, without its port: the URI's authority (HTTP/2, or an
/// absolute-form target), else the Host header.
fn request_host(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    let raw = match uri.authority() {
        Some(authority) => authority.host().to_owned(),
        None => {
            let value = headers.get(header::HOST)?.to_str().ok()?;
            let authority: hyper::http::uri::Authority = value.parse().ok()?;
            authority.host().to_owned()
        }
    };
    Some(raw.to_ascii_lowercase())
}

/// Removes the hop-by-hop fields (RFC 9110 §7.6.1): those the Connection field names, and
/// the ones that are hop-by-hop by definition.
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TE,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// `X-Forwarded-For`, `X-Forwarded-Proto` and RFC 7239 `Forwarded` for the backend. What the
/// client sent of them is dropped, unless the direct peer is a trusted load balancer, whose
/// values are kept and added to.
fn add_forwarding(headers: &mut HeaderMap, conn: &Conn, host: Option<&str>) {
    let x_forwarded_for = HeaderName::from_static("x-forwarded-for");
    let x_forwarded_proto = HeaderName::from_static("x-forwarded-proto");
    if !conn.trusted_forwarder {
        for name in [
            &x_forwarded_for,
            &x_forwarded_proto,
            &HeaderName::from_static("x-forwarded-host"),
            &header::FORWARDED,
        ] {
            headers.remove(name);
        }
    }
    let ip = conn.client.ip();
    let appended = |headers: &HeaderMap, name: &HeaderName, value: String| {
        let joined: Vec<&str> = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if joined.is_empty() {
            value
        } else {
            format!("{}, {value}", joined.join(", "))
        }
    };
    let node = match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    let proto = if conn.tls { "https" } else { "http" };
    let mut forwarded = format!("for={node};proto={proto}");
    if let Some(host) = host {
        forwarded.push_str(&format!(";host=\"{host}\""));
    }
    let values = [
        (
            x_forwarded_for.clone(),
            appended(headers, &x_forwarded_for, ip.to_string()),
        ),
        (
            header::FORWARDED,
            appended(headers, &header::FORWARDED, forwarded),
        ),
    ];
    for (name, value) in values {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    headers.insert(x_forwarded_proto, HeaderValue::from_static(proto));
}

/// `X-Forwarded-Client-Cert`: who the client is, only ever as this proxy verified it. A
/// client's own is removed, also under a name that differs only by `_` for `-` (CGI-style
/// backends read both as one).
fn set_client_certificate(headers: &mut HeaderMap, conn: &Conn) {
    const XFCC: &[u8] = b"x-forwarded-client-cert";
    // Names are lower case already; compared in place, with nothing allocated per field.
    let spoofed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            let name = name.as_str().as_bytes();
            name.len() == XFCC.len()
                && name
                    .iter()
                    .zip(XFCC)
                    .all(|(&a, &b)| a == b || (a == b'_' && b == b'-'))
        })
        .cloned()
        .collect();
    for name in spoofed {
        headers.remove(name);
    }
    if let Some(identity) = &conn.client_certificate {
        let with_certificate = conn
            .listener
            .tls
            .as_ref()
            .and_then(|t| t.client_auth.as_ref())
            .is_some_and(|a| a.forward_certificate);
        if let Ok(value) = HeaderValue::from_str(&identity.xfcc(with_certificate)) {
            headers.insert(HeaderName::from_static("x-forwarded-client-cert"), value);
        }
    }
}

/// The pooled HTTP client of `pool`, whose connections come from the pool's own connect
/// (balancing, retries, health, TLS to the backend).
pub fn client_for(pool: &Arc<Pool>) -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(IDLE_FOR)
        .pool_max_idle_per_host(IDLE_PER_POOL)
        .build(PoolConnector {
            pool: Arc::downgrade(pool),
        })
}

/// Connects hyper's client through a [`Pool`] (held weakly: the pool owns the client).
#[derive(Debug, Clone)]
pub struct PoolConnector {
    pool: Weak<Pool>,
}

impl tower_service::Service<Uri> for PoolConnector {
    type Response = TokioIo<Leased>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    /// `uri`'s host names the server: `s<index>`, or anything else for the pool's choice
    /// (with its connect retries).
    fn call(&mut self, uri: Uri) -> Self::Future {
        let pool = self.pool.clone();
        let server = uri
            .host()
            .and_then(|h| h.strip_prefix('s'))
            .and_then(|i| i.parse::<usize>().ok());
        Box::pin(async move {
            let pool = pool
                .upgrade()
                .ok_or_else(|| std::io::Error::other("the pool was reloaded away"))?;
            let (lease, stream) = match server {
                Some(i) => pool.connect_server(i, None).await?,
                None => pool.connect(None).await.map_err(std::io::Error::other)?,
            };
            let io: Box<dyn BackendIo> = match stream {
                BackendStream::Tcp(tcp) => Box::new(tcp),
                BackendStream::Stream(io) => io,
            };
            Ok(TokioIo::new(Leased { io, _lease: lease }))
        })
    }
}

/// A backend connection and its hold on the server (counted active while it is open).
pub struct Leased {
    io: Box<dyn BackendIo>,
    _lease: Lease,
}

impl std::fmt::Debug for Leased {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leased")
            .field("server", &self._lease.backend().address)
            .finish_non_exhaustive()
    }
}

impl Connection for Leased {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Leased {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Leased {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_fields_go_and_the_rest_stay() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert("x-kept", HeaderValue::from_static("yes"));
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key("x-kept"));
    }

    #[test]
    fn the_host_comes_from_the_authority_or_the_host_field_without_port_or_case() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("App.Example:8443"));
        assert_eq!(
            request_host(&Uri::from_static("/x"), &headers).as_deref(),
            Some("app.example")
        );
        assert_eq!(
            request_host(&Uri::from_static("https://Other.Example/x"), &headers).as_deref(),
            Some("other.example")
        );
        assert_eq!(
            request_host(&Uri::from_static("/x"), &HeaderMap::new()),
            None
        );
    }
}
