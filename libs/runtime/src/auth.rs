//! Bearer-token authentication of the gRPC API: a server layer that refuses
//! calls without a valid `authorization: Bearer <token>`, and the token
//! every gRPC client of this process sends.
//!
//! Tokens live in a file (`--api-token-file`), one per line; blank lines and
//! `#` comments are ignored. Servers accept any listed token and clients
//! send the first, so a token is rotated without downtime: add the new one
//! to every file, put it first, then remove the old one. Servers re-read
//! the file when it changes. Only SHA-256 digests of the tokens are kept
//! for comparison, and the token never reaches logs or metrics.
//!
//! Health checks (`grpc.health.v1.Health`) stay open, so load balancers and
//! Kubernetes probes need no secret. Without a file everything is open, as
//! before; the local system and the tests run that way unless they set one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tonic::codegen::http;
use tonic::Status;

/// Why the token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file cannot be read.
    #[error("cannot read the API token file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file lists no token, or one that cannot travel in a header.
    #[error("the API token file {path} {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// The API token option of every service and of redmeshctl.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ApiTokenArgs {
    /// File of API tokens, one per line: gRPC calls must carry one
    /// (`authorization: Bearer <token>`), and this process's own calls send
    /// the first. Re-read when it changes. Unset: the API is open.
    #[arg(long = "api-token-file", env = "REDMESH_API_TOKEN_FILE", global = true)]
    pub file: Option<PathBuf>,
}

impl ApiTokenArgs {
    /// Reads the file and makes its tokens this process's (clients send the
    /// first, servers require one). `watch`: re-read it when it changes
    /// (needs a Tokio runtime). Does nothing without a file.
    pub fn install(&self, watch: bool) -> Result<(), AuthError> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let (set, modified) = read(path)?;
        let tokens = TOKENS.get_or_init(|| Arc::new(RwLock::new(set.clone())));
        *tokens.write().unwrap_or_else(|e| e.into_inner()) = set;
        tracing::info!(file = %path.display(), "API tokens required on gRPC calls");
        if watch {
            tokio::spawn(reload(path.clone(), modified, tokens.clone()));
        }
        Ok(())
    }
}

/// The installed tokens, if any.
static TOKENS: OnceLock<Arc<RwLock<TokenSet>>> = OnceLock::new();

#[derive(Clone)]
struct TokenSet {
    digests: Vec<[u8; 32]>,
    /// `Bearer <first token>`.
    header: http::HeaderValue,
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// Reads and checks the token file.
fn read(path: &Path) -> Result<(TokenSet, Option<SystemTime>), AuthError> {
    let io = |source| AuthError::Read {
        path: path.to_owned(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(io)?;
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let invalid = |why: &str| AuthError::Invalid {
        path: path.to_owned(),
        why: why.to_owned(),
    };
    let tokens: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let first = tokens.first().ok_or_else(|| invalid("lists no token"))?;
    if tokens.iter().any(|t| t.len() < 16) {
        return Err(invalid("has a token shorter than 16 characters"));
    }
    if tokens
        .iter()
        .any(|t| !t.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(invalid(
            "has a token with spaces or non-ASCII characters (it must fit an HTTP header)",
        ));
    }
    let mut header = http::HeaderValue::from_str(&format!("Bearer {first}"))
        .map_err(|_| invalid("has a token that cannot be sent in a header"))?;
    header.set_sensitive(true);
    Ok((
        TokenSet {
            digests: tokens.iter().map(|t| digest(t.as_bytes())).collect(),
            header,
        },
        modified,
    ))
}

/// How often the token file is checked for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// Re-reads the file whenever its modification time changes. A file that
/// becomes unreadable or invalid keeps the previous tokens (and says so):
/// locking everyone out over a half-written file would be worse.
async fn reload(path: PathBuf, mut seen: Option<SystemTime>, tokens: Arc<RwLock<TokenSet>>) {
    let mut tick = tokio::time::interval(RELOAD_EVERY);
    loop {
        tick.tick().await;
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        if modified == seen {
            continue;
        }
        seen = modified;
        match read(&path) {
            Ok((set, _)) => {
                let count = set.digests.len();
                *tokens.write().unwrap_or_else(|e| e.into_inner()) = set;
                tracing::info!(file = %path.display(), tokens = count, "API tokens reloaded");
            }
            Err(e) => tracing::warn!(error = %e, "keeping the previous API tokens"),
        }
    }
}

/// The `authorization` header this process's calls carry, if any.
pub(crate) fn client_header() -> Option<http::HeaderValue> {
    TOKENS
        .get()
        .map(|t| t.read().unwrap_or_else(|e| e.into_inner()).header.clone())
}

/// Why a request is refused, or `None` to let it through.
fn refusal<B>(req: &http::Request<B>) -> Option<Status> {
    let tokens = TOKENS.get()?;
    if req.uri().path().starts_with("/grpc.health.v1.Health/") {
        return None;
    }
    let presented = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    let Some(presented) = presented else {
        return Some(Status::unauthenticated(
            "missing API token: send 'authorization: Bearer <token>' (redmeshctl --api-token-file)",
        ));
    };
    let d = digest(presented);
    let known = tokens.read().unwrap_or_else(|e| e.into_inner());
    // Digests of equal length: comparing them leaks nothing useful about
    // the tokens themselves.
    (!known.digests.contains(&d)).then(|| Status::unauthenticated("invalid API token"))
}

/// The server layer: `Server::builder().layer(RequireTokenLayer)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequireTokenLayer;

impl<S> tower::Layer<S> for RequireTokenLayer {
    type Service = RequireToken<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequireToken { inner }
    }
}

/// The service the layer wraps around the server's routes.
#[derive(Debug, Clone)]
pub struct RequireToken<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for RequireToken<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        futures::future::Either<std::future::Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match refusal(&req) {
            Some(status) => {
                futures::future::Either::Left(std::future::ready(Ok(status.into_http())))
            }
            None => futures::future::Either::Right(self.inner.call(req)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn the_file_lists_tokens_and_the_first_is_sent() {
        let f = file("# rotation in progress\n\nnew-token-0123456789\n  old-token-0123456789  \n");
        let (set, _) = read(f.path()).unwrap();
        assert_eq!(set.digests.len(), 2);
        assert_eq!(set.header, "Bearer new-token-0123456789");
        assert!(set.header.is_sensitive());
        assert!(set.digests.contains(&digest(b"old-token-0123456789")));
    }

    #[test]
    fn unusable_files_are_refused_with_the_reason() {
        for (text, why) in [
            ("", "lists no token"),
            ("# only a comment\n", "lists no token"),
            ("short\n", "shorter than 16"),
            ("has a space in it, long enough\n", "spaces"),
            ("jeton-très-long-123456\n", "non-ASCII"),
        ] {
            let f = file(text);
            let e = read(f.path()).err().expect(text).to_string();
            assert!(e.contains(why), "{text:?}: {e}");
        }
        let e = read(Path::new("/nonexistent/tokens"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("/nonexistent/tokens"), "{e}");
    }
}
