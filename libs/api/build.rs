//! Generates the tonic/prost code and the descriptor set (for gRPC reflection) from `proto/`.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files: Vec<PathBuf> = [
        "model.proto",
        "broker.proto",
        "topology.proto",
        "coordinator.proto",
        "health_checker.proto",
        "migrator.proto",
        "proxy_admin.proto",
    ]
    .iter()
    .map(|f| proto_root.join("redmesh/v1").join(f))
    .collect();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor_path = out.join("redmesh_descriptor.bin");
    tonic_prost_build::configure()
        // Well-known types from pbjson-types carry proto3 JSON mappings.
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .file_descriptor_set_path(&descriptor_path)
        .compile_protos(&files, &[proto_root])?;
    // serde impls following the proto3 JSON mapping (what grpcurl prints),
    // for `redmeshctl --json`.
    let descriptors = std::fs::read(&descriptor_path)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .build(&[".redmesh.v1"])?;
    Ok(())
}
