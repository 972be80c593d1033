//! The aitbc-backup coordinator: the fleet registry, the operator API, the snapshot-set
//! protocol and ordered restores.
//!
//! - [`config`]: the TOML/env configuration.
//! - [`server`]: wires TLS, gRPC services and the probe server; [`server::Coordinator`] is what
//!   `main` and the in-process tests run.
//! - [`auth`]: role checks from client certificates.
//! - [`fleet`]: the registry of agents and their liveness (rebuilt from sessions at start).
//! - [`session`]: the agent session service.
//! - [`operator`]: the operator service; [`operator::convert`] turns domain types into its
//!   messages and errors into statuses.
//! - [`calls`]: commands to agents and their answers.
//! - [`snapshot`]: the snapshot-set protocol (typed events and [`snapshot::SetError`]);
//!   [`restore`]: ordered restores of a set.
//! - [`catalog`]: the sets the coordinator knows, rebuilt from the repository at start;
//!   [`stored`]: catalog loading, verification, deletion and retention of stored sets.
//! - [`outcomes`]: the backup outcome metrics, recorded as sets end.
//! - [`scheduler`]: policies on their cron schedules; [`retention`]: which sets go.
//! - [`metrics`]: every metric the coordinator exports.

pub mod auth;
pub mod calls;
pub mod catalog;
pub mod config;
pub mod fleet;
pub mod metrics;
pub mod operator;
pub mod outcomes;
pub mod restore;
pub mod retention;
pub mod scheduler;
pub mod server;
pub mod session;
pub mod snapshot;
pub mod stored;
#[cfg(test)]
mod testing;

pub use config::CoordinatorConfig;
pub use server::Coordinator;
