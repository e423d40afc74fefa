//! The `HealthChecker` gRPC service over the monitor's verdicts.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use redmesh_api::v1::{self, health_checker_server::HealthChecker};
use redmesh_model::ProxyId;
use tokio_stream::wrappers::{errors::BroadcastStreamRecvError, BroadcastStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::monitor::Monitor;

/// The service.
pub struct Api {
    monitor: Arc<Monitor>,
    shutdown: CancellationToken,
}

impl Api {
    /// Serves `monitor`'s verdicts; streams end on `shutdown`.
    pub fn new(monitor: Arc<Monitor>, shutdown: CancellationToken) -> Self {
        Self { monitor, shutdown }
    }
}

fn proxy_filter(field: &str, value: &str) -> Result<Option<ProxyId>, Status> {
    if value.is_empty() {
        return Ok(None);
    }
    ProxyId::parse(value)
        .map(Some)
        .map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

#[tonic::async_trait]
impl HealthChecker for Api {
    type WatchHealthStream =
        Pin<Box<dyn Stream<Item = Result<v1::WatchHealthResponse, Status>> + Send>>;

    async fn get_report(
        &self,
        req: Request<v1::GetReportRequest>,
    ) -> Result<Response<v1::GetReportResponse>, Status> {
        let only = proxy_filter("proxy_id", &req.get_ref().proxy_id)?;
        Ok(Response::new(v1::GetReportResponse {
            checker_id: self.monitor.checker_id.clone(),
            targets: self.monitor.report(only.as_ref()),
        }))
    }

    async fn watch_health(
        &self,
        req: Request<v1::WatchHealthRequest>,
    ) -> Result<Response<Self::WatchHealthStream>, Status> {
        let only = proxy_filter("proxy_id", &req.get_ref().proxy_id)?;
        let checker_id = self.monitor.checker_id.clone();
        let stream = BroadcastStream::new(self.monitor.subscribe())
            .filter_map(move |item| {
                let out = match item {
                    Ok(t) if only.as_ref().is_none_or(|o| o.as_str() == t.proxy_id) => {
                        Some(Ok(v1::WatchHealthResponse {
                            checker_id: checker_id.clone(),
                            target: Some(t),
                        }))
                    }
                    Ok(_) => None,
                    // A subscriber too slow to keep up is told, not silently
                    // given a gap.
                    Err(BroadcastStreamRecvError::Lagged(n)) => {
                        Some(Err(Status::data_loss(format!(
                            "the watcher fell {n} changes behind; call GetReport and watch again"
                        ))))
                    }
                };
                futures::future::ready(out)
            })
            .take_until(self.shutdown.clone().cancelled_owned());
        Ok(Response::new(Box::pin(stream)))
    }
}
