//! The PROXY protocol (HAProxy's, v1 and v2), without I/O: recognising and parsing the
//! header a trusted load balancer puts in front of a connection, and building the v2 header
//! tlsaccel puts in front of its connections to a backend, with the client's address and
//! what the TLS handshake settled (SNI, ALPN, version, cipher) as TLVs. The bytes are the
//! `ppp` crate's.

use std::net::{IpAddr, SocketAddr};

use ppp::v2;

/// The longest header accepted from a load balancer. v1 is at most 107 bytes; a v2 header's
/// TLVs could run to 64 KiB, which nothing sends in practice.
pub const MAX_HEADER: usize = 4096;

/// The longest v1 line, CRLF included.
const V1_MAX: usize = 107;

/// The v2 signature, and v1's start.
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_START: &[u8] = b"PROXY ";

/// Address ranges a listener takes PROXY headers from.
#[derive(Debug, Clone, Default)]
pub struct Trusted(Vec<ipnet::IpNet>);

/// CIDR ranges or single addresses, as the configuration gives them.
pub fn parse_ranges(ranges: &[String]) -> anyhow::Result<Vec<ipnet::IpNet>> {
    ranges
        .iter()
        .map(|r| {
            r.parse::<ipnet::IpNet>()
                .or_else(|_| r.parse::<IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| anyhow::anyhow!("{r:?} is not an address or a CIDR range"))
        })
        .collect()
}

impl Trusted {
    /// From the configuration's ranges (checked there): CIDR ranges or single addresses.
    pub fn parse(ranges: &[String]) -> anyhow::Result<Self> {
        parse_ranges(ranges).map(Self)
    }

    /// True when the listener takes PROXY headers at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// True when `peer` may (and must) send a PROXY header.
    pub fn contains(&self, peer: IpAddr) -> bool {
        let peer = match peer {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, IpAddr::V4),
            v4 => v4,
        };
        self.0.iter().any(|range| range.contains(&peer))
    }
}

/// True when `start` (at least the first 6 bytes a client sent) begins a PROXY header:
/// what a client not on the trusted list must not send.
pub fn looks_like_header(start: &[u8]) -> bool {
    let n = start.len().min(V2_SIGNATURE.len());
    (n >= V1_START.len() && start.starts_with(V1_START))
        || (n >= 6 && V2_SIGNATURE.starts_with(&start[..n]))
}

/// What the bytes a trusted peer sent first say.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// A header of `len` bytes naming the client (`None`: v1 `UNKNOWN`, v2 `LOCAL` or an
    /// address family other than IPv4 or IPv6: the connection's own addresses stand).
    Header {
        len: usize,
        source: Option<SocketAddr>,
        destination: Option<SocketAddr>,
    },
    /// Not a PROXY header, or a broken one.
    Invalid(String),
}

/// Parses the header at the start of `input`.
pub fn parse(input: &[u8]) -> Parsed {
    let n = input.len();
    let v1 = input.starts_with(V1_START) || V1_START.starts_with(input);
    let v2 = V2_SIGNATURE.starts_with(&input[..n.min(V2_SIGNATURE.len())]);
    if !(v1 || v2) {
        return Parsed::Invalid("the connection does not start with a PROXY header".into());
    }
    if n == 0 {
        return Parsed::Incomplete;
    }
    use ppp::PartialResult as _;
    let result = ppp::HeaderResult::parse(input);
    // A v1 line ends within 107 bytes, and a v2 header's length is in its 16th byte: past
    // either, a header still "incomplete" is a broken one.
    let complete = if input.starts_with(V1_START) {
        input.windows(2).any(|w| w == b"\r\n") || n >= V1_MAX
    } else {
        n >= 16 && n >= 16 + usize::from(u16::from_be_bytes([input[14], input[15]]))
    };
    if result.is_incomplete() && complete {
        return Parsed::Invalid("a malformed PROXY header".into());
    }
    if result.is_incomplete() {
        return if input.len() >= MAX_HEADER {
            Parsed::Invalid(format!("a PROXY header longer than {MAX_HEADER} bytes"))
        } else {
            Parsed::Incomplete
        };
    }
    match result {
        ppp::HeaderResult::V1(Ok(header)) => {
            let (source, destination) = match header.addresses {
                ppp::v1::Addresses::Tcp4(a) => (
                    Some(SocketAddr::from((a.source_address, a.source_port))),
                    Some(SocketAddr::from((
                        a.destination_address,
                        a.destination_port,
                    ))),
                ),
                ppp::v1::Addresses::Tcp6(a) => (
                    Some(SocketAddr::from((a.source_address, a.source_port))),
                    Some(SocketAddr::from((
                        a.destination_address,
                        a.destination_port,
                    ))),
                ),
                ppp::v1::Addresses::Unknown => (None, None),
            };
            Parsed::Header {
                len: header.header.len(),
                source,
                destination,
            }
        }
        ppp::HeaderResult::V2(Ok(header)) => {
            let local = header.command == v2::Command::Local;
            let (source, destination) = match header.addresses {
                v2::Addresses::IPv4(a) if !local => (
                    Some(SocketAddr::from((a.source_address, a.source_port))),
                    Some(SocketAddr::from((
                        a.destination_address,
                        a.destination_port,
                    ))),
                ),
                v2::Addresses::IPv6(a) if !local => (
                    Some(SocketAddr::from((a.source_address, a.source_port))),
                    Some(SocketAddr::from((
                        a.destination_address,
                        a.destination_port,
                    ))),
                ),
                _ => (None, None),
            };
            Parsed::Header {
                len: header.len(),
                source,
                destination,
            }
        }
        ppp::HeaderResult::V1(Err(error)) => Parsed::Invalid(format!("PROXY v1: {error}")),
        ppp::HeaderResult::V2(Err(error)) => Parsed::Invalid(format!("PROXY v2: {error}")),
    }
}

/// What a v2 header to a backend says of the client's TLS.
#[derive(Debug, Default)]
pub struct TlsValues<'a> {
    pub server_name: Option<&'a str>,
    pub alpn: Option<&'a [u8]>,
    /// As OpenSSL names it (`TLSv1.3`), what HAProxy sends too.
    pub version: &'a str,
    /// The IANA name (`TLS_AES_128_GCM_SHA256`).
    pub cipher: &'a str,
    /// The client's verified certificate, if it sent one (or its resumed session had one).
    pub client_certificate: Option<&'a crate::identity::PeerIdentity>,
    pub resumed: bool,
}

/// PP2_CLIENT_SSL: the client connected over TLS.
const CLIENT_SSL: u8 = 0x01;
/// PP2_CLIENT_CERT_CONN: the client sent a certificate on this connection.
const CLIENT_CERT_CONN: u8 = 0x02;
/// PP2_CLIENT_CERT_SESS: the client sent a certificate at least once in this TLS session
/// (set with a resumed one too).
const CLIENT_CERT_SESS: u8 = 0x04;
/// PP2_SUBTYPE_SSL_CN: the client certificate's common name.
const SUBTYPE_SSL_CN: u8 = 0x22;

/// A v2 `PROXY` header for a connection from `source` to `destination`, with the TLS values
/// as TLVs: ALPN, authority (the SNI), and SSL with its version and cipher sub-TLVs.
pub fn v2_header(source: SocketAddr, destination: SocketAddr, tls: &TlsValues<'_>) -> Vec<u8> {
    let (source, destination) = same_family(source, destination);
    let mut client = CLIENT_SSL;
    if tls.client_certificate.is_some() {
        client |= CLIENT_CERT_SESS;
        if !tls.resumed {
            client |= CLIENT_CERT_CONN;
        }
    }
    let mut ssl = vec![client];
    // `verify` is zero only for a client certificate that was verified (an identity here
    // is always one that was).
    let verify: u32 = if tls.client_certificate.is_some() {
        0
    } else {
        1
    };
    ssl.extend_from_slice(&verify.to_be_bytes());
    // A common name longer than any real one is left out rather than cut.
    let common_name = tls
        .client_certificate
        .and_then(|c| c.common_name.as_deref())
        .filter(|cn| cn.len() <= 1024)
        .unwrap_or("");
    for (kind, value) in [
        (v2::Type::SSLVersion as u8, tls.version.as_bytes()),
        (v2::Type::SSLCipher as u8, tls.cipher.as_bytes()),
        (SUBTYPE_SSL_CN, common_name.as_bytes()),
    ] {
        if value.is_empty() {
            continue;
        }
        ssl.push(kind);
        ssl.extend_from_slice(&(value.len() as u16).to_be_bytes());
        ssl.extend_from_slice(value);
    }
    let mut builder = v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Proxy,
        v2::Protocol::Stream,
        (source, destination),
    );
    // Writing into a Vec cannot fail, and each TLV is far below the format's 64 KiB.
    if let Some(alpn) = tls.alpn {
        builder = builder.write_tlv(v2::Type::ALPN, alpn).expect("in memory");
    }
    if let Some(name) = tls.server_name {
        builder = builder
            .write_tlv(v2::Type::Authority, name.as_bytes())
            .expect("in memory");
    }
    builder = builder.write_tlv(v2::Type::SSL, &ssl).expect("in memory");
    builder.build().expect("in memory")
}

/// A v2 `LOCAL` header: a connection the proxy makes on its own behalf (a health check).
pub fn v2_local() -> Vec<u8> {
    v2::Builder::new(
        v2::Version::Two | v2::Command::Local,
        v2::AddressFamily::Unspecified | v2::Protocol::Unspecified,
    )
    .build()
    .expect("in memory")
}

/// Both addresses in one family (an IPv4 client on an IPv6 socket is shown as IPv6).
fn same_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V6(d)) => (
            SocketAddr::new(IpAddr::V6(s.ip().to_ipv6_mapped()), s.port()),
            SocketAddr::V6(d),
        ),
        (SocketAddr::V6(s), SocketAddr::V4(d)) => (
            SocketAddr::V6(s),
            SocketAddr::new(IpAddr::V6(d.ip().to_ipv6_mapped()), d.port()),
        ),
        same => same,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_ranges_take_cidrs_and_addresses_and_mapped_ipv4() {
        let trusted = Trusted::parse(&["10.0.0.0/8".into(), "192.0.2.7".into()]).unwrap();
        assert!(trusted.contains("10.1.2.3".parse().unwrap()));
        assert!(trusted.contains("192.0.2.7".parse().unwrap()));
        assert!(trusted.contains("::ffff:10.9.9.9".parse().unwrap()));
        assert!(!trusted.contains("192.0.2.8".parse().unwrap()));
        assert!(Trusted::parse(&["10.0.0.0/33".into()]).is_err());
        assert!(Trusted::default().is_empty());
    }

    #[test]
    fn v1_and_v2_headers_parse_with_what_follows_them_left_alone() {
        let v1 = b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 443\r\n\x16\x03\x01";
        assert_eq!(
            parse(v1),
            Parsed::Header {
                len: v1.len() - 3,
                source: Some("192.0.2.1:5000".parse().unwrap()),
                destination: Some("198.51.100.2:443".parse().unwrap()),
            }
        );
        assert_eq!(parse(&v1[..20]), Parsed::Incomplete);
        let header = v2_header(
            "[2001:db8::1]:4000".parse().unwrap(),
            "[2001:db8::2]:443".parse().unwrap(),
            &TlsValues::default(),
        );
        let mut input = header.clone();
        input.extend_from_slice(b"\x16\x03\x01");
        assert_eq!(
            parse(&input),
            Parsed::Header {
                len: header.len(),
                source: Some("[2001:db8::1]:4000".parse().unwrap()),
                destination: Some("[2001:db8::2]:443".parse().unwrap()),
            }
        );
        for cut in 1..header.len() {
            assert_eq!(parse(&header[..cut]), Parsed::Incomplete, "cut at {cut}");
        }
        let local = v2_local();
        assert_eq!(
            parse(&local),
            Parsed::Header {
                len: local.len(),
                source: None,
                destination: None,
            }
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Parsed::Header {
                len: 15,
                source: None,
                destination: None,
            }
        );
    }

    #[test]
    fn garbage_and_oversized_headers_are_refused() {
        assert!(matches!(parse(b"\x16\x03\x01\x02\x00"), Parsed::Invalid(_)));
        assert!(matches!(
            parse(b"PROXY TCP4 not-an-address 198.51.100.2 5000 443\r\n"),
            Parsed::Invalid(_)
        ));
        // Broken lines followed by a TLS record, and a line that never ends.
        assert!(matches!(
            parse(b"PROXY TCP4 192.0.2.9 nonsense\r\n\x16\x03\x01\x02\x00"),
            Parsed::Invalid(_)
        ));
        let mut endless = b"PROXY TCP4 ".to_vec();
        endless.resize(V1_MAX, b'1');
        assert!(matches!(parse(&endless), Parsed::Invalid(_)));
        let mut long = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff".to_vec();
        long.resize(MAX_HEADER, 0);
        assert!(matches!(parse(&long), Parsed::Invalid(_)));
        assert!(looks_like_header(b"PROXY TCP4"));
        assert!(looks_like_header(b"\r\n\r\n\0\r\nQUIT\n"));
        assert!(!looks_like_header(b"\x16\x03\x01\x02\x00\x01"));
    }

    #[test]
    fn the_v2_header_carries_the_tls_values_as_tlvs() {
        let header = v2_header(
            "192.0.2.1:5000".parse().unwrap(),
            "198.51.100.2:443".parse().unwrap(),
            &TlsValues {
                server_name: Some("app.example"),
                alpn: Some(b"h2"),
                version: "TLSv1.3",
                cipher: "TLS_AES_128_GCM_SHA256",
                ..TlsValues::default()
            },
        );
        let parsed = v2::Header::try_from(&header[..]).unwrap();
        let tlvs: Vec<(u8, Vec<u8>)> = parsed
            .tlvs()
            .map(|t| {
                let t = t.unwrap();
                (t.kind, t.value.to_vec())
            })
            .collect();
        assert!(tlvs.contains(&(0x01, b"h2".to_vec())));
        assert!(tlvs.contains(&(0x02, b"app.example".to_vec())));
        let ssl = &tlvs.iter().find(|(k, _)| *k == 0x20).unwrap().1;
        assert_eq!(ssl[0], CLIENT_SSL);
        let subs = &ssl[5..];
        assert_eq!(&subs[..3], &[0x21, 0, 7]);
        assert_eq!(&subs[3..10], b"TLSv1.3");
        assert_eq!(&subs[10..13], &[0x23, 0, 22]);
        assert_eq!(&subs[13..], b"TLS_AES_128_GCM_SHA256");
        assert_eq!(
            &ssl[1..5],
            &1u32.to_be_bytes(),
            "no certificate: not verified"
        );
    }

    /// The SSL TLV's client bits, `verify` and common name for a client certificate.
    fn ssl_tlv(identity: &crate::identity::PeerIdentity, resumed: bool) -> Vec<u8> {
        let header = v2_header(
            "192.0.2.1:5000".parse().unwrap(),
            "198.51.100.2:443".parse().unwrap(),
            &TlsValues {
                version: "TLSv1.3",
                cipher: "TLS_AES_128_GCM_SHA256",
                client_certificate: Some(identity),
                resumed,
                ..TlsValues::default()
            },
        );
        let parsed = v2::Header::try_from(&header[..]).unwrap();
        let ssl = parsed
            .tlvs()
            .map(|t| t.unwrap())
            .find(|t| t.kind == 0x20)
            .unwrap();
        ssl.value.to_vec()
    }

    #[test]
    fn a_client_certificate_is_flagged_verified_with_its_common_name() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "client one");
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let identity = crate::identity::PeerIdentity::from_der(&der);
        let ssl = ssl_tlv(&identity, false);
        assert_eq!(ssl[0], CLIENT_SSL | CLIENT_CERT_CONN | CLIENT_CERT_SESS);
        assert_eq!(&ssl[1..5], &0u32.to_be_bytes(), "verified");
        let cn = ssl.windows(13).position(|w| w == b"\x22\x00\x0aclient one");
        assert!(cn.is_some(), "{ssl:?}");
        let resumed = ssl_tlv(&identity, true);
        assert_eq!(resumed[0], CLIENT_SSL | CLIENT_CERT_SESS);
    }
}
