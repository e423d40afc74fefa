//! The proxy's subscription to `Topology.WatchTopology`, turned into a
//! latest-value channel the data path reads without waiting.
//!
//! Reconnects with jittered backoff, rotating through the configured
//! brokers; keeps serving the last view meanwhile (fail-static). Views with
//! an epoch not newer than the current one are ignored. `last_contact`
//! records when a broker last vouched for the view (view or keepalive).
//!
//! Fencing relies on that freshness, so a message that arrives after a gap
//! longer than `fence_after` does not count: it may have sat in a socket
//! buffer while this process was paused or cut off, and a failover may have
//! happened since. The stream is then reopened, and only its first message —
//! the broker's current view, sent in answer to the new call — refreshes
//! the contact time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redmesh_api::v1::{self, topology_client::TopologyClient, watch_topology_response::Event};
use redmesh_model::{ProxyId, ProxyView};
use redmesh_runtime::{backoff::reconnect_delays, CancellationToken};
use tokio::sync::watch;

/// Without any message for this long, the stream is considered dead.
const SILENCE_LIMIT: Duration = Duration::from_secs(2);

/// The latest view and how fresh it is.
#[derive(Clone)]
pub struct TopologyFeed {
    rx: watch::Receiver<Option<Arc<ProxyView>>>,
    started: Instant,
    last_contact_ms: Arc<AtomicU64>,
}

impl std::fmt::Debug for TopologyFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopologyFeed").finish_non_exhaustive()
    }
}

impl TopologyFeed {
    /// Receiver of views (`None` until the first arrives).
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<ProxyView>>> {
        self.rx.clone()
    }

    /// Seconds since a broker last confirmed the view; `None` if never.
    pub fn age(&self) -> Option<Duration> {
        match self.last_contact_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(
                self.started
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms)),
            ),
        }
    }

    /// Epoch of the current view (0 if none).
    pub fn epoch(&self) -> u64 {
        self.rx.borrow().as_ref().map_or(0, |v| v.epoch())
    }
}

/// Starts following `proxy_id`'s view on `brokers` (gRPC URLs).
pub fn spawn(
    brokers: Vec<String>,
    proxy_id: ProxyId,
    fence_after: Duration,
    shutdown: CancellationToken,
) -> TopologyFeed {
    let (tx, rx) = watch::channel(None);
    let feed = TopologyFeed {
        rx,
        started: Instant::now(),
        last_contact_ms: Arc::new(AtomicU64::new(0)),
    };
    tokio::spawn(follow(
        brokers,
        proxy_id,
        fence_after,
        tx,
        feed.clone(),
        shutdown,
    ));
    feed
}

async fn follow(
    brokers: Vec<String>,
    proxy_id: ProxyId,
    fence_after: Duration,
    tx: watch::Sender<Option<Arc<ProxyView>>>,
    feed: TopologyFeed,
    shutdown: CancellationToken,
) {
    let mut delays = reconnect_delays(Duration::from_millis(50), Duration::from_secs(2));
    let mut turn = 0usize;
    while !shutdown.is_cancelled() {
        let broker = &brokers[turn % brokers.len()];
        turn += 1;
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = stream_once(broker, &proxy_id, fence_after, &tx, &feed) => r,
        };
        match outcome {
            Ok(()) => {
                tracing::warn!(%broker, "topology stream ended; reconnecting");
                delays = reconnect_delays(Duration::from_millis(50), Duration::from_secs(2));
            }
            Err(e) => tracing::warn!(%broker, error = %e, "topology stream failed; reconnecting"),
        }
        let pause = delays.next().unwrap_or(Duration::from_secs(1));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Follows one stream until it fails or falls silent. `Ok` means it
/// delivered at least one message (the backoff restarts).
async fn stream_once(
    broker: &str,
    proxy_id: &ProxyId,
    fence_after: Duration,
    tx: &watch::Sender<Option<Arc<ProxyView>>>,
    feed: &TopologyFeed,
) -> anyhow::Result<()> {
    let endpoint = redmesh_runtime::tls::endpoint(broker)?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true);
    let channel = endpoint.connect().await?;
    let mut client = TopologyClient::new(redmesh_runtime::trace_context::traced(channel));
    let known_epoch = feed.epoch();
    let mut stream = client
        .watch_topology(v1::WatchTopologyRequest {
            proxy_id: proxy_id.to_string(),
            known_epoch,
        })
        .await?
        .into_inner();
    tracing::info!(%broker, known_epoch, "following topology");
    let mut first = true;
    loop {
        let msg = match tokio::time::timeout(SILENCE_LIMIT, stream.message()).await {
            Err(_) => anyhow::bail!("no message from the broker for {SILENCE_LIMIT:?}"),
            Ok(r) => r?,
        };
        let Some(msg) = msg else { return Ok(()) };
        if !first && feed.age().is_some_and(|age| age > fence_after) {
            anyhow::bail!(
                "the broker stream was silent for longer than fence_after ({fence_after:?}); \
                 reopening it for a fresh view"
            );
        }
        first = false;
        match msg.event {
            Some(Event::View(v)) => {
                let view = match ProxyView::try_from(&v) {
                    Ok(view) => view,
                    Err(e) => {
                        // Keep the last good view rather than apply a broken one.
                        tracing::error!(error = %e, epoch = v.epoch, "ignoring an invalid topology view");
                        continue;
                    }
                };
                feed.touch();
                let epoch = view.epoch();
                let newer = tx.borrow().as_ref().is_none_or(|cur| epoch > cur.epoch());
                if newer {
                    tracing::info!(epoch, cluster = ?view.cluster.as_ref().map(|c| c.name.to_string()), "new topology");
                    metrics::gauge!("redmesh_proxy_topology_epoch").set(epoch as f64);
                    tx.send_replace(Some(Arc::new(view)));
                } else {
                    tracing::debug!(
                        epoch,
                        "ignoring a view that is not newer than the current one"
                    );
                }
            }
            Some(Event::Keepalive(_)) => feed.touch(),
            None => {}
        }
    }
}

impl TopologyFeed {
    fn touch(&self) {
        let ms = self.started.elapsed().as_millis().max(1) as u64;
        self.last_contact_ms.store(ms, Ordering::Relaxed);
    }
}
