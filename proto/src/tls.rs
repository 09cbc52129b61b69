//! TLS for every gRPC link, and the one connection made before trust exists.

use anyhow::{anyhow, Context, Result};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::pki::CertKey;

/// Server side: accepts TCP connections on `addr`, runs the TLS handshake
/// (present `me`, verify client certificates against `ca_pem`), and yields
/// established streams for `tonic::transport::Server::serve_with_incoming*`.
///
/// Doing the handshake here rather than in tonic lets every refused
/// handshake (a certificate from another CA, no certificate where one is
/// required, plain-text clients) be logged with the peer's address instead
/// of vanishing. Handshakes run concurrently, each bounded by 10 s.
///
/// With `client_auth_optional` a client may connect without a certificate;
/// only the coordinator does that, so a new agent can call `Enroll`. Every
/// other RPC then refuses a peer without a certificate (see
/// [`crate::identity::peer_identity`]).
pub async fn serve_tls(
    addr: std::net::SocketAddr,
    me: &CertKey,
    ca_pem: &str,
    client_auth_optional: bool,
) -> Result<TlsIncoming> {
    let me = Arc::new(crate::certs::LiveCert::new(me)?);
    serve_tls_live(addr, me, ca_pem, client_auth_optional).await
}

/// Established TLS streams, as [`serve_tls`] yields them.
pub type TlsIncoming = tokio_stream::wrappers::ReceiverStream<
    std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>,
>;

/// [`serve_tls`], presenting whatever `me` holds at each handshake: a
/// renewed certificate is used from the next connection on, without a
/// restart.
pub async fn serve_tls_live(
    addr: std::net::SocketAddr,
    me: Arc<crate::certs::LiveCert>,
    ca_pem: &str,
    client_auth_optional: bool,
) -> Result<TlsIncoming> {
    let config = Arc::new(server_config(me, ca_pem, client_auth_optional)?);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            // Stop listening (and free the port) once the server is gone.
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::warn!(%peer, "TLS handshake refused: {e}"),
                    Err(_) => tracing::warn!(%peer, "TLS handshake timed out after 10s"),
                }
            });
        }
    });
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
}

fn server_config(
    me: Arc<crate::certs::LiveCert>,
    ca_pem: &str,
    client_auth_optional: bool,
) -> Result<rustls::ServerConfig> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.context("reading the CA certificate")?)
            .context("trusting the CA certificate")?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    );
    let verifier = if client_auth_optional {
        verifier.allow_unauthenticated()
    } else {
        verifier
    }
    .build()
    .context("building the client certificate verifier")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(me);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Client side: trust `ca_pem`, expect the server to be `domain`, and
/// present `me` when given.
pub fn client_config(ca_pem: &str, me: Option<&CertKey>, domain: &str) -> ClientTlsConfig {
    let mut cfg = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(domain);
    if let Some(me) = me {
        cfg = cfg.identity(Identity::from_pem(&me.cert_pem, &me.key_pem));
    }
    cfg
}

/// A lazily connecting channel to `addr` ("host:port").
pub fn channel(addr: &str, tls: ClientTlsConfig, timeout: Duration) -> Result<Channel> {
    let uri = format!("https://{}", addr.trim_start_matches("https://"));
    Ok(Endpoint::from_shared(uri.clone())
        .with_context(|| format!("invalid address {addr:?}: expected host:port"))?
        .tls_config(tls)
        .with_context(|| format!("TLS settings for {uri}"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(timeout)
        .tcp_nodelay(true)
        .connect_lazy())
}

/// Fetches the CA certificate of the coordinator at `addr`, accepting it
/// only if its SHA-256 fingerprint is `pinned`.
///
/// A new agent has no CA to verify the coordinator with; its join token
/// carries the CA's fingerprint instead. This first handshake reads the
/// chain the server presents without judging it, keeps the certificate
/// matching the pin, and every later connection verifies the server against
/// that CA in the ordinary way. Nothing is sent over this connection.
pub async fn fetch_pinned_ca(addr: &str, pinned: &str) -> Result<String> {
    use rustls::pki_types::ServerName;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ReadOnly(provider)))
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("connecting to the coordinator at {addr}: timed out"))?
        .with_context(|| format!("connecting to the coordinator at {addr}"))?;
    let name = ServerName::try_from(crate::pki::COORDINATOR_DNS)?;
    let tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
        .await
        .map_err(|_| anyhow!("TLS handshake with {addr}: timed out"))?
        .with_context(|| format!("TLS handshake with {addr}"))?;
    let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
    let mut seen = Vec::new();
    for cert in chain {
        let fp = crate::pki::fingerprint_der(cert.as_ref());
        if fp == pinned {
            return Ok(der_to_pem(cert.as_ref()));
        }
        seen.push(fp);
    }
    Err(PinMismatch(format!(
        "the coordinator at {addr} does not present the CA pinned by the join token \
         (token pins {pinned}, server presents {}): the token was made by another \
         coordinator, or something is intercepting the connection",
        if seen.is_empty() {
            "no certificates".to_string()
        } else {
            seen.join(", ")
        }
    ))
    .into())
}

/// The server answered, but not with the CA the join token pins: a refusal,
/// not a fault worth retrying.
#[derive(Debug)]
pub struct PinMismatch(pub String);

impl std::fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PinMismatch {}

fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Accepts any server certificate, but still checks handshake signatures so
/// the peer proves it holds the key of the certificate it shows. Used only by
/// [`fetch_pinned_ca`], which then matches the chain against the pin.
#[derive(Debug)]
struct ReadOnly(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for ReadOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Installs ring as the process-wide rustls provider. Call once at start of
/// every binary: with more than one provider compiled in, rustls refuses to
/// guess.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
