//! Access rules (`[[route.acl]]`, `[[listener.acl]]`): who may use a route, by the client's
//! verified certificate (SANs, subject, issuer, serial, fingerprint) and source address.
//! The first rule that matches decides; when rules are given and none matches, the client
//! is denied. Decided once per connection (L4) or request (HTTP mode), never per record.
//!
//! Pure logic: the caller gives the identity and address and acts on the decision.

use std::net::IpAddr;

use crate::config;
use crate::identity::PeerIdentity;

/// One rule: an action and what the client must have for it to apply. Each field given
/// must match (a list matches when any of its entries does); a rule with no field matches
/// every client. Certificate fields never match a client without a certificate.
#[derive(Debug, Clone)]
struct Rule {
    allow: bool,
    /// Lower case; `*.example.com` matches one label in front of `example.com`.
    san_dns: Vec<String>,
    san_uri: Vec<String>,
    /// Lower case.
    san_email: Vec<String>,
    /// RFC 4514 strings, as `docs/identity.md` shows them.
    subject: Vec<String>,
    issuer: Vec<String>,
    /// Lower-case hex without leading zeros.
    serial: Vec<String>,
    /// Lower-case hex.
    sha256: Vec<String>,
    source: Vec<ipnet::IpNet>,
}

/// A route's or listener's rules, in order.
#[derive(Debug, Clone)]
pub struct Acl {
    rules: Vec<Rule>,
}

/// What the rules decided, and which rule did (`None`: no rule matched).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub rule: Option<usize>,
}

impl Decision {
    /// `allow` or `deny`, for metrics.
    pub fn label(&self) -> &'static str {
        if self.allowed {
            "allow"
        } else {
            "deny"
        }
    }
}

/// Hex without `:` separators, in lower case, and (for serials) without leading zeros.
fn normal_hex(text: &str, strip_zeros: bool) -> String {
    let hex: String = text
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if strip_zeros {
        let trimmed = hex.trim_start_matches('0');
        if trimmed.is_empty() {
            "0".to_owned()
        } else {
            trimmed.to_owned()
        }
    } else {
        hex
    }
}

impl Acl {
    /// The rules of a configuration list; `None` for an empty one (everyone allowed). The
    /// list was checked by the configuration's checker (`check_rule`).
    pub fn new(rules: &[config::AclRule]) -> anyhow::Result<Option<Self>> {
        if rules.is_empty() {
            return Ok(None);
        }
        let lower = |v: &[String]| v.iter().map(|s| s.to_ascii_lowercase()).collect();
        let rules = rules
            .iter()
            .map(|r| {
                Ok(Rule {
                    allow: *r.action.get_ref() == config::AclAction::Allow,
                    san_dns: lower(&r.san_dns),
                    san_uri: r.san_uri.clone(),
                    san_email: lower(&r.san_email),
                    subject: r.subject.clone(),
                    issuer: r.issuer.clone(),
                    serial: r.serial.iter().map(|s| normal_hex(s, true)).collect(),
                    sha256: r.sha256.iter().map(|s| normal_hex(s, false)).collect(),
                    source: crate::proxy_protocol::parse_ranges(r.source.get_ref())?,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Some(Self { rules }))
    }

    /// The decision for a client at `source` with `identity` (its verified certificate).
    pub fn decide(&self, identity: Option<&PeerIdentity>, source: IpAddr) -> Decision {
        let source = match source {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(source, IpAddr::V4),
            v4 => v4,
        };
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.matches(identity, source) {
                return Decision {
                    allowed: rule.allow,
                    rule: Some(i),
                };
            }
        }
        Decision {
            allowed: false,
            rule: None,
        }
    }
}

impl Rule {
    fn matches(&self, identity: Option<&PeerIdentity>, source: IpAddr) -> bool {
        if !self.source.is_empty() && !self.source.iter().any(|net| net.contains(&source)) {
            return false;
        }
        let wants_certificate = [
            &self.san_dns,
            &self.san_uri,
            &self.san_email,
            &self.subject,
            &self.issuer,
            &self.serial,
            &self.sha256,
        ]
        .iter()
        .any(|field| !field.is_empty());
        if !wants_certificate {
            return true;
        }
        let Some(id) = identity else {
            return false;
        };
        let any = |wanted: &[String], test: &dyn Fn(&str) -> bool| {
            wanted.is_empty() || wanted.iter().any(|w| test(w))
        };
        any(&self.san_dns, &|pattern| {
            id.dns.iter().any(|name| dns_matches(pattern, name))
        }) && any(&self.san_uri, &|uri| id.uri.iter().any(|u| u == uri))
            && any(&self.san_email, &|email| {
                id.email.iter().any(|e| e.eq_ignore_ascii_case(email))
            })
            && any(&self.subject, &|s| s == id.subject)
            && any(&self.issuer, &|s| s == id.issuer)
            && any(&self.serial, &|s| s == normal_hex(&id.serial, true))
            && any(&self.sha256, &|s| s == id.sha256)
    }
}

/// `pattern` (lower case) against a certificate's DNS name: equal without case, or
/// `*.suffix` with exactly one label in front of `suffix`.
fn dns_matches(pattern: &str, name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .strip_suffix(suffix)
            .and_then(|front| front.strip_suffix('.'))
            .is_some_and(|label| !label.is_empty() && !label.contains('.')),
        None => name == pattern,
    }
}

/// Checks one configured rule; the message says what is wrong.
pub fn check_rule(rule: &config::AclRule) -> Result<(), String> {
    for (field, values, len) in [
        ("sha256", &rule.sha256, Some(64)),
        ("serial", &rule.serial, None),
    ] {
        for value in values {
            let hex = normal_hex(value, false);
            if hex.is_empty()
                || !hex.bytes().all(|b| b.is_ascii_hexdigit())
                || len.is_some_and(|n| hex.len() != n)
            {
                return Err(format!(
                    "{field}: {value:?} is not {}",
                    if field == "sha256" {
                        "a SHA-256 fingerprint (64 hex digits, `:` allowed)"
                    } else {
                        "a serial number in hex"
                    }
                ));
            }
        }
    }
    for pattern in &rule.san_dns {
        let rest = pattern.strip_prefix("*.").unwrap_or(pattern);
        if rest.is_empty() || rest.contains('*') {
            return Err(format!(
                "san_dns: {pattern:?}: a name, or `*.` and a name (one label)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> PeerIdentity {
        PeerIdentity {
            sha256: "ab".repeat(32),
            subject: "CN=alice,O=Example".to_owned(),
            issuer: "CN=Example Clients CA".to_owned(),
            common_name: Some("alice".to_owned()),
            serial: "00a1".to_owned(),
            dns: vec!["alice.ops.example.com".to_owned()],
            uri: vec!["spiffe://example.com/alice".to_owned()],
            email: vec!["Alice@Example.com".to_owned()],
            pem: String::new(),
        }
    }

    fn acl(text: &str) -> Acl {
        #[derive(serde::Deserialize)]
        struct Rules {
            acl: Vec<config::AclRule>,
        }
        let rules: Rules = toml::from_str(text).expect("rules");
        for rule in &rules.acl {
            check_rule(rule).expect("valid rule");
        }
        Acl::new(&rules.acl).expect("acl").expect("some rules")
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    #[test]
    fn the_first_matching_rule_decides_and_no_match_denies() {
        let acl = acl(r#"
            [[acl]]
            action = "deny"
            serial = ["A1"]
            source = ["192.0.2.0/24"]
            [[acl]]
            action = "allow"
            san_dns = ["*.ops.example.com"]
            [[acl]]
            action = "allow"
            source = ["10.0.0.0/8"]
        "#);
        let alice = identity();
        // Serial A1 (leading zeros and case do not matter) from the denied range.
        assert_eq!(
            acl.decide(Some(&alice), ip("192.0.2.7")),
            Decision {
                allowed: false,
                rule: Some(0)
            }
        );
        assert_eq!(
            acl.decide(Some(&alice), ip("198.51.100.1")),
            Decision {
                allowed: true,
                rule: Some(1)
            }
        );
        // No certificate: certificate rules never match; the address rule does.
        assert_eq!(
            acl.decide(None, ip("10.1.2.3")),
            Decision {
                allowed: true,
                rule: Some(2)
            }
        );
        assert_eq!(
            acl.decide(None, ip("::ffff:10.1.2.3")).rule,
            Some(2),
            "mapped IPv4"
        );
        assert_eq!(
            acl.decide(None, ip("203.0.113.9")),
            Decision {
                allowed: false,
                rule: None
            }
        );
    }

    #[test]
    fn every_certificate_field_matches_as_documented() {
        let alice = identity();
        let source = ip("127.0.0.1");
        let allowed = |rule: &str| {
            acl(&format!("[[acl]]\naction = \"allow\"\n{rule}\n"))
                .decide(Some(&alice), source)
                .allowed
        };
        assert!(allowed("san_dns = [\"ALICE.ops.example.com\"]"));
        assert!(allowed("san_dns = [\"*.ops.example.com\"]"));
        assert!(!allowed("san_dns = [\"*.example.com\"]"), "one label only");
        assert!(allowed("san_uri = [\"spiffe://example.com/alice\"]"));
        assert!(!allowed("san_uri = [\"spiffe://example.com/ALICE\"]"));
        assert!(allowed("san_email = [\"alice@example.com\"]"));
        assert!(allowed("subject = [\"CN=alice,O=Example\"]"));
        assert!(!allowed("subject = [\"CN=alice\"]"));
        assert!(allowed("issuer = [\"CN=Example Clients CA\"]"));
        assert!(allowed("serial = [\"00:A1\"]"));
        assert!(allowed(&format!(
            "sha256 = [\"{}\"]",
            "AB:".repeat(31) + "AB"
        )));
        assert!(!allowed(&format!("sha256 = [\"{}\"]", "cd".repeat(32))));
        assert!(
            !allowed("subject = [\"CN=alice,O=Example\"]\nissuer = [\"CN=Other\"]"),
            "every field given must match"
        );
        assert!(
            allowed("subject = [\"CN=bob\", \"CN=alice,O=Example\"]"),
            "any entry"
        );
    }

    #[test]
    fn bad_rules_are_named() {
        let check = |text: &str| {
            #[derive(serde::Deserialize)]
            struct Rules {
                acl: Vec<config::AclRule>,
            }
            let rules: Rules = toml::from_str(text).expect("rules");
            check_rule(&rules.acl[0])
        };
        assert!(check("[[acl]]\naction = \"allow\"\nsha256 = [\"abc\"]")
            .unwrap_err()
            .contains("sha256"));
        assert!(check("[[acl]]\naction = \"allow\"\nserial = [\"xyz\"]")
            .unwrap_err()
            .contains("serial"));
        assert!(
            check("[[acl]]\naction = \"allow\"\nsan_dns = [\"a.*.example\"]")
                .unwrap_err()
                .contains("san_dns")
        );
        assert!(check("[[acl]]\naction = \"allow\"\nsan_dns = [\"*.example.com\"]").is_ok());
    }
}
