//! The gRPC listener's transport: plain TCP, TLS, or mutual TLS.
//!
//! Certificates are read from PEM files (`[tls]`) and read again when the
//! files change or the process gets SIGHUP: new connections use the new
//! certificate, connections already open keep theirs. A file that does not
//! parse is logged and the certificate in use stays.
//!
//! Each accepted connection carries a [`Peer`]: its address and, under
//! mutual TLS, the names of its client certificate (subject common name,
//! DNS and URI subject alternative names), which `[auth]` identities can
//! name instead of a bearer token.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// TLS settings of the gRPC listener (`[tls]`); off unless `cert` is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the server's certificate chain, leaf first.
    pub cert: Option<PathBuf>,
    /// PEM file with the server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// PEM file with the CA certificates that sign client certificates:
    /// mutual TLS. A client without a certificate from one of them is
    /// refused in the handshake.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: also let clients without a certificate connect
    /// (they must then authenticate with a bearer token when `[auth]` has
    /// identities). A certificate that is presented must still verify.
    pub client_certificate_optional: bool,
    /// How often the files are checked for changes (SIGHUP reads them at once).
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// How long a client may take to complete its handshake.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: None,
            key: None,
            client_ca: None,
            client_certificate_optional: false,
            reload_interval: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl TlsConfig {
    /// Whether the listener speaks TLS.
    pub fn enabled(&self) -> bool {
        self.cert.is_some()
    }

    /// Whether clients may present certificates.
    pub fn mutual(&self) -> bool {
        self.client_ca.is_some()
    }

    /// Why these settings may not be used, if they may not. The files
    /// themselves are read (and any problem named) when the server starts.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.cert, &self.key) {
            (Some(_), None) | (None, Some(_)) => {
                return Err("tls.cert and tls.key must be set together".into());
            }
            _ => {}
        }
        if self.client_ca.is_some() && self.cert.is_none() {
            return Err("tls.client_ca needs tls.cert and tls.key (mutual TLS is TLS)".into());
        }
        if self.client_certificate_optional && self.client_ca.is_none() {
            return Err("tls.client_certificate_optional needs tls.client_ca".into());
        }
        if self.reload_interval.is_zero() || self.handshake_timeout.is_zero() {
            return Err("tls.reload_interval and tls.handshake_timeout must be positive".into());
        }
        Ok(())
    }
}

/// The caller at the other end of a connection.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// The client's address, when known.
    pub remote_addr: Option<SocketAddr>,
    /// The verified client certificate's subject common name and DNS and
    /// URI subject alternative names; empty without one.
    pub certificate_names: Arc<[String]>,
}

/// An accepted connection, plain or TLS.
pub struct Connection {
    io: Io,
    peer: Peer,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(stream) => stream.is_write_vectored(),
            Io::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The server's TLS configuration in use, replaced whole on reload.
pub struct TlsServer {
    settings: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
    /// Modification times of the files at the last (attempted) load.
    stamps: Mutex<Vec<Option<SystemTime>>>,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl TlsServer {
    /// Reads the files; `None` when TLS is off.
    pub fn load(settings: &TlsConfig) -> Result<Option<Arc<TlsServer>>, TlsError> {
        if !settings.enabled() {
            return Ok(None);
        }
        let stamps = file_stamps(settings);
        let config = build(settings)?;
        Ok(Some(Arc::new(TlsServer {
            settings: settings.clone(),
            current: RwLock::new(Arc::new(config)),
            stamps: Mutex::new(stamps),
        })))
    }

    /// Reads the files again and, when they make a valid configuration,
    /// uses it for the connections accepted from now on.
    pub fn reload(&self) -> Result<(), TlsError> {
        *self.stamps.lock().expect("stamps lock") = file_stamps(&self.settings);
        let config = build(&self.settings)?;
        *self.current.write().expect("tls config lock") = Arc::new(config);
        Ok(())
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().expect("tls config lock").clone())
    }

    /// Reloads on SIGHUP and when a file's modification time changes,
    /// until `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let mut hangups = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::hangup(),
        ) {
            Ok(signal) => Some(signal),
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGHUP; TLS files are still checked for changes");
                None
            }
        };
        let mut tick = tokio::time::interval(self.settings.reload_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let why = tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(()) = async { match hangups.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                } } => "SIGHUP",
                _ = tick.tick() => {
                    if file_stamps(&self.settings) == *self.stamps.lock().expect("stamps lock") {
                        continue;
                    }
                    "a changed file"
                }
            };
            match self.reload() {
                Ok(()) => tracing::info!(after = why, "TLS certificates reloaded"),
                Err(error) => tracing::error!(
                    after = why,
                    error = %causes(&error),
                    "TLS certificates not reloaded; the ones in use stay"
                ),
            }
        }
    }
}

fn file_stamps(settings: &TlsConfig) -> Vec<Option<SystemTime>> {
    [&settings.cert, &settings.key, &settings.client_ca]
        .into_iter()
        .flatten()
        .map(|path| std::fs::metadata(path).and_then(|m| m.modified()).ok())
        .collect()
}

/// Why the `[tls]` files do not make a server configuration. Each message
/// names the file and says what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Only one of `tls.cert` and `tls.key` is set.
    #[error("tls.cert and tls.key must be set together")]
    Incomplete,
    /// A certificate file cannot be read or is not PEM.
    #[error("reading certificates from {}", path.display())]
    Certificates {
        /// The file.
        path: PathBuf,
        /// What reading it found.
        source: rustls_pki_types::pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("{} holds no PEM certificate", .0.display())]
    NoCertificate(PathBuf),
    /// The private key file cannot be read or holds no key.
    #[error("reading the private key {}", path.display())]
    PrivateKey {
        /// The file.
        path: PathBuf,
        /// What reading it found.
        source: rustls_pki_types::pem::Error,
    },
    /// A CA certificate of `tls.client_ca` is not one rustls accepts.
    #[error("a CA certificate in {}", path.display())]
    CaCertificate {
        /// The file.
        path: PathBuf,
        /// Why rustls refused it.
        source: rustls::Error,
    },
    /// The client certificate verifier cannot be built from the CAs.
    #[error("verifying client certificates")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The certificate does not go with the private key.
    #[error("the certificate and key do not go together")]
    KeyMismatch(#[source] rustls::Error),
    /// rustls refused the configuration (protocol versions).
    #[error("TLS configuration")]
    Config(#[from] rustls::Error),
}

/// An error and its causes, outermost first, as one line.
fn causes(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|found| found.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Certificates {
            path: path.to_owned(),
            source,
        })?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certificates)
}

fn build(settings: &TlsConfig) -> Result<ServerConfig, TlsError> {
    let (Some(cert), Some(key)) = (&settings.cert, &settings.key) else {
        return Err(TlsError::Incomplete);
    };
    let chain = certificates(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::PrivateKey {
        path: key.to_owned(),
        source,
    })?;
    // The provider is named rather than taken from the process default, so
    // that no other crate's choice can change (or break) it.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &settings.client_ca {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for certificate in certificates(path)? {
                roots
                    .add(certificate)
                    .map_err(|source| TlsError::CaCertificate {
                        path: path.to_owned(),
                        source,
                    })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if settings.client_certificate_optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(verifier.build()?)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(TlsError::KeyMismatch)?;
    // gRPC is HTTP/2 only; clients check that it was negotiated.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The names a client certificate is known by: its subject common names,
/// then its DNS and URI subject alternative names.
fn certificate_names(certificate: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(certificate.as_ref()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = parsed
        .subject()
        .iter_common_name()
        .filter_map(|name| name.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(alternative)) = parsed.subject_alternative_name() {
        for name in &alternative.value.general_names {
            match name {
                GeneralName::DNSName(name) | GeneralName::URI(name) => {
                    names.push((*name).to_owned())
                }
                _ => {}
            }
        }
    }
    names
}

/// Connections accepted on `listener` until `shutdown`, with their TLS
/// handshakes (when `tls` is set) done off the accepting task, so that a
/// slow or silent client holds up no one else's.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<TlsServer>>,
    shutdown: CancellationToken,
) -> impl Stream<Item = Result<Connection, io::Error>> {
    let (sender, receiver) = mpsc::channel(256);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = sender.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, remote_addr) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Small responses must not wait for Nagle's algorithm and
            // delayed ACKs (40 ms each time).
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "could not set TCP_NODELAY");
            }
            let mut peer = Peer {
                remote_addr: Some(remote_addr),
                certificate_names: Arc::from([]),
            };
            let Some(tls) = &tls else {
                let connection = Connection {
                    io: Io::Plain(stream),
                    peer,
                };
                if sender.send(Ok(connection)).await.is_err() {
                    return;
                }
                continue;
            };
            let acceptor = tls.acceptor();
            let timeout = tls.settings.handshake_timeout;
            let sender = sender.clone();
            tokio::spawn(async move {
                let stream = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        tracing::debug!(%remote_addr, %error, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%remote_addr, "TLS handshake timed out");
                        return;
                    }
                };
                if let Some(certificate) = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                {
                    peer.certificate_names = certificate_names(certificate).into();
                }
                let _ = sender
                    .send(Ok(Connection {
                        io: Io::Tls(Box::new(stream)),
                        peer,
                    }))
                    .await;
            });
        }
    });
    ReceiverStream::new(receiver)
}
