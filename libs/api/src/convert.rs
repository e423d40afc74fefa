//! Conversions between generated `v1` messages and `redmesh_model` types.
//!
//! Requests are validated here, once, into domain types; errors name the API
//! field (`proxy.resp_address`) so a grpcurl user can tell what to fix.
//! Stored records go through the same code: a stored value that fails
//! validation is reported as corrupt, never silently patched.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use redmesh_model::{
    Address, Chunk, ClientMode, Cluster, ClusterConfig, ClusterName, ClusterTask, ClusterTaskKind,
    Compression, Durability, HostName, MigrationStage, ModelError, NodeRef, Proxy, ProxyId,
    ProxySpec, ProxyState, ProxyView, Shard, SlotAssignment, SlotMigration, SlotRange,
};
use tonic::{Code, Status};

use crate::v1;

/// Maps a domain error onto the gRPC status a client should see.
pub fn status_of(err: &ModelError) -> Status {
    let code = match err {
        ModelError::InvalidArgument { .. } => Code::InvalidArgument,
        ModelError::NotFound { .. } => Code::NotFound,
        ModelError::AlreadyExists { .. } => Code::AlreadyExists,
        ModelError::FailedPrecondition(_) => Code::FailedPrecondition,
        ModelError::Corrupt(_) => Code::Internal,
        ModelError::Unsupported(_) => Code::Unimplemented,
    };
    Status::new(code, err.to_string())
}

/// Encodes a timestamp.
pub fn timestamp(t: SystemTime) -> pbjson_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    pbjson_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// Decodes a timestamp (absent: the Unix epoch).
pub fn system_time(t: Option<&pbjson_types::Timestamp>) -> SystemTime {
    t.map_or(UNIX_EPOCH, |t| {
        UNIX_EPOCH
            + Duration::new(
                t.seconds.max(0) as u64,
                t.nanos.clamp(0, 999_999_999) as u32,
            )
    })
}

/// Validates a `ProxySpec` from a request; `prefix` is the field path.
pub fn proxy_spec(spec: &v1::ProxySpec, prefix: &str) -> Result<ProxySpec, ModelError> {
    let field = |f: &str| field_path(prefix, f);
    let id = ProxyId::parse_field(&field("id"), &spec.id)?;
    let resp = Address::parse_field(&field("resp_address"), &spec.resp_address)?;
    let admin = Address::parse_field(&field("admin_address"), &spec.admin_address)?;
    let host = HostName::parse_field(&field("host"), &spec.host)?;
    let [n0, n1] = spec.redis_nodes.as_slice() else {
        return Err(ModelError::invalid(
            &field("redis_nodes"),
            format!("needs exactly 2 addresses, got {}", spec.redis_nodes.len()),
        ));
    };
    let nodes = [
        Address::parse_field(&field("redis_nodes"), n0)?,
        Address::parse_field(&field("redis_nodes"), n1)?,
    ];
    let tls = match spec.resp_tls_address.as_str() {
        "" => None,
        a => Some(Address::parse_field(&field("resp_tls_address"), a)?),
    };
    ProxySpec::new(id, resp, admin, host, nodes)?.with_tls_address(tls)
}

fn field_path(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_owned()
    } else {
        format!("{prefix}.{field}")
    }
}

impl From<&ProxySpec> for v1::ProxySpec {
    fn from(s: &ProxySpec) -> Self {
        Self {
            id: s.id.to_string(),
            resp_address: s.resp_address.to_string(),
            admin_address: s.admin_address.to_string(),
            host: s.host.to_string(),
            redis_nodes: s.redis_nodes.iter().map(ToString::to_string).collect(),
            resp_tls_address: s
                .resp_tls_address
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        }
    }
}

fn proxy_state(s: ProxyState) -> v1::ProxyState {
    match s {
        ProxyState::Free => v1::ProxyState::Free,
        ProxyState::Allocated => v1::ProxyState::Allocated,
        ProxyState::Failed => v1::ProxyState::Failed,
    }
}

/// Decodes a proxy state filter; `None` for UNSPECIFIED (all states).
pub fn proxy_state_filter(raw: i32) -> Result<Option<ProxyState>, ModelError> {
    match v1::ProxyState::try_from(raw) {
        Ok(v1::ProxyState::Unspecified) => Ok(None),
        Ok(v1::ProxyState::Free) => Ok(Some(ProxyState::Free)),
        Ok(v1::ProxyState::Allocated) => Ok(Some(ProxyState::Allocated)),
        Ok(v1::ProxyState::Failed) => Ok(Some(ProxyState::Failed)),
        Err(_) => Err(ModelError::invalid(
            "state",
            format!("unknown proxy state {raw}"),
        )),
    }
}

impl From<&Proxy> for v1::Proxy {
    fn from(p: &Proxy) -> Self {
        Self {
            spec: Some((&p.spec).into()),
            state: proxy_state(p.state) as i32,
            cluster: p
                .cluster
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            epoch: p.epoch,
            registered_at: Some(timestamp(p.registered_at)),
        }
    }
}

impl TryFrom<&v1::Proxy> for Proxy {
    type Error = ModelError;
    fn try_from(p: &v1::Proxy) -> Result<Self, ModelError> {
        let spec = proxy_spec(
            p.spec
                .as_ref()
                .ok_or_else(|| ModelError::invalid("spec", "missing"))?,
            "spec",
        )?;
        let state = proxy_state_filter(p.state)?
            .ok_or_else(|| ModelError::invalid("state", "unspecified"))?;
        let cluster = match p.cluster.as_str() {
            "" => None,
            name => Some(ClusterName::parse_field("cluster", name)?),
        };
        let proxy = Proxy {
            spec,
            state,
            cluster,
            epoch: p.epoch,
            registered_at: system_time(p.registered_at.as_ref()),
        };
        proxy.check()?;
        Ok(proxy)
    }
}

fn enum_value<T: TryFrom<i32>>(field: &str, raw: i32) -> Result<T, ModelError> {
    T::try_from(raw).map_err(|_| ModelError::invalid(field, format!("unknown value {raw}")))
}

/// Validates a `ClusterConfig` from a request or storage. A plaintext
/// password is hashed; the plaintext goes no further than this function.
pub fn cluster_config(c: &v1::ClusterConfig, prefix: &str) -> Result<ClusterConfig, ModelError> {
    let field = |f: &str| field_path(prefix, f);
    let defaults = ClusterConfig::default();
    let password_sha256 = if !c.password.is_empty() {
        if c.password.len() > 512 {
            return Err(ModelError::invalid(
                &field("password"),
                "is longer than 512 bytes",
            ));
        }
        Some(redmesh_model::password_digest(c.password.as_bytes()))
    } else if c.password_sha256.is_empty() {
        None
    } else {
        Some(
            c.password_sha256
                .as_slice()
                .try_into()
                .map_err(|_| ModelError::invalid(&field("password_sha256"), "must be 32 bytes"))?,
        )
    };
    let compression = match enum_value(&field("compression"), c.compression)? {
        v1::Compression::Unspecified | v1::Compression::None => Compression::None,
        v1::Compression::Lz4 => Compression::Lz4,
        v1::Compression::Zstd => Compression::Zstd,
    };
    let durability = match enum_value(&field("durability"), c.durability)? {
        v1::Durability::Unspecified | v1::Durability::Async => Durability::Async,
        v1::Durability::ReplicaAck => Durability::ReplicaAck,
    };
    let client_mode = match enum_value(&field("client_mode"), c.client_mode)? {
        v1::ClientMode::Unspecified | v1::ClientMode::Cluster => ClientMode::Cluster,
        v1::ClientMode::Plain => ClientMode::Plain,
    };
    let or_default = |v: u32, d: u32| if v == 0 { d } else { v };
    Ok(ClusterConfig {
        password_sha256,
        compression,
        compression_threshold: or_default(c.compression_threshold, defaults.compression_threshold),
        durability,
        replica_ack_timeout_ms: or_default(
            c.replica_ack_timeout_ms,
            defaults.replica_ack_timeout_ms,
        ),
        client_mode,
    })
}

impl From<&ClusterConfig> for v1::ClusterConfig {
    fn from(c: &ClusterConfig) -> Self {
        Self {
            password: String::new(),
            password_set: c.password_sha256.is_some(),
            password_sha256: c.password_sha256.map(|d| d.to_vec()).unwrap_or_default(),
            compression: match c.compression {
                Compression::None => v1::Compression::None,
                Compression::Lz4 => v1::Compression::Lz4,
                Compression::Zstd => v1::Compression::Zstd,
            } as i32,
            compression_threshold: c.compression_threshold,
            durability: match c.durability {
                Durability::Async => v1::Durability::Async,
                Durability::ReplicaAck => v1::Durability::ReplicaAck,
            } as i32,
            replica_ack_timeout_ms: c.replica_ack_timeout_ms,
            client_mode: match c.client_mode {
                ClientMode::Cluster => v1::ClientMode::Cluster,
                ClientMode::Plain => v1::ClientMode::Plain,
            } as i32,
        }
    }
}

fn task_kind(k: ClusterTaskKind) -> v1::ClusterTaskKind {
    match k {
        ClusterTaskKind::None => v1::ClusterTaskKind::None,
        ClusterTaskKind::Building => v1::ClusterTaskKind::Building,
        ClusterTaskKind::Migrating => v1::ClusterTaskKind::Migrating,
        ClusterTaskKind::FailingOver => v1::ClusterTaskKind::FailingOver,
    }
}

impl From<&NodeRef> for v1::NodeRef {
    fn from(n: &NodeRef) -> Self {
        Self {
            proxy_id: n.proxy_id.to_string(),
            node_index: u32::from(n.node_index),
        }
    }
}

fn node_ref(n: &v1::NodeRef) -> Result<NodeRef, ModelError> {
    Ok(NodeRef {
        proxy_id: ProxyId::parse_field("node.proxy_id", &n.proxy_id)?,
        node_index: u8::try_from(n.node_index)
            .ok()
            .filter(|i| *i <= 1)
            .ok_or_else(|| ModelError::invalid("node.node_index", "must be 0 or 1"))?,
    })
}

impl From<SlotRange> for v1::SlotRange {
    fn from(r: SlotRange) -> Self {
        Self {
            start: u32::from(r.start()),
            end: u32::from(r.end()),
        }
    }
}

/// Validates a slot range from a request.
pub fn slot_range(r: Option<&v1::SlotRange>, field: &str) -> Result<SlotRange, ModelError> {
    let r = r.ok_or_else(|| ModelError::invalid(field, "missing"))?;
    SlotRange::new(r.start, r.end).map_err(|e| match e {
        ModelError::InvalidArgument { reason, .. } => ModelError::invalid(field, reason),
        other => other,
    })
}

impl From<&Cluster> for v1::Cluster {
    fn from(c: &Cluster) -> Self {
        Self {
            name: c.name.to_string(),
            uid: c.uid.clone(),
            config: Some((&c.config).into()),
            chunks: c
                .chunks
                .iter()
                .map(|ch| v1::Chunk {
                    proxy_ids: ch.proxies.iter().map(ToString::to_string).collect(),
                })
                .collect(),
            shards: c
                .shards
                .iter()
                .map(|s| v1::Shard {
                    id: s.id,
                    master: Some((&s.master).into()),
                    replicas: s.replicas.iter().map(Into::into).collect(),
                })
                .collect(),
            slots: c
                .slots
                .iter()
                .map(|a| v1::SlotAssignment {
                    range: Some(a.range.into()),
                    shard_id: a.shard,
                    migration: a.migration.as_ref().map(|m| v1::SlotMigration {
                        target_shard_id: m.target_shard,
                        task_id: m.task_id.clone(),
                        stage: match m.stage {
                            MigrationStage::Prepare => v1::MigrationStage::Prepare,
                            MigrationStage::Move => v1::MigrationStage::Move,
                            MigrationStage::Commit => v1::MigrationStage::Commit,
                        } as i32,
                    }),
                })
                .collect(),
            epoch: c.epoch,
            task: Some(v1::ClusterTask {
                kind: task_kind(c.task.kind) as i32,
                id: c.task.id.clone(),
                detail: c.task.detail.clone(),
            }),
            node_count: c.node_count(),
            created_at: Some(timestamp(c.created_at)),
            next_shard_id: c.next_shard_id,
            peer_secret: c.peer_secret.clone(),
        }
    }
}

impl TryFrom<&v1::Cluster> for Cluster {
    type Error = ModelError;
    fn try_from(c: &v1::Cluster) -> Result<Self, ModelError> {
        let chunks = c
            .chunks
            .iter()
            .map(|ch| match ch.proxy_ids.as_slice() {
                [a, b] => Ok(Chunk {
                    proxies: [
                        ProxyId::parse_field("chunk.proxy_ids", a)?,
                        ProxyId::parse_field("chunk.proxy_ids", b)?,
                    ],
                }),
                other => Err(ModelError::invalid(
                    "chunk.proxy_ids",
                    format!("needs 2 proxies, has {}", other.len()),
                )),
            })
            .collect::<Result<_, _>>()?;
        let shards = c
            .shards
            .iter()
            .map(|s| {
                Ok(Shard {
                    id: s.id,
                    master: node_ref(
                        s.master
                            .as_ref()
                            .ok_or_else(|| ModelError::invalid("shard.master", "missing"))?,
                    )?,
                    replicas: s.replicas.iter().map(node_ref).collect::<Result<_, _>>()?,
                })
            })
            .collect::<Result<_, ModelError>>()?;
        let slots =
            c.slots
                .iter()
                .map(|a| {
                    Ok(SlotAssignment {
                        range: slot_range(a.range.as_ref(), "slots.range")?,
                        shard: a.shard_id,
                        migration: a
                            .migration
                            .as_ref()
                            .map(|m| {
                                Ok::<_, ModelError>(SlotMigration {
                                    target_shard: m.target_shard_id,
                                    task_id: m.task_id.clone(),
                                    stage: match enum_value("slots.migration.stage", m.stage)? {
                                        v1::MigrationStage::Prepare => MigrationStage::Prepare,
                                        v1::MigrationStage::Unspecified
                                        | v1::MigrationStage::Move => MigrationStage::Move,
                                        v1::MigrationStage::Commit => MigrationStage::Commit,
                                    },
                                })
                            })
                            .transpose()?,
                    })
                })
                .collect::<Result<_, ModelError>>()?;
        let task = c.task.as_ref().map_or(Ok(ClusterTask::default()), |t| {
            Ok::<_, ModelError>(ClusterTask {
                kind: match enum_value("task.kind", t.kind)? {
                    v1::ClusterTaskKind::Unspecified | v1::ClusterTaskKind::None => {
                        ClusterTaskKind::None
                    }
                    v1::ClusterTaskKind::Building => ClusterTaskKind::Building,
                    v1::ClusterTaskKind::Migrating => ClusterTaskKind::Migrating,
                    v1::ClusterTaskKind::FailingOver => ClusterTaskKind::FailingOver,
                },
                id: t.id.clone(),
                detail: t.detail.clone(),
            })
        })?;
        let cluster = Cluster {
            name: ClusterName::parse(&c.name)?,
            uid: c.uid.clone(),
            config: cluster_config(&c.config.clone().unwrap_or_default(), "config")?,
            chunks,
            shards,
            slots,
            epoch: c.epoch,
            task,
            created_at: system_time(c.created_at.as_ref()),
            next_shard_id: c.next_shard_id,
            peer_secret: c.peer_secret.clone(),
        };
        cluster.check()?;
        Ok(cluster)
    }
}

/// A cluster as the public API shows it: password digest and peer secret
/// stripped (only proxies receive them, in their topology).
pub fn public_cluster(c: &Cluster) -> v1::Cluster {
    let mut out = v1::Cluster::from(c);
    if let Some(cfg) = out.config.as_mut() {
        cfg.password_sha256.clear();
    }
    out.peer_secret.clear();
    out
}

impl From<&ProxyView> for v1::ProxyView {
    fn from(v: &ProxyView) -> Self {
        Self {
            proxy_id: v.proxy_id.to_string(),
            epoch: v.epoch(),
            proxy: v.proxy.as_ref().map(Into::into),
            cluster: v.cluster.as_ref().map(Into::into),
            members: v.members.iter().map(Into::into).collect(),
        }
    }
}

impl TryFrom<&v1::ProxyView> for ProxyView {
    type Error = ModelError;
    fn try_from(v: &v1::ProxyView) -> Result<Self, ModelError> {
        let view = ProxyView {
            proxy_id: ProxyId::parse_field("proxy_id", &v.proxy_id)?,
            proxy: v.proxy.as_ref().map(Proxy::try_from).transpose()?,
            cluster: v.cluster.as_ref().map(Cluster::try_from).transpose()?,
            members: v
                .members
                .iter()
                .map(Proxy::try_from)
                .collect::<Result<_, _>>()?,
            floor_epoch: v.epoch,
        };
        if let Some(c) = &view.cluster {
            if let Some(missing) = c.proxy_ids().find(|id| view.member(id).is_none()) {
                return Err(ModelError::Corrupt(format!(
                    "view of {} lacks member proxy {missing}",
                    view.proxy_id
                )));
            }
        }
        Ok(view)
    }
}

/// Encodes a domain value as the protobuf bytes stored in etcd.
pub fn encode<M: Message>(m: &M) -> Vec<u8> {
    m.encode_to_vec()
}

/// Decodes stored protobuf bytes; errors say which key is unreadable.
pub fn decode<M: Message + Default>(key: &str, bytes: &[u8]) -> Result<M, ModelError> {
    M::decode(bytes).map_err(|e| ModelError::Corrupt(format!("{key}: undecodable protobuf: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str) -> v1::ProxySpec {
        v1::ProxySpec {
            id: id.into(),
            resp_address: "127.0.0.1:7001".into(),
            admin_address: "127.0.0.1:7101".into(),
            host: "host-a".into(),
            redis_nodes: vec!["127.0.0.1:7201".into(), "127.0.0.1:7202".into()],
            resp_tls_address: String::new(),
        }
    }

    #[test]
    fn spec_errors_name_the_field() {
        let mut s = spec("p1");
        s.redis_nodes.pop();
        let e = proxy_spec(&s, "proxy").unwrap_err().to_string();
        assert!(e.contains("proxy.redis_nodes"), "{e}");
        let mut s = spec("p1");
        s.admin_address = "nope".into();
        let e = proxy_spec(&s, "proxy").unwrap_err().to_string();
        assert!(e.contains("proxy.admin_address"), "{e}");
        let mut s = spec("p1");
        s.admin_address = s.resp_address.clone();
        assert!(proxy_spec(&s, "proxy").is_err());
        let mut s = spec("p1");
        s.resp_tls_address = "127.0.0.1:99999".into();
        let e = proxy_spec(&s, "proxy").unwrap_err().to_string();
        assert!(e.contains("proxy.resp_tls_address"), "{e}");
        s.resp_tls_address = s.redis_nodes[1].clone();
        let e = proxy_spec(&s, "proxy").unwrap_err().to_string();
        assert!(e.contains("used twice"), "{e}");
    }

    #[test]
    fn tls_address_round_trips_and_is_optional() {
        let mut s = spec("p1");
        let plain = proxy_spec(&s, "proxy").unwrap();
        assert_eq!(plain.resp_tls_address, None);
        assert_eq!(v1::ProxySpec::from(&plain), s);
        s.resp_tls_address = "127.0.0.1:7601".into();
        let tls = proxy_spec(&s, "proxy").unwrap();
        assert_eq!(
            tls.resp_tls_address.as_ref().map(|a| a.as_str()),
            Some("127.0.0.1:7601")
        );
        assert_eq!(v1::ProxySpec::from(&tls), s);
    }

    #[test]
    fn cluster_round_trips_and_hides_password() {
        let cfg = cluster_config(
            &v1::ClusterConfig {
                password: "s3cret".into(),
                ..Default::default()
            },
            "config",
        )
        .unwrap();
        let c = Cluster::new_layout(
            ClusterName::parse("demo").unwrap(),
            "u".into(),
            "peer-secret".into(),
            cfg,
            vec![Chunk {
                proxies: [ProxyId::parse("a").unwrap(), ProxyId::parse("b").unwrap()],
            }],
            3,
            SystemTime::UNIX_EPOCH + Duration::from_secs(5),
        )
        .unwrap();
        let wire = v1::Cluster::from(&c);
        let bytes = encode(&wire);
        let back = Cluster::try_from(&decode::<v1::Cluster>("k", &bytes).unwrap()).unwrap();
        assert_eq!(back, c);
        let public = public_cluster(&c);
        let cfg = public.config.unwrap();
        assert!(cfg.password_set && cfg.password.is_empty() && cfg.password_sha256.is_empty());
        assert!(public.peer_secret.is_empty());
    }

    #[test]
    fn unknown_enum_values_are_rejected() {
        let e = cluster_config(
            &v1::ClusterConfig {
                compression: 42,
                ..Default::default()
            },
            "config",
        )
        .unwrap_err();
        assert!(e.to_string().contains("config.compression"), "{e}");
        assert_eq!(status_of(&e).code(), Code::InvalidArgument);
    }
}
