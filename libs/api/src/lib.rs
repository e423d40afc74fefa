//! The redmesh gRPC API: code generated from `proto/redmesh/v1` plus the
//! conversions between wire messages and `redmesh-model` domain types.
//!
//! Domain code never handles generated types directly: requests are
//! validated here (`TryFrom`) into model types, and one error mapping turns
//! domain errors into precise `tonic::Status` codes.

pub mod convert;

/// Generated messages and services of package `redmesh.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs, rust_2018_idioms)]
    tonic::include_proto!("redmesh.v1");
    include!(concat!(env!("OUT_DIR"), "/redmesh.v1.serde.rs"));
}

/// Encoded `FileDescriptorSet` of the whole API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("redmesh_descriptor");
