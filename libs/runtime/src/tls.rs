//! TLS for the gRPC API: the certificate this process serves with, the CA
//! it trusts, and optional client certificates (mTLS), from PEM files.
//!
//! One set of options for every service and for redmeshctl. With a
//! certificate and key, the gRPC server speaks only TLS; with a CA, every
//! gRPC call this process makes uses TLS and verifies the server against
//! it, whatever scheme a URL names (so `--broker http://…` need not change
//! when TLS is turned on). With `--tls-client-auth`, servers also require a
//! client certificate signed by that CA, and clients present their own.
//!
//! Servers re-read the files when one changes (checked as connections
//! arrive), so a renewed certificate takes effect without a restart; a
//! broken renewal is logged and the last good one kept. Clients read them
//! whenever they open a connection.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::{
    self,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
};
use tokio_rustls::TlsAcceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// Longest a client may take to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why TLS cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Which file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A file holds no usable PEM of the right kind.
    #[error("{what} {path}: {why}")]
    Invalid {
        /// Which file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The options do not go together.
    #[error("{0}")]
    Options(String),
    /// A gRPC address cannot be used.
    #[error("invalid gRPC address {addr:?}: {why}")]
    Address {
        /// The address.
        addr: String,
        /// What is wrong.
        why: String,
    },
}

/// The TLS options of every service and of redmeshctl.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate chain this process's gRPC server presents (with
    /// --tls-key; the server then accepts only TLS), and its client
    /// certificate under --tls-client-auth. Re-read when it changes.
    #[arg(
        long = "tls-cert",
        env = "REDMESH_TLS_CERT",
        global = true,
        requires = "key"
    )]
    pub cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(
        long = "tls-key",
        env = "REDMESH_TLS_KEY",
        global = true,
        requires = "cert"
    )]
    pub key: Option<PathBuf>,
    /// PEM CA bundle: with it, every gRPC call this process makes uses TLS
    /// and verifies the server's certificate against it.
    #[arg(long = "tls-ca", env = "REDMESH_TLS_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Mutual TLS: the gRPC server requires a client certificate signed by
    /// --tls-ca, and this process's calls present --tls-cert.
    #[arg(
        long = "tls-client-auth",
        env = "REDMESH_TLS_CLIENT_AUTH",
        global = true,
        requires = "ca"
    )]
    pub client_auth: bool,
}

/// Whether a TLS server asks its clients for certificates (as Redis's
/// `tls-auth-clients`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ClientCerts {
    /// Clients need no certificate.
    #[default]
    No,
    /// A client may present one; if it does, it must be signed by --tls-ca.
    Optional,
    /// Every client must present a certificate signed by --tls-ca.
    Yes,
}

/// What [`TlsArgs::install`] made this process's.
#[derive(Debug, Clone)]
struct Installed {
    args: TlsArgs,
    server: Option<Arc<ServerState>>,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

impl TlsArgs {
    /// Checks the files now (a typo fails at start, naming the file) and
    /// makes the options this process's: [`crate::grpc::serve`] and
    /// [`endpoint`] follow them. Does nothing when no option is set.
    pub fn install(&self) -> Result<(), TlsError> {
        if self.cert.is_none() && self.ca.is_none() {
            return Ok(());
        }
        if self.client_auth && self.cert.is_none() {
            return Err(TlsError::Options(
                "--tls-client-auth needs --tls-cert and --tls-key: clients present them".into(),
            ));
        }
        let clients = if self.client_auth {
            ClientCerts::Yes
        } else {
            ClientCerts::No
        };
        let server = match (&self.cert, &self.key) {
            // gRPC is HTTP/2 only.
            (Some(_), Some(_)) => Some(Arc::new(ServerState::load(
                self,
                vec![b"h2".to_vec()],
                clients,
            )?)),
            _ => None,
        };
        if self.ca.is_some() {
            client_config(self)?;
        }
        tracing::info!(
            server = server.is_some(),
            client = self.ca.is_some(),
            mutual = self.client_auth,
            "TLS on the gRPC API"
        );
        let _ = INSTALLED.set(Installed {
            args: self.clone(),
            server,
        });
        Ok(())
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn invalid(what: &'static str, path: &Path, why: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        what,
        path: path.to_owned(),
        why: why.into(),
    }
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    parse_certs(what, path, &read(what, path)?)
}

/// The certificates in `pem` (read from `path`), at least one.
fn parse_certs(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(what, path, format!("unreadable PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(what, path, "holds no CERTIFICATE block"));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read("TLS key", path)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| invalid("TLS key", path, format!("holds no usable private key: {e}")))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's rustls configuration, rebuilt when a file changes.
struct ServerState {
    args: TlsArgs,
    alpn: Vec<Vec<u8>>,
    clients: ClientCerts,
    current: Mutex<(Vec<Option<SystemTime>>, TlsAcceptor)>,
}

impl std::fmt::Debug for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerState")
            .field("args", &self.args)
            .finish_non_exhaustive()
    }
}

impl ServerState {
    /// Modification times of the files in use.
    fn stamps(args: &TlsArgs) -> Vec<Option<SystemTime>> {
        [&args.cert, &args.key, &args.ca]
            .into_iter()
            .flatten()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }

    fn load(args: &TlsArgs, alpn: Vec<Vec<u8>>, clients: ClientCerts) -> Result<Self, TlsError> {
        let stamps = Self::stamps(args);
        let acceptor = server_acceptor(args, &alpn, clients)?;
        Ok(Self {
            args: args.clone(),
            alpn,
            clients,
            current: Mutex::new((stamps, acceptor)),
        })
    }

    /// The acceptor for the next connection, rebuilt if a file changed.
    fn acceptor(&self) -> TlsAcceptor {
        let stamps = Self::stamps(&self.args);
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if cur.0 != stamps {
            match server_acceptor(&self.args, &self.alpn, self.clients) {
                Ok(a) => {
                    tracing::info!("TLS certificate files changed; new connections use them");
                    *cur = (stamps, a);
                }
                Err(e) => {
                    // Retried at the next change only, not per connection.
                    tracing::error!(error = %e, "TLS files changed but cannot be used; keeping the previous ones");
                    cur.0 = stamps;
                }
            }
        }
        cur.1.clone()
    }
}

fn server_acceptor(
    args: &TlsArgs,
    alpn: &[Vec<u8>],
    clients: ClientCerts,
) -> Result<TlsAcceptor, TlsError> {
    let (Some(cert_path), Some(key_path)) = (&args.cert, &args.key) else {
        return Err(TlsError::Options(
            "a TLS server needs --tls-cert and --tls-key".into(),
        ));
    };
    let chain = certs("TLS certificate", cert_path)?;
    let key = key(key_path)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Options(e.to_string()))?;
    let builder = if clients != ClientCerts::No {
        let ca_path = args.ca.as_ref().ok_or_else(|| {
            TlsError::Options("verifying client certificates needs --tls-ca".into())
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for c in certs("TLS CA", ca_path)? {
            roots
                .add(c)
                .map_err(|e| invalid("TLS CA", ca_path, e.to_string()))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
        let verifier = if clients == ClientCerts::Optional {
            verifier.allow_unauthenticated()
        } else {
            verifier
        };
        let verifier = verifier
            .build()
            .map_err(|e| invalid("TLS CA", ca_path, e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        invalid(
            "TLS key",
            key_path,
            format!("does not fit the certificate: {e}"),
        )
    })?;
    config.alpn_protocols = alpn.to_vec();
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn client_config(args: &TlsArgs) -> Result<Option<ClientTlsConfig>, TlsError> {
    let Some(ca_path) = &args.ca else {
        return Ok(None);
    };
    let ca = read("TLS CA", ca_path)?;
    parse_certs("TLS CA", ca_path, &ca)?;
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if args.client_auth {
        if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
            let chain = read("TLS certificate", cert)?;
            let k = read("TLS key", key)?;
            config = config.identity(Identity::from_pem(chain, k));
        }
    }
    Ok(Some(config))
}

/// Whether this process's gRPC calls use TLS.
pub fn client_tls() -> bool {
    INSTALLED.get().is_some_and(|i| i.args.ca.is_some())
}

/// The URL of a gRPC server at `target` (`host:port` or a URL), with the
/// scheme this process's TLS options call for.
pub fn url(target: &str) -> String {
    let bare = target
        .strip_prefix("https://")
        .or_else(|| target.strip_prefix("http://"))
        .unwrap_or(target);
    let scheme = if client_tls() { "https" } else { "http" };
    format!("{scheme}://{bare}")
}

/// An endpoint for the gRPC server at `target` (`host:port` or a URL),
/// over TLS when this process has a CA (see the module comment).
pub fn endpoint(target: &str) -> Result<Endpoint, TlsError> {
    let url = url(target);
    let bad = |why: String| TlsError::Address {
        addr: target.to_owned(),
        why,
    };
    let endpoint = Endpoint::from_shared(url).map_err(|e| bad(e.to_string()))?;
    match INSTALLED.get() {
        Some(i) => match client_config(&i.args)? {
            Some(c) => endpoint.tls_config(c).map_err(|e| bad(e.to_string())),
            None => Ok(endpoint),
        },
        None => Ok(endpoint),
    }
}

/// A TLS server of another protocol than gRPC (the proxies' RESP
/// listener), on this process's certificate: it follows renewals like the
/// gRPC server.
#[derive(Debug, Clone)]
pub struct TlsServer(Arc<ServerState>);

impl TlsServer {
    /// The acceptor for the next connection (rebuilt if a file changed).
    pub fn acceptor(&self) -> TlsAcceptor {
        self.0.acceptor()
    }
}

/// A TLS server on the installed certificate and key, offering `alpn` (none:
/// empty) and asking clients for certificates as `clients` says. Fails when
/// no certificate is installed, naming what is missing.
pub fn server(alpn: &[&[u8]], clients: ClientCerts) -> Result<TlsServer, TlsError> {
    let Some(args) = INSTALLED
        .get()
        .map(|i| &i.args)
        .filter(|a| a.cert.is_some())
    else {
        return Err(TlsError::Options(
            "a TLS listener needs --tls-cert and --tls-key".into(),
        ));
    };
    let alpn = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsServer(Arc::new(ServerState::load(args, alpn, clients)?)))
}

/// TLS connections accepted by [`incoming`].
pub(crate) type TlsIncoming = tokio_stream::wrappers::ReceiverStream<
    std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>,
>;

/// With a server certificate installed: accepts TLS connections on
/// `listener` (handshakes run concurrently, each bounded, and a failed one
/// is logged and dropped) and yields them to the gRPC server. Without one,
/// gives the listener back.
pub(crate) fn incoming(listener: TcpListener) -> Result<TlsIncoming, TcpListener> {
    let Some(state) = INSTALLED.get().and_then(|i| i.server.clone()) else {
        return Err(listener);
    };
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                _ = tx.closed() => return,
                r = listener.accept() => match r {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a gRPC connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let acceptor = state.acceptor();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        metrics::counter!("redmesh_grpc_tls_handshake_failures_total").increment(1);
                        tracing::warn!(%peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        metrics::counter!("redmesh_grpc_tls_handshake_failures_total").increment(1);
                        tracing::warn!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
}
