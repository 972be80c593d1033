//! Generates the tonic/prost code and the file descriptor set served by gRPC reflection.
//! protoc comes from the `protoc-bin-vendored` crate so no system install is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "aitbc/backup/v1/common.proto",
        "aitbc/backup/v1/session.proto",
        "aitbc/backup/v1/operator.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    // A repository key must never reach a log through `{:?}` of a request or command: its
    // Debug is written by hand (model.rs) and prints no secret.
    config.skip_debug(["aitbc.backup.v1.RepositoryKey"]);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("aitbc_backup_v1_descriptor.bin"))
        .compile_with_config(
            config,
            &protos.map(PathBuf::from),
            &[PathBuf::from("."), include],
        )?;
    Ok(())
}
