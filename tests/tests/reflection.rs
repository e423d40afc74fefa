//! Every redmesh gRPC server answers reflection (v1 and v1alpha) with its
//! services, and the API's comments travel with the descriptors, so grpcurl
//! and buf curl work without .proto files.

use prost::Message;
use redmesh_e2e::{Service, System};
use tokio_stream::StreamExt;

async fn channel(url: &str) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Sends one request through reflection version `$v` and returns the
/// response (v1 and v1alpha have identical shapes in different modules).
macro_rules! reflect {
    ($v:ident, $url:expr, $request:expr) => {{
        use tonic_reflection::pb::$v::{
            server_reflection_client::ServerReflectionClient, ServerReflectionRequest,
        };
        let mut c = ServerReflectionClient::new(channel($url).await);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some($request),
        };
        let mut resp = c
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        resp.next()
            .await
            .unwrap()
            .unwrap()
            .message_response
            .unwrap()
    }};
}

/// Lists services through reflection version `$v`.
macro_rules! list_services {
    ($v:ident, $url:expr) => {{
        use tonic_reflection::pb::$v::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$v::server_reflection_response::MessageResponse;
        match reflect!($v, $url, MessageRequest::ListServices(String::new())) {
            MessageResponse::ListServicesResponse(l) => {
                l.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
            }
            other => panic!("unexpected reflection reply {other:?}"),
        }
    }};
}

/// The file declaring `symbol`, as reflection v1 returns it.
async fn file_of(url: &str, symbol: &str) -> prost_types::FileDescriptorProto {
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    match reflect!(v1, url, MessageRequest::FileContainingSymbol(symbol.into())) {
        MessageResponse::FileDescriptorResponse(f) => {
            let first = f.file_descriptor_proto.first().expect("a descriptor");
            prost_types::FileDescriptorProto::decode(first.as_slice()).unwrap()
        }
        other => panic!("unexpected reflection reply {other:?}"),
    }
}

/// The server lists exactly `services`, health and reflection itself.
async fn check(url: &str, services: &[&str]) {
    for names in [list_services!(v1, url), list_services!(v1alpha, url)] {
        let mut want: Vec<&str> = services.to_vec();
        want.push("grpc.health.v1.Health");
        let mut got: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|n| !n.starts_with("grpc.reflection."))
            .collect();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want, "services listed by {url}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_answers_reflection() {
    let sys = System::start(1);
    check(
        &sys.broker.url(),
        &["redmesh.v1.Broker", "redmesh.v1.Topology"],
    )
    .await;
    check(
        &format!("http://{}", sys.proxies[0].admin),
        &["redmesh.v1.ProxyAdmin"],
    )
    .await;
    for (bin, service) in [
        ("redmesh-coordinator", "redmesh.v1.Coordinator"),
        ("redmesh-health-checker", "redmesh.v1.HealthChecker"),
        ("redmesh-migrator", "redmesh.v1.Migrator"),
    ] {
        let svc = Service::start(bin, "--listen", &[]);
        check(&svc.url(), &[service]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_comments_are_visible_through_reflection() {
    let sys = System::start(0);
    let file = file_of(&sys.broker.url(), "redmesh.v1.Broker").await;
    assert_eq!(file.package(), "redmesh.v1");
    let comments: Vec<String> = file
        .source_code_info
        .expect("descriptors carry source info (comments)")
        .location
        .into_iter()
        .map(|l| l.leading_comments().trim().to_owned())
        .collect();
    assert!(
        comments
            .iter()
            .any(|c| c == "Proxy pool and cluster management."),
        "{comments:?}"
    );
}
