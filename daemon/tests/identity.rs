//! Client certificates (`[listener.client_auth]`) through `tlsaccel serve`: curl and rustls
//! clients with certificates from a test CA made here (rcgen), a CRL that changes while the
//! daemon runs, the identity backends are told (`X-Forwarded-Client-Cert` in HTTP mode, the
//! PROXY v2 SSL TLV in L4 mode) and spoofed copies of it.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::AlertDescription;
use support::{runtime, Daemon, Scratch};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A CA of the test's own.
struct Ca {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key).expect("CA").pem();
        Self { params, key, pem }
    }

    /// A client certificate for `common_name` with serial `serial`, a DNS and a URI SAN;
    /// written as `<file>.pem` and `<file>.key` in `dir`.
    fn client(&self, dir: &Path, file: &str, common_name: &str, serial: u8) -> Client {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec![format!("{file}.clients.example")]).expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "tlsaccel tests");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.subject_alt_names.push(rcgen::SanType::URI(
            format!("spiffe://tests.example/{file}")
                .try_into()
                .expect("uri"),
        ));
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&[serial]));
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("client cert");
        std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).expect("write");
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).expect("write");
        Client {
            der: cert.der().clone(),
            key: PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
        }
    }

    /// A CRL revoking `serials`.
    fn crl(&self, serials: &[u8]) -> String {
        let params = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2024, 1, 1),
            next_update: rcgen::date_time_ymd(2100, 1, 1),
            crl_number: rcgen::SerialNumber::from_slice(&[serials.len() as u8 + 1]),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(&[*s]),
                    revocation_time: rcgen::date_time_ymd(2025, 1, 1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        params.signed_by(&issuer).expect("CRL").pem().expect("pem")
    }
}

struct Client {
    der: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

impl Client {
    fn sha256(&self) -> String {
        hex::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            &self.der,
        ))
    }
}

/// A rustls client trusting the daemon's certificate, presenting `client` if given, with
/// a session cache of its own (so a second connection resumes).
fn rustls_client(
    server: &CertificateDer<'static>,
    client: Option<&Client>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server.clone()).expect("root");
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("versions")
    .with_root_certificates(roots);
    Arc::new(match client {
        Some(c) => builder
            .with_client_auth_cert(vec![c.der.clone()], c.key.clone_key())
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    })
}

/// Makes a TLS connection and one HTTP/1.1 request on it; the alert that refused it, or
/// `None` when the request was answered.
async fn refused_with(
    address: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> Option<AlertDescription> {
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let alert = |error: std::io::Error| -> Option<AlertDescription> {
        Some(alert_in(&error).unwrap_or_else(|| panic!("not an alert: {error}")))
    };
    let mut tls = match tokio_rustls::TlsConnector::from(Arc::clone(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
    {
        Ok(tls) => tls,
        Err(error) => return alert(error),
    };
    if let Err(error) = tls
        .write_all(b"GET /check HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
    {
        return alert(error);
    }
    let mut answer = Vec::new();
    match tls.read_to_end(&mut answer).await {
        Ok(_) => {
            let text = String::from_utf8_lossy(&answer);
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
            None
        }
        Err(error) => alert(error),
    }
}

/// The alert in a TLS client's I/O error, if it carries one.
fn alert_in(error: &std::io::Error) -> Option<AlertDescription> {
    match error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::AlertReceived(alert)) => Some(*alert),
        _ => None,
    }
}

/// An L4 exchange through `address`: `Ok` when "ping" came back, else the alert that
/// ended it (`None`: none was received).
async fn ping(
    address: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> Result<(), Option<AlertDescription>> {
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::clone(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .map_err(|e| alert_in(&e))?;
    tls.write_all(b"ping").await.map_err(|e| alert_in(&e))?;
    let mut back = [0u8; 4];
    tls.read_exact(&mut back).await.map_err(|e| alert_in(&e))?;
    assert_eq!(&back, b"ping");
    Ok(())
}

/// An HTTP/1.1 backend answering every request with the `X-Forwarded-Client-Cert` values
/// it was sent (one line each), or `xfcc=` when there was none.
async fn backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |request: Request<hyper::body::Incoming>| async move {
                        let mut text = String::new();
                        for (name, value) in request.headers() {
                            let value = value.to_str().unwrap_or("?");
                            if name == "x-forwarded-client-cert" {
                                text.push_str(&format!("xfcc={value}\n"));
                            } else if name.as_str().replace('_', "-") == "x-forwarded-client-cert" {
                                text.push_str(&format!("spoofed={value}\n"));
                            }
                        }
                        if text.is_empty() {
                            text.push_str("xfcc=\n");
                        }
                        let mut response = Response::new(Full::new(Bytes::from(text)));
                        if request.uri().path() == "/cached" {
                            // Fresh for a shared cache, but not marked public.
                            response.headers_mut().insert(
                                "cache-control",
                                hyper::header::HeaderValue::from_static("max-age=60"),
                            );
                        }
                        Ok::<_, Infallible>(response)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    address
}

/// What a PROXY v2 header's SSL TLV said: client bits, verify, common name.
type SslSeen = Arc<Mutex<Vec<(u8, u32, String)>>>;

/// A TCP backend that reads a PROXY v2 header, records its SSL TLV and echoes the rest.
async fn proxy_backend() -> (SocketAddr, SslSeen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let seen: SslSeen = Arc::default();
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let record = Arc::clone(&record);
            tokio::spawn(async move {
                let mut head = [0u8; 16];
                if tcp.read_exact(&mut head).await.is_err() {
                    return;
                }
                let len = u16::from_be_bytes([head[14], head[15]]) as usize;
                let mut rest = vec![0u8; len];
                if tcp.read_exact(&mut rest).await.is_err() {
                    return;
                }
                let mut whole = head.to_vec();
                whole.extend_from_slice(&rest);
                let header = ppp::v2::Header::try_from(&whole[..]).expect("a PROXY v2 header");
                for tlv in header.tlvs().flatten() {
                    if tlv.kind != 0x20 {
                        continue;
                    }
                    let value = &tlv.value[..];
                    let verify = u32::from_be_bytes([value[1], value[2], value[3], value[4]]);
                    let mut cn = String::new();
                    let mut at = 5;
                    while at + 3 <= value.len() {
                        let n = u16::from_be_bytes([value[at + 1], value[at + 2]]) as usize;
                        if value[at] == 0x22 {
                            cn = String::from_utf8_lossy(&value[at + 3..at + 3 + n]).into_owned();
                        }
                        at += 3 + n;
                    }
                    record.lock().expect("lock").push((value[0], verify, cn));
                }
                let (mut read, mut write) = tcp.into_split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    (address, seen)
}

/// A listener block: `mode = "http"` when `http`, its default pool, then `extra` (its
/// client_auth and acl tables).
fn listener(name: &str, http: bool, pool: &str, extra: &str) -> String {
    let mode = if http {
        "mode = \"http\"\nalpn = [\"http/1.1\"]\n"
    } else {
        ""
    };
    format!(
        "[[listener]]\nname = \"{name}\"\naddress = \"127.0.0.1:0\"\n{mode}default_pool = \"{pool}\"\n\
         {extra}[[listener.certificate]]\nchain = \"cert.pem\"\nkey = \"key.pem\"\n\n"
    )
}

/// The device, the HTTP pool, the L4 pool (PROXY v2) and the admin endpoint, after the
/// listeners and before `routes`.
fn with_pools(
    listeners: &str,
    http_backend: SocketAddr,
    l4_backend: SocketAddr,
    routes: &str,
) -> String {
    format!(
        r#"drain_timeout_ms = 2000
{listeners}[[device]]
address = "sim"
queues = 2

[[pool]]
name = "http"
servers = ["{http_backend}"]

[[pool]]
name = "proxied"
servers = ["{l4_backend}"]
proxy_protocol = "v2"

{routes}
[admin]
address = "127.0.0.1:0"
"#
    )
}

fn config(http_backend: SocketAddr, l4_backend: SocketAddr) -> String {
    let required = "[listener.client_auth]\nmode = \"required\"\nca = [\"clients-ca.pem\"]\n";
    let listeners = [
        listener(
            "web",
            true,
            "http",
            &format!("{required}crl = [\"clients.crl.pem\"]\n"),
        ),
        listener(
            "opt",
            true,
            "http",
            "[listener.client_auth]\nmode = \"optional\"\nca = [\"clients-ca.pem\"]\n\
             forward_certificate = true\n[listener.cache]\nmax_bytes = 1048576\n",
        ),
        listener("l4", false, "proxied", required),
    ];
    with_pools(&listeners.concat(), http_backend, l4_backend, "")
}

/// curl to `listener`'s `/` with `args`; its exit status and output.
fn curl(daemon: &Daemon, dir: &Scratch, listener: &str, args: &[&str]) -> (bool, String) {
    curl_path(daemon, dir, listener, "/", args)
}

/// curl to `path` on `listener` with `args`.
fn curl_path(
    daemon: &Daemon,
    dir: &Scratch,
    listener: &str,
    path: &str,
    args: &[&str],
) -> (bool, String) {
    let port = daemon.listener(listener).port();
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--http1.1", "--cacert"])
        .arg(dir.0.join("cert.pem"))
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args(args)
        .arg(format!("https://localhost:{port}{path}"))
        .current_dir(&dir.0)
        .output()
        .expect("run curl");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[test]
fn client_certificates_are_required_verified_forwarded_and_revoked_without_touching_live_connections(
) {
    let rt = runtime();
    let dir = Scratch::new("identity");
    let server = support::write_identity(&dir.0);
    let ca = Ca::new("tlsaccel test clients");
    let stranger_ca = Ca::new("someone else");
    std::fs::write(dir.0.join("clients-ca.pem"), &ca.pem).expect("write");
    std::fs::write(dir.0.join("clients.crl.pem"), ca.crl(&[])).expect("write");
    let alice = ca.client(&dir.0, "alice", "alice", 5);
    let bob = ca.client(&dir.0, "bob", "bob", 7);
    let mallory = stranger_ca.client(&dir.0, "mallory", "alice", 5);
    let http = rt.block_on(backend());
    let (l4, _) = rt.block_on(proxy_backend());
    let daemon = Daemon::start(&dir.0, &config(http, l4));
    let web = daemon.listener("web");

    // curl with a certificate: the backend is told who it is, and only by the proxy.
    let (ok, out) = curl(
        &daemon,
        &dir,
        "web",
        &[
            "--cert",
            "alice.pem",
            "--key",
            "alice.key",
            "-H",
            "X-Forwarded-Client-Cert: Hash=0000;Subject=\"CN=admin\"",
            "-H",
            "X_Forwarded_Client_Cert: Hash=0001",
        ],
    );
    assert!(ok, "{out}");
    let wanted = format!(
        "xfcc=Hash={};Subject=\"CN=alice,O=tlsaccel tests\";URI=spiffe://tests.example/alice;DNS=alice.clients.example\n",
        alice.sha256()
    );
    assert_eq!(out, wanted, "one XFCC, the proxy's own");

    // Without a certificate, or with one from another CA: refused, with the right alert.
    let (ok, out) = curl(&daemon, &dir, "web", &[]);
    assert!(!ok, "curl without a certificate got in: {out}");
    let alert = rt.block_on(refused_with(web, &rustls_client(&server, None)));
    assert_eq!(alert, Some(AlertDescription::CertificateRequired));
    let alert = rt.block_on(refused_with(web, &rustls_client(&server, Some(&mallory))));
    assert_eq!(alert, Some(AlertDescription::UnknownCA));
    // Counted once the daemon has closed those connections (after a lingering close).
    for (result, at_least) in [("certificate_required", 2), ("unknown_ca", 1)] {
        let series = format!("tlsaccel_client_certificates_total{{result=\"{result}\"}}");
        let n = daemon.metric_until(&series, Duration::from_secs(10), |n| n >= at_least);
        assert!(n >= at_least, "{series} = {n}");
    }
    assert!(daemon.metric("tlsaccel_client_certificates_total{result=\"verified\"}") >= 1);

    // Bob connects (and keeps his connection), and gets a session to resume.
    let bob_config = rustls_client(&server, Some(&bob));
    assert_eq!(rt.block_on(refused_with(web, &bob_config)), None);
    let (live_send, live_conn) = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(web).await.expect("connect");
        let tls = tokio_rustls::TlsConnector::from(Arc::clone(&bob_config))
            .connect(ServerName::try_from("localhost").expect("name"), tcp)
            .await
            .expect("handshake");
        let (send, conn) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tls))
                .await
                .expect("HTTP/1.1");
        (send, tokio::spawn(conn))
    });
    let mut live_send = live_send;
    let ask = |send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>| {
        let request = Request::get("/live")
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .expect("request");
        rt.block_on(async {
            send.ready().await.expect("ready");
            let response = send.send_request(request).await.expect("answer");
            use http_body_util::BodyExt as _;
            let body = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            String::from_utf8_lossy(&body).into_owned()
        })
    };
    assert!(ask(&mut live_send).contains(&bob.sha256()));

    // Bob's certificate is revoked: the daemon reads the CRL again by itself.
    let reloads = daemon.metric("tlsaccel_client_auth_reloads_total{result=\"ok\"}");
    std::fs::write(dir.0.join("clients.crl.pem"), ca.crl(&[7])).expect("write CRL");
    let n = daemon.metric_until(
        "tlsaccel_client_auth_reloads_total{result=\"ok\"}",
        Duration::from_secs(15),
        |n| n > reloads,
    );
    assert!(n > reloads, "the new CRL was not read");
    // A new handshake, and a resumed session, are both refused...
    let fresh = rustls_client(&server, Some(&bob));
    assert_eq!(
        rt.block_on(refused_with(web, &fresh)),
        Some(AlertDescription::CertificateRevoked)
    );
    assert_eq!(
        rt.block_on(refused_with(web, &bob_config)),
        Some(AlertDescription::CertificateRevoked),
        "a resumed session is checked against the new CRL too"
    );
    let n = daemon.metric_until(
        "tlsaccel_client_certificates_total{result=\"certificate_revoked\"}",
        Duration::from_secs(10),
        |n| n >= 2,
    );
    assert!(n >= 2, "revocations counted: {n}");
    // ...while Bob's live connection goes on, and Alice is still let in.
    assert!(ask(&mut live_send).contains(&bob.sha256()));
    assert_eq!(
        rt.block_on(refused_with(web, &rustls_client(&server, Some(&alice)))),
        None
    );

    // A CRL file that is not one: the verifier in use stays.
    let failures = daemon.metric("tlsaccel_client_auth_reloads_total{result=\"failed\"}");
    std::fs::write(dir.0.join("clients.crl.pem"), "not a CRL\n").expect("write");
    let n = daemon.metric_until(
        "tlsaccel_client_auth_reloads_total{result=\"failed\"}",
        Duration::from_secs(15),
        |n| n > failures,
    );
    assert!(n > failures, "the broken CRL was not noticed");
    assert_eq!(
        rt.block_on(refused_with(web, &rustls_client(&server, Some(&bob)))),
        Some(AlertDescription::CertificateRevoked)
    );
    drop(live_send);
    live_conn.abort();
}

#[test]
fn optional_certificates_forward_the_pem_and_l4_backends_get_the_proxy_v2_identity() {
    let rt = runtime();
    let dir = Scratch::new("identity-optional");
    let server = support::write_identity(&dir.0);
    let ca = Ca::new("tlsaccel test clients");
    std::fs::write(dir.0.join("clients-ca.pem"), &ca.pem).expect("write");
    std::fs::write(dir.0.join("clients.crl.pem"), ca.crl(&[])).expect("write");
    let alice = ca.client(&dir.0, "alice", "alice", 5);
    let http = rt.block_on(backend());
    let (l4, seen) = rt.block_on(proxy_backend());
    let daemon = Daemon::start(&dir.0, &config(http, l4));

    // Optional: no certificate is fine, and a spoofed XFCC still goes.
    let (ok, out) = curl(
        &daemon,
        &dir,
        "opt",
        &["-H", "X-Forwarded-Client-Cert: Hash=0000"],
    );
    assert!(ok, "{out}");
    assert_eq!(out, "xfcc=\n");
    // With one: the PEM too, URL-encoded, as Envoy sends it.
    let (ok, out) = curl(
        &daemon,
        &dir,
        "opt",
        &["--cert", "alice.pem", "--key", "alice.key"],
    );
    assert!(ok, "{out}");
    assert!(
        out.starts_with(&format!(
            "xfcc=Hash={};Cert=\"-----BEGIN%20CERTIFICATE-----%0A",
            alice.sha256()
        )),
        "{out}"
    );
    assert!(
        out.contains("%0A-----END%20CERTIFICATE-----%0A\";Subject=\"CN=alice,O=tlsaccel tests\""),
        "{out}"
    );
    assert!(daemon.metric("tlsaccel_client_certificates_total{result=\"none\"}") >= 1);

    // The response cache does not hand one client's answer to another: an answer to a
    // request with a certificate is not shared unless the backend says it may be.
    let cert = ["--cert", "alice.pem", "--key", "alice.key"];
    let (_, first) = curl_path(&daemon, &dir, "opt", "/cached", &cert);
    assert!(first.contains(&alice.sha256()), "{first}");
    let (_, anonymous) = curl_path(&daemon, &dir, "opt", "/cached", &[]);
    assert_eq!(
        anonymous, "xfcc=\n",
        "another client got alice's cached answer"
    );

    // L4: the PROXY v2 SSL TLV carries the verified certificate's common name.
    let l4 = daemon.listener("l4");
    assert_eq!(
        rt.block_on(ping(l4, &rustls_client(&server, Some(&alice)))),
        Ok(())
    );
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen, vec![(0x01 | 0x02 | 0x04, 0, "alice".to_owned())]);
    // And without a certificate the L4 listener (required) refuses.
    assert_eq!(
        rt.block_on(ping(l4, &rustls_client(&server, None))),
        Err(Some(AlertDescription::CertificateRequired))
    );
}

/// Two trusted CAs and their clients: alice (serial 5) and bob (serial 7) from the first,
/// carol from the second; the backends.
struct Clients {
    dir: Scratch,
    server: CertificateDer<'static>,
    alice: Client,
    #[allow(dead_code)] // its files are what curl presents
    bob: Client,
    carol: Client,
    http: SocketAddr,
    l4: SocketAddr,
    seen: SslSeen,
}

impl Clients {
    fn make(rt: &tokio::runtime::Runtime, tag: &str) -> Self {
        let dir = Scratch::new(tag);
        let server = support::write_identity(&dir.0);
        let ca = Ca::new("tlsaccel test clients");
        let second = Ca::new("second CA");
        std::fs::write(
            dir.0.join("clients-ca.pem"),
            format!("{}{}", ca.pem, second.pem),
        )
        .expect("write");
        let alice = ca.client(&dir.0, "alice", "alice", 5);
        let bob = ca.client(&dir.0, "bob", "bob", 7);
        let carol = second.client(&dir.0, "carol", "carol", 9);
        let http = rt.block_on(backend());
        let (l4, seen) = rt.block_on(proxy_backend());
        Self {
            dir,
            server,
            alice,
            bob,
            carol,
            http,
            l4,
            seen,
        }
    }
}

/// Two trusted CAs, routes with access rules in HTTP mode and a listener with them in L4.
fn acl_config(http_backend: SocketAddr, l4_backend: SocketAddr) -> String {
    let required = "[listener.client_auth]\nmode = \"required\"\nca = [\"clients-ca.pem\"]\n";
    let listeners = [
        listener("web", true, "http", required),
        listener(
            "l4",
            false,
            "proxied",
            &format!(
                "{required}[[listener.acl]]\naction = \"allow\"\n\
                 san_dns = [\"alice.clients.example\"]\nsource = [\"127.0.0.0/8\"]\n"
            ),
        ),
    ];
    let routes = r#"[[route]]
listener = "web"
path_prefix = "/admin"
pool = "http"
[[route.acl]]
action = "deny"
serial = ["07"]
[[route.acl]]
action = "allow"
issuer = ["CN=tlsaccel test clients"]

[[route]]
listener = "web"
path_prefix = "/ops"
pool = "http"
[[route.acl]]
action = "allow"
san_uri = ["spiffe://tests.example/carol"]
"#;
    with_pools(&listeners.concat(), http_backend, l4_backend, routes)
}

#[test]
fn access_rules_allow_and_deny_by_certificate_and_source_in_l4_and_http_mode() {
    let rt = runtime();
    let Clients {
        dir,
        server,
        alice,
        carol,
        http,
        l4,
        seen,
        ..
    } = Clients::make(&rt, "identity-acl");
    let daemon = Daemon::start(&dir.0, &acl_config(http, l4));

    // HTTP mode: each request is decided by its route's rules (403 when denied).
    let status = |who: &str, path: &str| {
        let (ok, out) = curl_path(
            &daemon,
            &dir,
            "web",
            path,
            &[
                "--cert",
                &format!("{who}.pem"),
                "--key",
                &format!("{who}.key"),
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ],
        );
        assert!(ok, "{out}");
        out
    };
    let matrix = [
        // /admin: bob's serial is denied first, then the first CA's clients are allowed;
        // carol (the second CA) matches nothing and is denied.
        ("alice", "/admin", "200"),
        ("bob", "/admin", "403"),
        ("carol", "/admin", "403"),
        // /ops: carol's URI SAN only.
        ("alice", "/ops", "403"),
        ("carol", "/ops", "200"),
        // No rules on the default pool: everyone with a certificate.
        ("bob", "/other", "200"),
        ("carol", "/other", "200"),
    ];
    for (who, path, wanted) in matrix {
        assert_eq!(status(who, path), wanted, "{who} {path}");
    }
    assert_eq!(
        daemon.metric("tlsaccel_acl_decisions_total{result=\"allow\"}"),
        2
    );
    assert_eq!(
        daemon.metric("tlsaccel_acl_decisions_total{result=\"deny\"}"),
        3
    );

    // L4: the listener's rules decide once, for the connection: alice's DNS SAN from
    // loopback is let through to the backend; carol is refused with access_denied.
    let l4 = daemon.listener("l4");
    assert_eq!(
        rt.block_on(ping(l4, &rustls_client(&server, Some(&alice)))),
        Ok(())
    );
    assert_eq!(
        rt.block_on(ping(l4, &rustls_client(&server, Some(&carol)))),
        Err(Some(AlertDescription::AccessDenied))
    );
    assert_eq!(
        seen.lock().expect("lock").len(),
        1,
        "only alice reached the backend"
    );
}

/// The audit log's lines (each parsed as JSON).
fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

#[test]
fn the_audit_log_holds_exactly_one_record_per_decision() {
    let rt = runtime();
    let Clients {
        dir,
        server,
        alice,
        carol,
        http,
        l4,
        ..
    } = Clients::make(&rt, "identity-audit");
    let config = acl_config(http, l4).replace(
        "[admin]",
        "[audit]\nfile = \"audit.jsonl\"\nqueue = 256\n\n[admin]",
    );
    let daemon = Daemon::start(&dir.0, &config);
    let l4 = daemon.listener("l4");

    // Many L4 connections, 32 at a time: 7 in 10 alice's (let in, echoed), 2 carol's
    // (denied by the rule), 1 without a certificate (refused) — each one decision.
    let connections = 2_000usize;
    let started = std::time::Instant::now();
    let outcome = rt.block_on(async {
        let alice_config = rustls_client(&server, Some(&alice));
        let carol_config = rustls_client(&server, Some(&carol));
        let none_config = rustls_client(&server, None);
        let gate = Arc::new(tokio::sync::Semaphore::new(32));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..connections {
            let config = if i % 10 < 7 {
                Arc::clone(&alice_config)
            } else if i % 10 < 9 {
                Arc::clone(&carol_config)
            } else {
                Arc::clone(&none_config)
            };
            let gate = Arc::clone(&gate);
            tasks.spawn(async move {
                let _permit = gate.acquire_owned().await.expect("gate");
                ping(l4, &config).await.is_ok()
            });
        }
        let mut through = 0usize;
        let mut total = 0usize;
        while let Some(result) = tasks.join_next().await {
            total += 1;
            through += usize::from(result.expect("task"));
        }
        (through, total)
    });
    let seconds = started.elapsed().as_secs_f64();
    let (through, total) = outcome;
    println!(
        "audit: {total} connections in {seconds:.1} s ({:.0}/s), {through} let through",
        total as f64 / seconds
    );
    // HTTP mode: one record per request an access rule decides (and one per connection).
    for who in ["alice", "bob", "carol"] {
        let _ = curl_path(
            &daemon,
            &dir,
            "web",
            "/admin",
            &[
                "--cert",
                &format!("{who}.pem"),
                "--key",
                &format!("{who}.key"),
            ],
        );
    }
    // Every decision is in the file once the writer has caught up.
    let expected = (total + 3 + 3) as u64;
    let written = daemon.metric_until(
        "tlsaccel_audit_records_total{result=\"written\"}",
        Duration::from_secs(30),
        |n| n >= expected,
    );
    assert_eq!(written, expected, "records written");
    let lines = audit_lines(&dir.0.join("audit.jsonl"));
    assert_eq!(lines.len() as u64, expected, "one line per decision");
    let count = |event: &str, result: &str| {
        lines
            .iter()
            .filter(|l| l["event"] == event && l["result"] == result)
            .count()
    };
    assert_eq!(count("connection", "allow") as u64, through as u64 + 3);
    assert_eq!(
        count("connection", "deny") + count("connection", "certificate_required"),
        total - through
    );
    assert_eq!(through, connections * 7 / 10, "alice's, all let through");
    assert_eq!(count("connection", "deny"), connections * 2 / 10);
    assert_eq!(
        count("connection", "certificate_required"),
        connections / 10
    );
    assert_eq!(count("request", "allow"), 1, "alice on /admin");
    assert_eq!(
        count("request", "deny"),
        2,
        "bob (serial) and carol (no rule)"
    );
    let alice_line = lines
        .iter()
        .find(|l| l["event"] == "connection" && l["result"] == "allow" && l["listener"] == "l4")
        .expect("an allowed L4 connection");
    assert_eq!(alice_line["certificate"]["sha256"], alice.sha256());
    assert_eq!(
        alice_line["certificate"]["subject"],
        "CN=alice,O=tlsaccel tests"
    );
    assert_eq!(alice_line["route"], "proxied");
    assert_eq!(alice_line["rule"], 0);
    assert!(alice_line["backend"]
        .as_str()
        .is_some_and(|b| b.starts_with("127.0.0.1:")));
    assert!(alice_line["time"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    let denied_request = lines
        .iter()
        .find(|l| l["event"] == "request" && l["result"] == "deny")
        .expect("a denied request");
    assert_eq!(denied_request["path"], "/admin");
    assert_eq!(denied_request["method"], "GET");
}

#[test]
fn a_stalled_audit_sink_refuses_new_decisions_by_policy_and_loses_none() {
    let rt = runtime();
    let dir = Scratch::new("identity-audit-stall");
    let server = support::write_identity(&dir.0);
    let ca = Ca::new("tlsaccel test clients");
    std::fs::write(dir.0.join("clients-ca.pem"), &ca.pem).expect("write");
    let alice = ca.client(&dir.0, "alice", "alice", 5);
    let http = rt.block_on(backend());
    let (l4, _) = rt.block_on(proxy_backend());
    // The audit file is a FIFO nobody reads yet: the writer cannot even open it.
    let fifo = dir.0.join("audit.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let config = acl_config(http, l4).replace(
        "[admin]",
        "[audit]\nfile = \"audit.fifo\"\nqueue = 4\non_full = \"refuse\"\n\n[admin]",
    );
    let daemon = Daemon::start(&dir.0, &config);
    let l4 = daemon.listener("l4");
    let alice_config = rustls_client(&server, Some(&alice));
    let echo = |config: &Arc<rustls::ClientConfig>| rt.block_on(ping(l4, config)).is_ok();
    // The queue (4) and the record in the writer's hands fill; then decisions are refused.
    let mut let_in = 0;
    let mut refused = false;
    for _ in 0..12 {
        if echo(&alice_config) {
            let_in += 1;
        } else {
            refused = true;
            break;
        }
    }
    assert!(
        refused,
        "a full audit queue refused nobody ({let_in} let in)"
    );
    assert!(daemon.metric("tlsaccel_audit_records_total{result=\"refused\"}") >= 1);
    // A reader comes: every record of a client that was let in arrives, none lost.
    let reader_path = fifo.clone();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        let file = std::fs::File::open(reader_path).expect("open FIFO");
        for line in std::io::BufReader::new(file).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    while seen.len() < let_in {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the queued records reach the reader");
        seen.push(line);
    }
    assert!(
        seen.iter().all(|l| l.contains("\"result\":\"allow\"")),
        "{seen:?}"
    );
    // With the sink moving again, clients are let in and recorded.
    assert!(echo(&alice_config), "let in once the sink reads again");
    let line = lines_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("its record");
    assert!(line.contains("\"listener\":\"l4\""), "{line}");
}

#[test]
fn a_full_audit_file_is_renamed_and_no_record_is_lost() {
    let rt = runtime();
    let Clients {
        dir,
        server,
        alice,
        http,
        l4,
        ..
    } = Clients::make(&rt, "identity-audit-rotate");
    let config = acl_config(http, l4).replace(
        "[admin]",
        "[audit]\nfile = \"audit.jsonl\"\nmax_bytes = 4096\n\n[admin]",
    );
    let daemon = Daemon::start(&dir.0, &config);
    let l4 = daemon.listener("l4");
    let alice_config = rustls_client(&server, Some(&alice));
    let connections = 40u64;
    for _ in 0..connections {
        assert_eq!(rt.block_on(ping(l4, &alice_config)), Ok(()));
    }
    let written = daemon.metric_until(
        "tlsaccel_audit_records_total{result=\"written\"}",
        Duration::from_secs(15),
        |n| n >= connections,
    );
    assert_eq!(written, connections);
    assert!(daemon.metric("tlsaccel_audit_rotations_total") >= 2);
    // Every file: the current one and each renamed one, all lines accounted for.
    let mut files = 0;
    let mut lines = 0;
    for entry in std::fs::read_dir(&dir.0).expect("dir") {
        let path = entry.expect("entry").path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("audit.jsonl"))
        {
            files += 1;
            lines += audit_lines(&path).len() as u64;
        }
    }
    assert!(files >= 3, "{files} audit files");
    assert_eq!(lines, connections, "records across {files} files");
}

#[test]
fn audit_records_go_to_a_syslog_socket_as_rfc_5424_messages() {
    let rt = runtime();
    let Clients {
        dir,
        server,
        alice,
        carol,
        http,
        l4,
        ..
    } = Clients::make(&rt, "identity-audit-syslog");
    // A local syslog socket of the test's own, as /dev/log is to rsyslog.
    let socket_path = dir.0.join("log.sock");
    let syslog = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("bind syslog");
    syslog
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let config = acl_config(http, l4).replace(
        "[admin]",
        &format!("[audit]\nsyslog = \"{}\"\n\n[admin]", socket_path.display()),
    );
    let daemon = Daemon::start(&dir.0, &config);
    let l4 = daemon.listener("l4");
    assert_eq!(
        rt.block_on(ping(l4, &rustls_client(&server, Some(&alice)))),
        Ok(())
    );
    assert_eq!(
        rt.block_on(ping(l4, &rustls_client(&server, Some(&carol)))),
        Err(Some(AlertDescription::AccessDenied))
    );
    let mut results = Vec::new();
    let mut buf = vec![0u8; 65536];
    for _ in 0..2 {
        let n = syslog.recv(&mut buf).expect("a syslog datagram");
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(message.starts_with("<86>1 "), "{message}");
        let json = message
            .splitn(8, ' ')
            .nth(7)
            .unwrap_or_else(|| panic!("no message part: {message}"));
        let record: serde_json::Value =
            serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
        assert_eq!(record["listener"], "l4");
        results.push(record["result"].as_str().unwrap_or("").to_owned());
    }
    results.sort();
    assert_eq!(results, ["allow", "deny"]);
    assert_eq!(
        daemon.metric("tlsaccel_audit_records_total{result=\"written\"}"),
        2
    );
}
