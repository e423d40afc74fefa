//! Traces across processes: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, a
//! redmeshctl command and the broker's handling of it are one trace, a
//! `cluster scale` continues through the migrator to the proxies, and
//! proxies trace sampled commands with their result. An in-process OTLP
//! receiver collects what the processes export.

use std::future::ready;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use redmesh_api::v1;
use redmesh_e2e::harness::{eventually, raw_exchange};
use redmesh_e2e::{bin_path, free_port, Etcd, Service, System};
use tonic::{Request, Response, Status};

/// One received span.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    /// String and integer attributes, as text.
    attributes: Vec<(String, String)>,
}

impl std::fmt::Display for Received {
    /// One line: who, what, and the ids that link it (hex, as trace UIs
    /// show them).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        write!(
            f,
            "{} {:?} trace {} span {} parent {}",
            self.service,
            self.name,
            hex(&self.trace_id),
            hex(&self.span_id),
            hex(&self.parent_span_id)
        )
    }
}

impl Received {
    /// Whether `ancestor` is among this span's parents, following parent
    /// ids through `spans` (so every span in between must have arrived).
    fn descends_from(&self, ancestor: &Received, spans: &[Received]) -> bool {
        if self.trace_id != ancestor.trace_id {
            return false;
        }
        let mut parent = &self.parent_span_id;
        // At most one step per span: a corrupt cycle cannot loop forever.
        for _ in 0..=spans.len() {
            if parent.is_empty() {
                return false;
            }
            if *parent == ancestor.span_id {
                return true;
            }
            match spans
                .iter()
                .find(|s| s.trace_id == self.trace_id && s.span_id == *parent)
            {
                Some(p) => parent = &p.parent_span_id,
                None => return false,
            }
        }
        false
    }

    fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        other => format!("{other:?}"),
    }
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
                .map(text)
                .unwrap_or_default();
            for s in rs.scope_spans.into_iter().flat_map(|ss| ss.spans) {
                spans.push(Received {
                    service: service.clone(),
                    name: s.name,
                    trace_id: s.trace_id,
                    span_id: s.span_id,
                    parent_span_id: s.parent_span_id,
                    attributes: s
                        .attributes
                        .iter()
                        .filter_map(|a| {
                            Some((a.key.clone(), text(a.value.as_ref()?.value.as_ref()?)))
                        })
                        .collect(),
                });
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    /// Serves OTLP/gRPC on a free port; returns the endpoint URL.
    fn start(&self) -> String {
        let port = free_port();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(self.clone()))
            .serve(format!("127.0.0.1:{port}").parse().expect("addr"));
        tokio::spawn(server);
        format!("http://127.0.0.1:{port}")
    }

    /// Waits until `found` picks what it needs from the spans received.
    async fn until<T>(&self, what: &str, mut found: impl FnMut(&[Received]) -> Option<T>) -> T {
        eventually(what, Duration::from_secs(20), || {
            let spans = self.spans();
            ready(found(&spans).ok_or_else(|| {
                let lines: Vec<String> = spans.iter().map(ToString::to_string).collect();
                format!("got:\n{}", lines.join("\n"))
            }))
        })
        .await
    }

    /// The spans received so far.
    fn spans(&self) -> Vec<Received> {
        self.spans.lock().expect("lock").clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_and_the_broker_call_it_makes_are_one_trace() {
    let receiver = Receiver::default();
    let endpoint = receiver.start();
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
    let (root, call) = receiver
        .until("the command's and the broker's spans", |spans| {
            let root = spans.iter().find(|s| {
                s.service == "redmesh-redmeshctl" && s.name == "redmeshctl proxy register"
            })?;
            let call = spans.iter().find(|s| {
                s.service == "redmesh-broker" && s.name == "redmesh.v1.Broker/RegisterProxy"
            })?;
            Some((root.clone(), call.clone()))
        })
        .await;
    assert!(root.parent_span_id.is_empty(), "{root:?}");
    assert_eq!(call.trace_id, root.trace_id, "{call:?} vs {root:?}");
    assert_eq!(call.parent_span_id, root.span_id, "{call:?} vs {root:?}");
    // The broker's etcd requests are spans inside its call.
    receiver
        .until("an etcd span inside the broker's call", |spans| {
            spans
                .iter()
                .find(|s| s.name.starts_with("etcd ") && s.parent_span_id == call.span_id)
                .cloned()
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_scale_is_one_trace_from_the_command_to_the_proxies() {
    let receiver = Receiver::default();
    let endpoint = receiver.start();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    // The broker, the proxies and the migrator all export to the receiver.
    let sys = System::start_env(4, &env);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("scaled", 4, v1::ClusterConfig::default())
        .await;
    let migrator = sys.start_migrator("mg-1", &[]);
    // Keys, so the proxies have something to move.
    let mset: String = (0..200).map(|i| format!(" scaled-{i} {i}")).collect();
    let plain = &sys.members(&cluster)[0].plain;
    assert_eq!(
        raw_exchange(plain, format!("MSET{mset}\r\n").as_bytes()).unwrap(),
        b"+OK\r\n"
    );

    // The command follows the task to its end.
    let out = tokio::process::Command::new(bin_path("redmeshctl"))
        .args(["--broker", &sys.broker.url(), "--migrator", &migrator.url()])
        .args(["cluster", "scale", "scaled", "8"])
        .envs(env)
        .output()
        .await
        .expect("redmeshctl runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("completed"),
        "redmeshctl cluster scale: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    // The command's root span and the services' spans for its calls.
    let named = |spans: &[Received], service: &str, name: &str| {
        spans
            .iter()
            .find(|s| s.service == service && s.name == name)
            .cloned()
    };
    let (root, scale, start, watch) = receiver
        .until("the spans of the command, broker and migrator", |spans| {
            Some((
                named(spans, "redmesh-redmeshctl", "redmeshctl cluster scale")?,
                named(spans, "redmesh-broker", "redmesh.v1.Broker/ScaleCluster")?,
                named(
                    spans,
                    "redmesh-migrator",
                    "redmesh.v1.Migrator/StartMigration",
                )?,
                named(
                    spans,
                    "redmesh-migrator",
                    "redmesh.v1.Migrator/WatchMigration",
                )?,
            ))
        })
        .await;
    let spans = receiver.spans();
    assert!(root.parent_span_id.is_empty(), "{root}");
    // CLI → broker → migrator.
    assert!(
        scale.descends_from(&root, &spans),
        "{scale}\nnot under {root}"
    );
    assert!(
        start.descends_from(&scale, &spans),
        "{start}\nnot under {scale}"
    );
    // The progress the command follows is the same trace too.
    assert!(
        watch.descends_from(&root, &spans),
        "{watch}\nnot under {root}"
    );
    // → proxies: the migrator asks the source proxies for their sizes to
    // estimate the plan while it serves the call; the leader moves the keys
    // later, in the background, possibly on another migrator instance, and
    // the task record carries the trace, so the proxies' MigrateBatch spans
    // are part of it too.
    for method in ["GetInfo", "MigrateBatch"] {
        let name = format!("redmesh.v1.ProxyAdmin/{method}");
        let span = receiver
            .until(
                &format!("a proxy's {method} span inside the migrator's StartMigration"),
                |spans| {
                    spans
                        .iter()
                        .find(|s| {
                            s.service == "redmesh-proxy"
                                && s.name == name
                                && s.descends_from(&start, spans)
                        })
                        .cloned()
                },
            )
            .await;
        assert_eq!(span.trace_id, root.trace_id, "{span}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_trace_sampled_commands_with_their_result() {
    let receiver = Receiver::default();
    let endpoint = receiver.start();
    let sys = System::start_env(
        2,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            // Every command, so the test knows which ones.
            ("REDMESH_PROXY_TRACE_EVERY", "1"),
        ],
    );
    sys.register_all().await;
    let cluster = sys
        .create_cluster("traced", 4, v1::ClusterConfig::default())
        .await;
    let (owner, _) = sys.key_master(&cluster, b"traced-key");
    let other = sys.proxies.iter().find(|p| p.id != owner.id).unwrap();
    assert_eq!(
        raw_exchange(&owner.resp, b"SET traced-key v\r\n").unwrap(),
        b"+OK\r\n"
    );
    let moved = raw_exchange(&other.resp, b"SET traced-key v\r\n").unwrap();
    assert!(moved.starts_with(b"-MOVED"), "{moved:?}");
    for result in ["ok", "moved"] {
        let span = receiver
            .until(
                &format!("a proxy span for SET with result {result}"),
                |spans| {
                    spans
                        .iter()
                        .find(|s| {
                            s.service == "redmesh-proxy"
                                && s.name == "redis set"
                                && s.attribute("redmesh.result") == Some(result)
                        })
                        .cloned()
                },
            )
            .await;
        assert_eq!(span.attribute("db.system"), Some("redis"), "{span:?}");
    }
}
