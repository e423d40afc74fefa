//! Command-line arguments (with environment overrides) common to services.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use redmesh_store::{EtcdOptions, EtcdStore, EtcdTls, Keys, MetaStore, StoreError};
use redmesh_telemetry::{LogFormat, TelemetryError};

/// Where the metadata lives.
#[derive(Debug, Clone, clap::Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated.
    #[arg(
        long = "etcd",
        env = "REDMESH_ETCD",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub endpoints: Vec<String>,
    /// Key prefix of all redmesh metadata.
    #[arg(
        long = "etcd-prefix",
        env = "REDMESH_ETCD_PREFIX",
        default_value = "/redmesh/v1"
    )]
    pub prefix: String,
    /// Deadline of each etcd request.
    #[arg(long = "etcd-timeout", env = "REDMESH_ETCD_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// etcd user (when etcd auth is enabled).
    #[arg(long = "etcd-user", env = "REDMESH_ETCD_USER")]
    pub user: Option<String>,
    /// etcd password.
    #[arg(
        long = "etcd-password",
        env = "REDMESH_ETCD_PASSWORD",
        hide_env_values = true,
        requires = "user"
    )]
    pub password: Option<String>,
    /// PEM CA bundle to verify etcd's certificate: etcd is then reached
    /// over TLS (https), whatever scheme --etcd names.
    #[arg(long = "etcd-ca", env = "REDMESH_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// PEM client certificate for etcd's --client-cert-auth (with
    /// --etcd-key and --etcd-ca).
    #[arg(
        long = "etcd-cert",
        env = "REDMESH_ETCD_CERT",
        requires_all = ["etcd_key", "etcd_ca"]
    )]
    pub etcd_cert: Option<PathBuf>,
    /// PEM private key of --etcd-cert.
    #[arg(long = "etcd-key", env = "REDMESH_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
}

impl EtcdArgs {
    /// Connects (lazily: succeeds while etcd is down).
    pub async fn connect(&self) -> Result<Arc<dyn MetaStore>, StoreError> {
        let opts = EtcdOptions {
            request_timeout: self.timeout,
            connect_timeout: self.timeout.min(Duration::from_secs(2)),
            user: self.user.clone().zip(self.password.clone()),
            tls: self.etcd_ca.clone().map(|ca| EtcdTls {
                ca,
                identity: self.etcd_cert.clone().zip(self.etcd_key.clone()),
            }),
        };
        Ok(Arc::new(EtcdStore::connect(&self.endpoints, &opts).await?))
    }

    /// The key layout under the prefix.
    pub fn keys(&self) -> Keys {
        Keys::new(&self.prefix)
    }
}

/// Logging and metrics.
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryArgs {
    /// Address of the Prometheus /metrics endpoint; off when unset.
    #[arg(long = "metrics-listen", env = "REDMESH_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Log format: text or json.
    #[arg(
        long = "log-format",
        env = "REDMESH_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

impl TelemetryArgs {
    /// Installs logging and, if configured, the metrics endpoint.
    pub fn init(&self, service: &'static str) -> Result<(), TelemetryError> {
        redmesh_telemetry::init_logging(service, self.log_format)?;
        if let Some(addr) = self.metrics_listen {
            redmesh_telemetry::init_metrics(service, addr)?;
            tracing::info!(%addr, "metrics endpoint listening");
        }
        Ok(())
    }
}

/// A service's identity: `id` when given, else `<role>-<listen port>`, which
/// is unique on one machine and stable across restarts.
pub fn service_id(role: &str, id: Option<&str>, listen: &str) -> String {
    id.map(str::to_owned).unwrap_or_else(|| {
        let port = listen.rsplit(':').next().unwrap_or("0");
        format!("{role}-{port}")
    })
}
