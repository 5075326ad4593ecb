//! Routing: which pool serves a connection, by listener, SNI and ALPN.

use std::sync::Arc;

use crate::pool::Pool;
use crate::serve::{ListenerState, State};

/// One `[[route]]` of the configuration.
#[derive(Debug)]
pub struct RouteRule {
    pub listener: String,
    pub sni: Option<String>,
    pub alpn: Option<String>,
    pub pool: String,
}

/// Picks the pool: the first route matching listener, SNI and ALPN, else the default.
pub fn route(
    state: &State,
    listener: &ListenerState,
    sni: Option<&str>,
    alpn: Option<&str>,
) -> Option<Arc<Pool>> {
    let rule = state.routes.iter().find(|r| {
        r.listener == listener.name
            && r.sni
                .as_deref()
                .is_none_or(|s| sni.is_some_and(|n| n.eq_ignore_ascii_case(s)))
            && r.alpn.as_deref().is_none_or(|a| alpn == Some(a))
    });
    let name = rule
        .map(|r| r.pool.as_str())
        .or(listener.default_pool.as_deref())?;
    state.pools.get(name).cloned()
}
