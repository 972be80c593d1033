//! The aitbc-backup coordinator: the fleet registry, the operator API and (in later issues) the
//! snapshot-set protocol, scheduler and retention.
//!
//! - [`config`]: the TOML/env configuration.
//! - [`server`]: wires TLS, gRPC services and the probe server; [`server::Coordinator`] is what
//!   `main` and the in-process tests run.
//! - [`auth`]: role checks from client certificates.
//! - [`fleet`]: the registry of agents and their liveness (rebuilt from sessions at start).
//! - [`session`]: the agent session service.
//! - [`operator`]: the operator service.
//! - [`metrics`]: every metric the coordinator exports.

pub mod auth;
pub mod config;
pub mod fleet;
pub mod metrics;
pub mod operator;
pub mod server;
pub mod session;

pub use config::CoordinatorConfig;
pub use server::Coordinator;
