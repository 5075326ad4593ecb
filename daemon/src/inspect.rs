//! HTTP mode's inspection point: rules a listener applies to each decrypted request before
//! it is routed (`[listener.inspect]`). Each refusal is the status RFC 9110 gives it and is
//! counted by rule:
//!
//! | rule | status |
//! |---|---|
//! | `method`: not in `methods` | 405, with `Allow` (RFC 9110 §15.5.6) |
//! | `path`: matches a `deny_paths` pattern, or none of `allow_paths` | 403 |
//! | `header_fields`: more fields than `max_header_fields` | 431 (RFC 6585 §5) |
//! | `header_bytes`: names and values longer than `max_header_bytes` | 431 |
//! | `body`: a declared length over `max_body_bytes` | 413 (RFC 9110 §15.5.14) |
//!
//! A body of unknown length is cut at `max_body_bytes` while it streams ([`limit_body`]):
//! the request fails, and the client gets 413 if no answer has started.
//!
//! The checks are plain functions of the request head.

use hyper::header::HeaderMap;
use hyper::{Method, StatusCode};
use regex::RegexSet;

/// Which rule refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    Method,
    Path,
    HeaderFields,
    HeaderBytes,
    Body,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Method => "method",
            Rule::Path => "path",
            Rule::HeaderFields => "header_fields",
            Rule::HeaderBytes => "header_bytes",
            Rule::Body => "body",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Rule::Method => StatusCode::METHOD_NOT_ALLOWED,
            Rule::Path => StatusCode::FORBIDDEN,
            Rule::HeaderFields | Rule::HeaderBytes => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Rule::Body => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    pub const ALL: [Rule; 5] = [
        Rule::Method,
        Rule::Path,
        Rule::HeaderFields,
        Rule::HeaderBytes,
        Rule::Body,
    ];
}

/// A listener's rules, compiled.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Allowed methods (`None`: any).
    pub methods: Option<Vec<Method>>,
    allow_paths: Option<RegexSet>,
    deny_paths: Option<RegexSet>,
    max_header_fields: Option<usize>,
    max_header_bytes: Option<usize>,
    pub max_body_bytes: Option<u64>,
}

impl Rules {
    /// From the configuration (its patterns and methods checked there).
    pub fn new(config: &crate::config::Inspect) -> anyhow::Result<Self> {
        let set = |patterns: &[String]| -> anyhow::Result<Option<RegexSet>> {
            if patterns.is_empty() {
                Ok(None)
            } else {
                Ok(Some(RegexSet::new(patterns)?))
            }
        };
        let methods = if config.methods.get_ref().is_empty() {
            None
        } else {
            Some(
                config
                    .methods
                    .get_ref()
                    .iter()
                    .map(|m| Method::from_bytes(m.as_bytes()))
                    .collect::<Result<Vec<_>, _>>()?,
            )
        };
        Ok(Self {
            methods,
            allow_paths: set(config.allow_paths.get_ref())?,
            deny_paths: set(config.deny_paths.get_ref())?,
            max_header_fields: config
                .max_header_fields
                .as_ref()
                .map(|v| *v.get_ref() as usize),
            max_header_bytes: config
                .max_header_bytes
                .as_ref()
                .map(|v| *v.get_ref() as usize),
            max_body_bytes: config.max_body_bytes.as_ref().map(|v| *v.get_ref()),
        })
    }

    /// The first rule `method`, `path` (without the query) and `headers` break, if any;
    /// `declared` is the body's declared length.
    pub fn check(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        declared: Option<u64>,
    ) -> Result<(), Rule> {
        if let Some(methods) = &self.methods {
            if !methods.contains(method) {
                return Err(Rule::Method);
            }
        }
        if self.deny_paths.as_ref().is_some_and(|d| d.is_match(path))
            || self.allow_paths.as_ref().is_some_and(|a| !a.is_match(path))
        {
            return Err(Rule::Path);
        }
        if self
            .max_header_fields
            .is_some_and(|max| headers.len() > max)
        {
            return Err(Rule::HeaderFields);
        }
        if let Some(max) = self.max_header_bytes {
            let bytes: usize = headers
                .iter()
                .map(|(name, value)| name.as_str().len() + value.len())
                .sum();
            if bytes > max {
                return Err(Rule::HeaderBytes);
            }
        }
        if let (Some(max), Some(declared)) = (self.max_body_bytes, declared) {
            if declared > max {
                return Err(Rule::Body);
            }
        }
        Ok(())
    }

    /// The `Allow` value of a 405.
    pub fn allow(&self) -> String {
        self.methods
            .iter()
            .flatten()
            .map(Method::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A body that fails once it passes `max` bytes (an unknown-length body under
/// `max_body_bytes`).
pub fn limit_body<B>(body: B, max: u64) -> http_body_util::Limited<B> {
    http_body_util::Limited::new(body, usize::try_from(max).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn rules(toml_text: &str) -> Rules {
        #[derive(serde::Deserialize)]
        struct Wrapper {
            inspect: crate::config::Inspect,
        }
        let w: Wrapper = toml::from_str(&format!("[inspect]\n{toml_text}")).expect("toml");
        Rules::new(&w.inspect).expect("rules")
    }

    #[test]
    fn each_rule_refuses_what_it_should_and_passes_the_rest() {
        let r = rules(
            "methods = [\"GET\", \"POST\"]\ndeny_paths = [\"^/admin\", \"\\\\.php$\"]\n\
             max_header_fields = 3\nmax_header_bytes = 40\nmax_body_bytes = 100\n",
        );
        let h = |n: usize| {
            let mut headers = HeaderMap::new();
            for i in 0..n {
                headers.insert(
                    hyper::header::HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(),
                    HeaderValue::from_static("1"),
                );
            }
            headers
        };
        let ok = r.check(&Method::GET, "/app", &h(2), None);
        assert_eq!(ok, Ok(()));
        assert_eq!(
            r.check(&Method::DELETE, "/app", &h(0), None),
            Err(Rule::Method)
        );
        assert_eq!(r.allow(), "GET, POST");
        assert_eq!(
            r.check(&Method::GET, "/admin/x", &h(0), None),
            Err(Rule::Path)
        );
        assert_eq!(
            r.check(&Method::GET, "/a/index.php", &h(0), None),
            Err(Rule::Path)
        );
        assert_eq!(r.check(&Method::GET, "/a/index.phps", &h(0), None), Ok(()));
        assert_eq!(
            r.check(&Method::GET, "/a", &h(4), None),
            Err(Rule::HeaderFields)
        );
        let mut long = HeaderMap::new();
        long.insert(
            "x-long",
            HeaderValue::from_static("0123456789012345678901234567890123456"),
        );
        assert_eq!(
            r.check(&Method::GET, "/a", &long, None),
            Err(Rule::HeaderBytes)
        );
        assert_eq!(r.check(&Method::POST, "/a", &h(0), Some(100)), Ok(()));
        assert_eq!(
            r.check(&Method::POST, "/a", &h(0), Some(101)),
            Err(Rule::Body)
        );
        for rule in Rule::ALL {
            assert!(rule.status().is_client_error());
        }
    }

    #[test]
    fn with_allow_paths_only_matching_paths_pass() {
        let r = rules("allow_paths = [\"^/api/\", \"^/$\"]\n");
        assert_eq!(
            r.check(&Method::PUT, "/api/v1", &HeaderMap::new(), None),
            Ok(())
        );
        assert_eq!(r.check(&Method::GET, "/", &HeaderMap::new(), None), Ok(()));
        assert_eq!(
            r.check(&Method::GET, "/apis", &HeaderMap::new(), None),
            Err(Rule::Path)
        );
    }
}
