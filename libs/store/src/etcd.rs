//! `MetaStore` over a real etcd cluster (etcd-client, v3 API).
//!
//! Every request has a deadline, so a dead etcd turns into a prompt
//! `Unavailable` error instead of a hang; the underlying channel reconnects
//! by itself when etcd returns.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use etcd_client::{
    Certificate, Client, Compare as ECompare, CompareOp as ECompareOp, ConnectOptions, EventType,
    GetOptions, Identity, LeaseKeepAliveStream, LeaseKeeper, PutOptions, TlsOptions, Txn as ETxn,
    TxnOp as ETxnOp, TxnOpResponse, WatchOptions,
};
use futures::StreamExt;
use tokio::sync::Mutex;
use tracing::Instrument;

use crate::{
    Compare, CompareOp, CompareTarget, EventKind, KeyValue, LeaseId, Listing, MetaStore, Op,
    Revision, StoreError, Txn, TxnResult, WatchBatch, WatchEvent, WatchStream,
};

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Per-request deadline.
    pub request_timeout: Duration,
    /// TCP connect deadline.
    pub connect_timeout: Duration,
    /// Optional user name and password (etcd auth).
    pub user: Option<(String, String)>,
    /// TLS to etcd: endpoints are reached over https.
    pub tls: Option<EtcdTls>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(2),
            user: None,
            tls: None,
        }
    }
}

/// PEM files for TLS to etcd.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// CA bundle etcd's certificate is verified against.
    pub ca: PathBuf,
    /// Client certificate chain and key, when etcd requires them
    /// (`--client-cert-auth`).
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl EtcdTls {
    fn options(&self) -> Result<TlsOptions, StoreError> {
        let read = |what: &str, p: &PathBuf| {
            std::fs::read(p).map_err(|e| {
                StoreError::Rejected(format!("cannot read etcd TLS {what} {}: {e}", p.display()))
            })
        };
        let mut tls =
            TlsOptions::new().ca_certificate(Certificate::from_pem(read("CA", &self.ca)?));
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(Identity::from_pem(
                read("certificate", cert)?,
                read("key", key)?,
            ));
        }
        Ok(tls)
    }
}

/// The endpoints as etcd-client needs them: https with TLS (whatever
/// scheme was written, as for gRPC URLs), and an https endpoint without a
/// CA refused, since nothing could verify it.
fn endpoint_urls(endpoints: &[String], tls: bool) -> Result<Vec<String>, StoreError> {
    endpoints
        .iter()
        .map(|e| {
            let bare = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"));
            match (bare, tls) {
                (Some(b), true) => Ok(format!("https://{b}")),
                (None, true) => Ok(format!("https://{e}")),
                (_, false) if e.starts_with("https://") => Err(StoreError::Rejected(format!(
                    "etcd endpoint {e} is https: give the CA to trust with --etcd-ca"
                ))),
                (_, false) => Ok(e.clone()),
            }
        })
        .collect()
}

type Keeper = Arc<Mutex<(LeaseKeeper, LeaseKeepAliveStream)>>;

/// A connection to etcd. Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    endpoints: Arc<Vec<String>>,
    keepers: Arc<Mutex<HashMap<LeaseId, Keeper>>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

impl EtcdStore {
    /// Prepares a client for `endpoints` (`http://host:port`,
    /// `https://host:port` or `host:port`). Connecting is lazy: this
    /// succeeds while etcd is down and requests fail with `Unavailable`
    /// until it is up. With a user, etcd's answer to the password is
    /// awaited if etcd answers at all, so a wrong one fails here, naming
    /// the user; while etcd is down it is retried in the background.
    pub async fn connect(endpoints: &[String], opts: &EtcdOptions) -> Result<Self, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::Rejected("no etcd endpoints configured".into()));
        }
        let urls = endpoint_urls(endpoints, opts.tls.is_some())?;
        let mut o = ConnectOptions::new()
            .with_timeout(opts.request_timeout)
            .with_connect_timeout(opts.connect_timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true)
            // etcd's simple tokens expire after 5 idle minutes.
            .with_auto_token_refresh(true);
        if let Some(tls) = &opts.tls {
            o = o.with_tls(tls.options()?);
        }
        let client = match &opts.user {
            None => Client::connect(&urls, Some(o))
                .await
                .map_err(|e| map_err(&e, &urls, None))?,
            Some((user, pass)) => {
                match Client::connect(&urls, Some(o.clone().with_user(user, pass))).await {
                    Ok(client) => client,
                    Err(e) => match map_err(&e, &urls, None) {
                        StoreError::Unavailable(_) => {
                            tracing::warn!(error = %e, user, "etcd unreachable; authenticating once it answers");
                            let client = Client::connect(&urls, Some(o))
                                .await
                                .map_err(|e| map_err(&e, &urls, None))?;
                            tokio::spawn(authenticate(client.clone(), user.clone(), pass.clone()));
                            client
                        }
                        _ => {
                            return Err(StoreError::Rejected(format!(
                                "etcd at {} refused user {user:?}: {}",
                                urls.join(","),
                                auth_message(&e)
                            )))
                        }
                    },
                }
            }
        };
        Ok(Self {
            client,
            endpoints: Arc::new(urls),
            keepers: Arc::default(),
        })
    }

    fn err(&self, e: etcd_client::Error) -> StoreError {
        map_err(&e, &self.endpoints, None)
    }

    fn lease_err(&self, e: etcd_client::Error, lease: Option<LeaseId>) -> StoreError {
        map_err(&e, &self.endpoints, lease)
    }
}

/// Logs in as `user` once etcd answers (a connection made while it was
/// down), retrying with backoff; until then requests go unauthenticated and
/// etcd refuses them.
async fn authenticate(mut client: Client, user: String, pass: String) {
    let mut delay = Duration::from_millis(100);
    loop {
        match client.update_user(Some((user.clone(), pass.clone()))).await {
            Ok(()) => {
                tracing::info!(user, "authenticated to etcd");
                return;
            }
            Err(e) => {
                tracing::warn!(user, error = %auth_message(&e), "etcd authentication failed; retrying");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// etcd's reason for refusing a login, without the gRPC wrapping.
fn auth_message(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.message().to_owned(),
        other => other.to_string(),
    }
}

/// Maps an etcd-client error; `lease` names the lease an operation used, so
/// "lease not found" (which etcd reports in several shapes) becomes
/// `LeaseNotFound(lease)`.
fn map_err(e: &etcd_client::Error, endpoints: &[String], lease: Option<LeaseId>) -> StoreError {
    use etcd_client::Error as E;
    let at = endpoints.join(",");
    if let Some(id) = lease {
        if e.to_string().contains("lease not found") {
            return StoreError::LeaseNotFound(id);
        }
    }
    match e {
        E::GRpcStatus(s) if s.message().contains("user name is empty") => StoreError::Rejected(
            format!("etcd at {at} requires authentication: set --etcd-user and --etcd-password"),
        ),
        E::GRpcStatus(s) => match s.code() {
            tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown => {
                StoreError::Unavailable(format!("etcd at {at}: {}", s.message()))
            }
            _ => StoreError::Rejected(format!("etcd at {at}: {:?}: {}", s.code(), s.message())),
        },
        E::TransportError(t) => StoreError::Unavailable(format!("etcd at {at}: {t}")),
        E::IoError(io) => StoreError::Unavailable(format!("etcd at {at}: {io}")),
        other => StoreError::Rejected(format!("etcd at {at}: {other}")),
    }
}

fn kv(k: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(k.key()).into_owned(),
        value: Bytes::copy_from_slice(k.value()),
        create_revision: k.create_revision(),
        mod_revision: k.mod_revision(),
        version: k.version(),
        lease: k.lease(),
    }
}

fn compare(c: &Compare) -> ECompare {
    let op = match c.op {
        CompareOp::Equal => ECompareOp::Equal,
        CompareOp::NotEqual => ECompareOp::NotEqual,
        CompareOp::Greater => ECompareOp::Greater,
        CompareOp::Less => ECompareOp::Less,
    };
    match &c.target {
        CompareTarget::Version(v) => ECompare::version(c.key.as_str(), op, *v),
        CompareTarget::CreateRevision(r) => ECompare::create_revision(c.key.as_str(), op, *r),
        CompareTarget::ModRevision(r) => ECompare::mod_revision(c.key.as_str(), op, *r),
        CompareTarget::Value(v) => ECompare::value(c.key.as_str(), op, v.to_vec()),
    }
}

fn txn_op(op: &Op) -> ETxnOp {
    match op {
        Op::Put { key, value, lease } => {
            let opts = lease.map(|l| PutOptions::new().with_lease(l));
            ETxnOp::put(key.as_str(), value.to_vec(), opts)
        }
        Op::Delete { key } => ETxnOp::delete(key.as_str(), None),
        Op::Get { key } => ETxnOp::get(key.as_str(), None),
    }
}

/// Request latency by operation and outcome (`ok`, `error`).
pub const REQUEST_DURATION: &str = "redmesh_etcd_request_duration_seconds";

/// Runs one etcd request in a span (a child of the gRPC call it serves, in
/// traces) and records its latency.
async fn timed<T>(
    op: &'static str,
    request: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let started = Instant::now();
    let result = request
        .instrument(tracing::info_span!("etcd", otel.name = %format!("etcd {op}"), db.system = "etcd", db.operation = op))
        .await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    metrics::histogram!(REQUEST_DURATION, "op" => op, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
    result
}

#[async_trait]
impl MetaStore for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        timed("get", async {
            let resp = self
                .client
                .kv_client()
                .get(key, None)
                .await
                .map_err(|e| self.err(e))?;
            Ok(resp.kvs().first().map(kv))
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        timed("list", async {
            let resp = self
                .client
                .kv_client()
                .get(prefix, Some(GetOptions::new().with_prefix()))
                .await
                .map_err(|e| self.err(e))?;
            Ok(Listing {
                kvs: resp.kvs().iter().map(kv).collect(),
                revision: resp.header().map_or(0, |h| h.revision()),
            })
        })
        .await
    }

    async fn put(
        &self,
        key: &str,
        value: Bytes,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        timed("put", async {
            let opts = lease.map(|l| PutOptions::new().with_lease(l));
            let resp = self
                .client
                .kv_client()
                .put(key, value.to_vec(), opts)
                .await
                .map_err(|e| self.lease_err(e, lease))?;
            Ok(resp.header().map_or(0, |h| h.revision()))
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        timed("delete", async {
            let resp = self
                .client
                .kv_client()
                .delete(key, None)
                .await
                .map_err(|e| self.err(e))?;
            Ok(resp.deleted() > 0)
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        timed("txn", async {
            let lease_of = txn
                .success
                .iter()
                .chain(&txn.failure)
                .find_map(|op| match op {
                    Op::Put { lease: Some(l), .. } => Some(*l),
                    _ => None,
                });
            let etxn = ETxn::new()
                .when(txn.compares.iter().map(compare).collect::<Vec<_>>())
                .and_then(txn.success.iter().map(txn_op).collect::<Vec<_>>())
                .or_else(txn.failure.iter().map(txn_op).collect::<Vec<_>>());
            let resp = self
                .client
                .kv_client()
                .txn(etxn)
                .await
                .map_err(|e| self.lease_err(e, lease_of))?;
            let gets = resp
                .op_responses()
                .into_iter()
                .filter_map(|r| match r {
                    TxnOpResponse::Get(g) => Some(g.kvs().first().map(kv)),
                    _ => None,
                })
                .collect();
            Ok(TxnResult {
                succeeded: resp.succeeded(),
                revision: resp.header().map_or(0, |h| h.revision()),
                gets,
            })
        })
        .await
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        let mut opts = WatchOptions::new().with_prefix();
        if from > 0 {
            opts = opts.with_start_revision(from);
        }
        let stream = self
            .client
            .watch_client()
            .watch(prefix, Some(opts))
            .await
            .map_err(|e| self.err(e))?;
        let endpoints = self.endpoints.clone();
        // The request half must live as long as the stream, or etcd cancels
        // the watch; it travels inside the unfold state.
        let out = futures::stream::unfold(Some(stream), move |state| {
            let endpoints = endpoints.clone();
            async move {
                let mut stream = state?;
                loop {
                    match stream.message().await {
                        Ok(Some(resp)) => {
                            if resp.canceled() || resp.compact_revision() > 0 {
                                let err = if resp.compact_revision() > 0 {
                                    StoreError::Compacted {
                                        requested: from,
                                        compact_revision: resp.compact_revision(),
                                    }
                                } else {
                                    StoreError::Unavailable(format!(
                                        "etcd cancelled the watch: {}",
                                        resp.cancel_reason()
                                    ))
                                };
                                return Some((Err(err), None));
                            }
                            if resp.events().is_empty() {
                                continue; // created / progress notifications
                            }
                            let events: Vec<WatchEvent> = resp
                                .events()
                                .iter()
                                .filter_map(|ev| {
                                    Some(WatchEvent {
                                        kind: match ev.event_type() {
                                            EventType::Put => EventKind::Put,
                                            EventType::Delete => EventKind::Delete,
                                        },
                                        kv: kv(ev.kv()?),
                                    })
                                })
                                .collect();
                            let Some(revision) = events.iter().map(|e| e.kv.mod_revision).max()
                            else {
                                continue;
                            };
                            return Some((Ok(WatchBatch { revision, events }), Some(stream)));
                        }
                        Ok(None) => {
                            let err = StoreError::Unavailable(format!(
                                "etcd at {} closed the watch stream",
                                endpoints.join(",")
                            ));
                            return Some((Err(err), None));
                        }
                        Err(e) => return Some((Err(map_err(&e, &endpoints, None)), None)),
                    }
                }
            }
        });
        Ok(out.boxed())
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let secs = ttl.as_secs().max(1) as i64;
        let resp = self
            .client
            .lease_client()
            .grant(secs, None)
            .await
            .map_err(|e| self.err(e))?;
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let keeper = {
            let mut map = self.keepers.lock().await;
            match map.get(&lease) {
                Some(k) => k.clone(),
                None => {
                    let pair = self
                        .client
                        .lease_client()
                        .keep_alive(lease)
                        .await
                        .map_err(|e| self.lease_err(e, Some(lease)))?;
                    let k = Arc::new(Mutex::new(pair));
                    map.insert(lease, k.clone());
                    k
                }
            }
        };
        let result = async {
            let mut guard = keeper.lock().await;
            let (k, s) = &mut *guard;
            k.keep_alive()
                .await
                .map_err(|e| self.lease_err(e, Some(lease)))?;
            match s
                .message()
                .await
                .map_err(|e| self.lease_err(e, Some(lease)))?
            {
                Some(r) if r.ttl() > 0 => Ok(Duration::from_secs(r.ttl() as u64)),
                Some(_) => Err(StoreError::LeaseNotFound(lease)),
                None => Err(StoreError::Unavailable(
                    "etcd closed the lease keep-alive stream".into(),
                )),
            }
        }
        .await;
        if result.is_err() {
            // Drop a broken stream; the next call opens a fresh one.
            self.keepers.lock().await.remove(&lease);
        }
        result
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.keepers.lock().await.remove(&lease);
        self.client
            .lease_client()
            .revoke(lease)
            .await
            .map_err(|e| self.lease_err(e, Some(lease)))?;
        Ok(())
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.client
            .kv_client()
            .compact(revision, None)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_follow_the_tls_options() {
        let eps = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let given = eps(&["http://a:2379", "https://b:2379", "c:2379"]);
        assert_eq!(
            endpoint_urls(&given, true).unwrap(),
            eps(&["https://a:2379", "https://b:2379", "https://c:2379"])
        );
        let plain = eps(&["http://a:2379", "c:2379"]);
        assert_eq!(endpoint_urls(&plain, false).unwrap(), plain);
        let e = endpoint_urls(&given, false).unwrap_err().to_string();
        assert!(
            e.contains("https://b:2379") && e.contains("--etcd-ca"),
            "{e}"
        );
    }
}
