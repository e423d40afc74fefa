//! Prometheus metrics and trace spans for every gRPC server: calls by
//! method and status code, how long each took to answer, and a span per
//! call that continues the caller's trace (`trace_context`).
//!
//! A tower layer on the server, so every service (and health, reflection)
//! is measured the same way. The method label comes from the request path,
//! which the network controls: only methods the server really has are
//! named, anything else counts as `unknown`, so a scanner cannot blow up
//! the number of series.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use prost::Message;
use tonic::codegen::http;
use tonic::Code;

/// Calls answered, by method and gRPC status code.
pub const CALLS: &str = "redmesh_grpc_server_calls_total";
/// Time until the response started (for a stream: until it opened).
pub const DURATION: &str = "redmesh_grpc_server_call_duration_seconds";

/// Every method path this binary's servers can serve:
/// `/package.Service/Method` from the API's descriptors, plus health and
/// reflection.
fn known_methods() -> &'static HashSet<String> {
    static KNOWN: OnceLock<HashSet<String>> = OnceLock::new();
    KNOWN.get_or_init(|| {
        let mut out = HashSet::new();
        for set in [
            redmesh_api::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ] {
            // Both sets are compiled in; a decode failure is a build bug,
            // and then every method is simply `unknown`.
            let Ok(files) = prost_types::FileDescriptorSet::decode(set) else {
                continue;
            };
            for file in files.file {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    let name = service.name.unwrap_or_default();
                    for method in service.method {
                        out.insert(format!(
                            "/{package}.{name}/{}",
                            method.name.unwrap_or_default()
                        ));
                    }
                }
            }
        }
        for v in ["v1", "v1alpha"] {
            out.insert(format!(
                "/grpc.reflection.{v}.ServerReflection/ServerReflectionInfo"
            ));
        }
        out
    })
}

/// The label for a request path.
fn method_label(path: &str) -> String {
    if known_methods().contains(path) {
        path.trim_start_matches('/').to_owned()
    } else {
        "unknown".to_owned()
    }
}

/// The `code` label: Go's spelling (`OK`, `InvalidArgument`…), as other
/// gRPC exporters use.
fn code_label(code: Code) -> String {
    match code {
        Code::Ok => "OK".to_owned(),
        other => format!("{other:?}"),
    }
}

/// The status of a response whose headers are in: an error is answered
/// trailers-only, with `grpc-status` in the headers; otherwise the call
/// succeeded (unary) or its stream opened.
fn status_of<B>(response: &http::Response<B>) -> Code {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(Code::Ok, Code::from_i32)
}

/// The layer: `Server::builder().layer(GrpcMetricsLayer)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

/// The service the layer wraps around the server's routes.
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method: Arc<str> = method_label(req.uri().path()).into();
        let span = crate::trace_context::server_span(&method, req.headers());
        let started = Instant::now();
        let call = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        let fut = async move {
            let result = call.await;
            let code = match &result {
                Ok(response) => status_of(response),
                Err(_) => Code::Unknown,
            };
            metrics::counter!(CALLS, "method" => method.to_string(), "code" => code_label(code))
                .increment(1);
            metrics::histogram!(DURATION, "method" => method.to_string())
                .record(started.elapsed().as_secs_f64());
            result
        };
        Box::pin(tracing::Instrument::instrument(fut, span))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_real_methods_are_named() {
        assert_eq!(
            method_label("/redmesh.v1.Broker/CreateCluster"),
            "redmesh.v1.Broker/CreateCluster"
        );
        assert_eq!(
            method_label("/grpc.health.v1.Health/Check"),
            "grpc.health.v1.Health/Check"
        );
        assert_eq!(method_label("/redmesh.v1.Broker/NoSuchMethod"), "unknown");
        assert_eq!(method_label("/../../etc/passwd"), "unknown");
    }

    #[test]
    fn codes_use_go_spelling() {
        assert_eq!(code_label(Code::Ok), "OK");
        assert_eq!(code_label(Code::InvalidArgument), "InvalidArgument");
        let r = http::Response::builder()
            .header("grpc-status", "9")
            .body(())
            .unwrap();
        assert_eq!(status_of(&r), Code::FailedPrecondition);
        assert_eq!(status_of(&http::Response::new(())), Code::Ok);
    }
}
