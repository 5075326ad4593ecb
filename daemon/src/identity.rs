//! Who the client is: a listener's client-certificate verifier (`[listener.client_auth]`,
//! rustls' `WebPkiClientVerifier` over the configured CAs and CRLs, rebuilt when those files
//! change), and the verified certificate's facts ([`PeerIdentity`]) as backends are told
//! them: the `X-Forwarded-Client-Cert` header (Envoy's format) in HTTP mode, the PROXY v2
//! SSL TLV's common name in L4 mode.
//!
//! No I/O beyond reading the PEM files; the parsing is x509-parser's, the verification
//! rustls-webpki's.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::config::{self, ClientAuthMode, UnknownRevocation};

/// Checks that `path` can be read and holds at least one PEM section of its kind (`ca`:
/// certificates, `crl`: CRLs); the message says what is wrong.
pub fn check_pem(path: &Path, what: &str) -> Result<(), String> {
    let found = if what == "crl" {
        CertificateRevocationListDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?
            .map(|c| c.map(|_| ()))
            .collect::<Result<Vec<()>, _>>()
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len()
    } else {
        CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?
            .map(|c| c.map(|_| ()))
            .collect::<Result<Vec<()>, _>>()
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len()
    };
    if found == 0 {
        let kind = if what == "crl" {
            "X509 CRL"
        } else {
            "CERTIFICATE"
        };
        return Err(format!("{} holds no {kind} PEM section", path.display()));
    }
    Ok(())
}

/// A listener's client-certificate settings, with the files they are read from and what
/// those files looked like when last read.
#[derive(Debug)]
pub struct ClientAuth {
    mode: ClientAuthMode,
    ca: Vec<PathBuf>,
    crl: Vec<PathBuf>,
    allow_unknown: bool,
    /// HTTP mode: the certificate itself in `X-Forwarded-Client-Cert` too.
    pub forward_certificate: bool,
    /// Modification time and length of each file (CAs, then CRLs) at the last build.
    stamps: Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl ClientAuth {
    /// `None` for `mode = "none"` (or no `[listener.client_auth]`).
    pub fn new(settings: Option<&config::ClientAuth>, base: &Path) -> Option<Self> {
        let settings = settings?;
        if *settings.mode.get_ref() == ClientAuthMode::None {
            return None;
        }
        let paths = |files: &[String]| files.iter().map(|f| base.join(f)).collect::<Vec<_>>();
        let auth = Self {
            mode: *settings.mode.get_ref(),
            ca: paths(settings.ca.get_ref()),
            crl: paths(settings.crl.get_ref()),
            allow_unknown: *settings.unknown_revocation.get_ref() == UnknownRevocation::Allow,
            forward_certificate: *settings.forward_certificate.get_ref(),
            stamps: Mutex::new(Vec::new()),
        };
        *auth.stamps.lock().unwrap_or_else(|e| e.into_inner()) = auth.current_stamps();
        Some(auth)
    }

    /// Whether a client without a certificate is refused.
    pub fn required(&self) -> bool {
        self.mode == ClientAuthMode::Required
    }

    fn current_stamps(&self) -> Vec<Option<(SystemTime, u64)>> {
        self.ca
            .iter()
            .chain(&self.crl)
            .map(|p| {
                let meta = std::fs::metadata(p).ok()?;
                Some((meta.modified().ok()?, meta.len()))
            })
            .collect()
    }

    /// True (once) when a CA or CRL file changed since the last call or build.
    pub fn files_changed(&self) -> bool {
        let now = self.current_stamps();
        let mut stamps = self.stamps.lock().unwrap_or_else(|e| e.into_inner());
        if *stamps == now {
            return false;
        }
        *stamps = now;
        true
    }

    /// The verifier for the files as they are now.
    pub fn verifier(
        &self,
        provider: &Arc<CryptoProvider>,
    ) -> anyhow::Result<Arc<dyn ClientCertVerifier>> {
        use anyhow::Context as _;
        // A file with nothing of its kind in it is an error, not an empty list: a CRL file
        // that became garbage must not turn revocation checks off.
        for path in &self.ca {
            check_pem(path, "ca").map_err(anyhow::Error::msg)?;
        }
        for path in &self.crl {
            check_pem(path, "crl").map_err(anyhow::Error::msg)?;
        }
        let mut roots = rustls::RootCertStore::empty();
        for path in &self.ca {
            for cert in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("client_auth CA {}", path.display()))?
            {
                let cert = cert.with_context(|| format!("client_auth CA {}", path.display()))?;
                roots
                    .add(cert)
                    .with_context(|| format!("client_auth CA {}", path.display()))?;
            }
        }
        let mut crls = Vec::new();
        for path in &self.crl {
            for crl in CertificateRevocationListDer::pem_file_iter(path)
                .with_context(|| format!("client_auth CRL {}", path.display()))?
            {
                crls.push(crl.with_context(|| format!("client_auth CRL {}", path.display()))?);
            }
        }
        let mut builder =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
                .with_crls(crls);
        if self.mode == ClientAuthMode::Optional {
            builder = builder.allow_unauthenticated();
        }
        if self.allow_unknown {
            builder = builder.allow_unknown_revocation_status();
        }
        builder.build().context("client_auth verifier")
    }
}

/// What a verified client certificate says, as backends and rules are told it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// SHA-256 of the certificate's DER, lower-case hex.
    pub sha256: String,
    /// The subject as an RFC 4514 string (`CN=client,O=Example`).
    pub subject: String,
    /// The issuer, the same way.
    pub issuer: String,
    /// The subject's (first) common name.
    pub common_name: Option<String>,
    /// Serial number, lower-case hex.
    pub serial: String,
    pub dns: Vec<String>,
    pub uri: Vec<String>,
    pub email: Vec<String>,
    /// The certificate as PEM (for `X-Forwarded-Client-Cert`'s `Cert=`).
    pub pem: String,
}

impl PeerIdentity {
    /// The end-entity certificate's facts. rustls has verified it; one x509-parser cannot
    /// read still gets its fingerprint and PEM.
    pub fn from_der(der: &[u8]) -> Self {
        let sha256 = hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der));
        let pem = pem_of(der);
        let Ok((_, cert)) = X509Certificate::from_der(der) else {
            return Self {
                sha256,
                subject: String::new(),
                issuer: String::new(),
                common_name: None,
                serial: String::new(),
                dns: Vec::new(),
                uri: Vec::new(),
                email: Vec::new(),
                pem,
            };
        };
        let (mut dns, mut uri, mut email) = (Vec::new(), Vec::new(), Vec::new());
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(n) => dns.push((*n).to_owned()),
                    GeneralName::URI(u) => uri.push((*u).to_owned()),
                    GeneralName::RFC822Name(e) => email.push((*e).to_owned()),
                    _ => {}
                }
            }
        }
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        Self {
            sha256,
            subject: rfc4514(cert.subject()),
            issuer: rfc4514(cert.issuer()),
            common_name,
            serial: hex::encode(cert.raw_serial()),
            dns,
            uri,
            email,
            pem,
        }
    }

    /// This proxy's element of `X-Forwarded-Client-Cert`, as Envoy writes it: `Hash`, then
    /// `Cert` (when asked for), `Subject`, and a `URI` and `DNS` pair per SAN.
    pub fn xfcc(&self, with_certificate: bool) -> String {
        let mut out = format!("Hash={}", self.sha256);
        if with_certificate {
            out.push_str(";Cert=\"");
            out.push_str(&url_encode(&self.pem));
            out.push('"');
        }
        out.push_str(";Subject=\"");
        out.push_str(&quoted(&self.subject));
        out.push('"');
        for uri in &self.uri {
            out.push_str(";URI=");
            out.push_str(&value(uri));
        }
        for dns in &self.dns {
            out.push_str(";DNS=");
            out.push_str(&value(dns));
        }
        out
    }
}

/// The certificate as one PEM block.
fn pem_of(der: &[u8]) -> String {
    use base64::Engine as _;
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in text.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// A distinguished name as RFC 4514 writes it: the last RDN first, attributes by their
/// short names (dotted OIDs for the rest), special characters escaped.
fn rfc4514(name: &x509_parser::x509::X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let rdns: Vec<&x509_parser::x509::RelativeDistinguishedName<'_>> = name.iter().collect();
    let rdns: Vec<String> = rdns
        .into_iter()
        .rev()
        .map(|rdn| {
            rdn.iter()
                .map(|attr| {
                    let key = x509_parser::objects::oid2abbrev(attr.attr_type(), registry)
                        .map_or_else(|_| attr.attr_type().to_id_string(), str::to_owned);
                    let value = match attr.as_str() {
                        Ok(text) => escape_dn_value(text),
                        Err(_) => format!("#{}", hex::encode(attr.attr_value().data)),
                    };
                    format!("{key}={value}")
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    rdns.join(",")
}

/// RFC 4514 §2.4: `"+,;<>\` escaped; a leading `#` or space and a trailing space too; NUL,
/// other control characters and anything beyond ASCII as `\` and two hex digits per byte
/// (so the string fits an HTTP field value).
fn escape_dn_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let last = text.chars().count().saturating_sub(1);
    for (i, c) in text.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            c if c.is_ascii_graphic() || c == ' ' => out.push(c),
            c => {
                let mut bytes = [0u8; 4];
                for b in c.encode_utf8(&mut bytes).bytes() {
                    out.push_str(&format!("\\{b:02X}"));
                }
            }
        }
    }
    out
}

/// An XFCC value: quoted when it holds `,`, `;`, `=` or `"`.
fn value(text: &str) -> String {
    if text.contains([',', ';', '=', '"']) {
        format!("\"{}\"", quoted(text))
    } else {
        text.to_owned()
    }
}

/// The inside of a quoted XFCC value: `"` escaped with a backslash, as Envoy does (and
/// nothing else, so an RFC 4514 subject's own escapes stay as they are).
fn quoted(text: &str) -> String {
    text.replace('"', "\\\"")
}

/// Percent-encoding of everything but RFC 3986's unreserved characters.
fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3 / 2);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn certificate() -> (rcgen::Certificate, Vec<u8>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec!["client.example".to_owned()]).expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Example, Inc.");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "client one");
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://example.org/ns/a;b".try_into().expect("uri"),
        ));
        params.subject_alt_names.push(rcgen::SanType::Rfc822Name(
            "ops@example.org".try_into().expect("email"),
        ));
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x0a, 0xbc]));
        let cert = params.self_signed(&key).expect("cert");
        let der = cert.der().to_vec();
        (cert, der)
    }

    #[test]
    fn a_certificate_gives_its_fingerprint_names_and_sans() {
        let (_, der) = certificate();
        let id = PeerIdentity::from_der(&der);
        assert_eq!(
            id.sha256,
            hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &der))
        );
        assert_eq!(id.subject, "CN=client one,O=Example\\, Inc.");
        assert_eq!(id.issuer, id.subject, "self-signed");
        assert_eq!(id.common_name.as_deref(), Some("client one"));
        assert_eq!(id.serial, "0abc");
        assert_eq!(id.dns, ["client.example"]);
        assert_eq!(id.uri, ["spiffe://example.org/ns/a;b"]);
        assert_eq!(id.email, ["ops@example.org"]);
        assert!(id.pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
    }

    #[test]
    fn the_xfcc_element_quotes_what_must_be_quoted() {
        let (_, der) = certificate();
        let id = PeerIdentity::from_der(&der);
        let xfcc = id.xfcc(false);
        assert_eq!(
            xfcc,
            format!(
                "Hash={};Subject=\"CN=client one,O=Example\\, Inc.\";URI=\"spiffe://example.org/ns/a;b\";DNS=client.example",
                id.sha256
            )
        );
        let with_cert = id.xfcc(true);
        assert!(with_cert.contains(";Cert=\"-----BEGIN%20CERTIFICATE-----%0A"));
        assert!(!with_cert[..with_cert.find(";Subject").unwrap()].contains(['\n', ' ', ',']));
    }

    #[test]
    fn subjects_beyond_ascii_are_hex_escaped_and_fit_a_header() {
        assert_eq!(escape_dn_value("Zoë"), "Zo\\C3\\AB");
        assert_eq!(escape_dn_value("a\nb"), "a\\0Ab");
        assert_eq!(escape_dn_value("#1 a,b "), "\\#1 a\\,b\\ ");
        assert!(HeaderValue::from_str(&escape_dn_value("Zoë \u{7f}\u{1}")).is_ok());
    }

    #[test]
    fn garbage_still_has_a_fingerprint() {
        let id = PeerIdentity::from_der(b"not a certificate");
        assert_eq!(id.sha256.len(), 64);
        assert!(id.subject.is_empty() && id.dns.is_empty());
    }

    #[test]
    fn pem_checks_name_the_file_and_what_is_missing() {
        let dir = std::env::temp_dir().join(format!("tlsaccel-identity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (cert, _) = certificate();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, cert.pem()).expect("write");
        assert_eq!(check_pem(&ca, "ca"), Ok(()));
        let error = check_pem(&ca, "crl").expect_err("no CRL in it");
        assert!(error.contains("holds no X509 CRL"), "{error}");
        let error = check_pem(&dir.join("missing.pem"), "ca").expect_err("missing");
        assert!(error.contains("cannot read"), "{error}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
