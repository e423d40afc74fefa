//! Test harness: starts real etcd, redis-server and the built redmesh
//! binaries on free ports, waits for readiness (never fixed sleeps) and kills
//! everything it started when dropped, even when a test panics.

pub mod harness;
pub mod netpart;
pub mod pki;
pub mod ports;
pub mod process;
pub mod system;

pub use harness::{bin_path, Etcd, Redis};
pub use ports::free_port;
pub use process::Child;
pub use system::{ProxyNode, Service, System};
