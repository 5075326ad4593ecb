//! Routing: which pool serves a connection (by listener, SNI and ALPN) or, in HTTP mode, a
//! request (also by host and path prefix).

use std::sync::Arc;

use crate::acl::Acl;
use crate::pool::Pool;
use crate::serve::{ListenerState, State};

/// One `[[route]]` of the configuration.
#[derive(Debug)]
pub struct RouteRule {
    pub listener: String,
    pub sni: Option<String>,
    pub alpn: Option<String>,
    /// Lower case.
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    pub pool: String,
    /// Who may use it; `None`: everyone.
    pub acl: Option<Arc<Acl>>,
}

/// A route's choice: the pool, and the rules a client must pass to use it (the route's, or
/// the listener's for its default pool).
#[derive(Debug, Clone)]
pub struct Routed {
    pub pool: Arc<Pool>,
    pub acl: Option<Arc<Acl>>,
}

/// Picks the pool: the first route matching listener, SNI and ALPN, else the default.
pub fn route(
    state: &State,
    listener: &ListenerState,
    sni: Option<&str>,
    alpn: Option<&str>,
) -> Option<Routed> {
    route_request(state, listener, sni, alpn, None)
}

/// A request's host (lower case, without its port) and path.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub host: Option<&'a str>,
    pub path: &'a str,
}

/// Picks the pool of a connection, or with `target` of an HTTP request: the first route
/// matching all it names, else the listener's default pool. Routes that name a host or a
/// path prefix match requests only.
pub fn route_request(
    state: &State,
    listener: &ListenerState,
    sni: Option<&str>,
    alpn: Option<&str>,
    target: Option<Target<'_>>,
) -> Option<Routed> {
    let rule = state.routes.iter().find(|r| {
        r.listener == listener.name
            && r.sni
                .as_deref()
                .is_none_or(|s| sni.is_some_and(|n| n.eq_ignore_ascii_case(s)))
            && r.alpn.as_deref().is_none_or(|a| alpn == Some(a))
            && r.host
                .as_deref()
                .is_none_or(|h| target.and_then(|t| t.host) == Some(h))
            && r.path_prefix
                .as_deref()
                .is_none_or(|p| target.is_some_and(|t| t.path.starts_with(p)))
    });
    let (name, acl) = match rule {
        Some(rule) => (rule.pool.as_str(), rule.acl.clone()),
        None => (listener.default_pool.as_deref()?, listener.acl.clone()),
    };
    Some(Routed {
        pool: state.pools.get(name).cloned()?,
        acl,
    })
}
