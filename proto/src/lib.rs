//! The `aitbc.backup.v1` gRPC API: generated messages, clients and servers, and the encoded file
//! descriptor set that the coordinator serves through gRPC reflection.

#[allow(clippy::all, clippy::unwrap_used, missing_docs, rust_2018_idioms)]
mod generated {
    tonic::include_proto!("aitbc.backup.v1");
}

pub use generated::*;

pub mod model;

/// Encoded `FileDescriptorSet` of every `aitbc.backup.v1` file (imports included), for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("aitbc_backup_v1_descriptor");
