//! Traces across processes: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, a
//! redmeshctl command and the broker's handling of it are one trace. An
//! in-process OTLP receiver collects what both export and checks that the
//! broker's server span is a child of the command's span.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use redmesh_e2e::{bin_path, free_port, Etcd, Service};
use tonic::{Request, Response, Status};

/// One received span.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
}

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().expect("lock");
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for s in rs.scope_spans.into_iter().flat_map(|ss| ss.spans) {
                spans.push(Received {
                    service: service.clone(),
                    name: s.name,
                    trace_id: s.trace_id,
                    span_id: s.span_id,
                    parent_span_id: s.parent_span_id,
                });
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_and_the_broker_call_it_makes_are_one_trace() {
    let receiver = Receiver::default();
    let port = free_port();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(receiver.clone()))
        .serve(format!("127.0.0.1:{port}").parse().expect("addr"));
    tokio::spawn(server);
    let endpoint = format!("http://127.0.0.1:{port}");
    // Batches leave every 100 ms instead of every 5 s.
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];

    let etcd = Etcd::start();
    let broker = Service::start_env(
        "redmesh-broker",
        "--listen",
        &["--etcd".into(), etcd.endpoint.clone()],
        &env,
    );
    let out = std::process::Command::new(bin_path("redmeshctl"))
        .args([
            "--broker",
            &broker.url(),
            "proxy",
            "register",
            "--id",
            "p-1",
        ])
        .args(["--resp", "127.0.0.1:7001", "--admin", "127.0.0.1:7101"])
        .args(["--host", "h-1", "--redis", "127.0.0.1:7201,127.0.0.1:7202"])
        .envs(env)
        .output()
        .expect("redmeshctl runs");
    assert!(out.status.success(), "{out:?}");

    // The command's root span, and the broker's span for its call.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (root, call) = loop {
        let spans = receiver.spans.lock().expect("lock").clone();
        let root = spans
            .iter()
            .find(|s| s.service == "redmesh-redmeshctl" && s.name == "redmeshctl proxy register")
            .cloned();
        let call = spans
            .iter()
            .find(|s| s.service == "redmesh-broker" && s.name == "redmesh.v1.Broker/RegisterProxy")
            .cloned();
        if let (Some(root), Some(call)) = (root, call) {
            break (root, call);
        }
        assert!(
            Instant::now() < deadline,
            "spans missing; received: {spans:#?}\nbroker log:\n{}",
            broker.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(root.parent_span_id.is_empty(), "{root:?}");
    assert_eq!(call.trace_id, root.trace_id, "{call:?} vs {root:?}");
    assert_eq!(call.parent_span_id, root.span_id, "{call:?} vs {root:?}");
}
