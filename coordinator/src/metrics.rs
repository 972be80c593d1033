//! Every metric the coordinator exports, in one place. Labels are bounded (component, reason).

use std::sync::Arc;

use aitbc_backup_proto::model::Component;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ComponentLabel {
    pub component: String,
}

impl ComponentLabel {
    pub fn of(component: Component) -> Self {
        ComponentLabel {
            component: component.as_str().to_owned(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PolicyLabel {
    pub policy: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PolicyOutcomeLabel {
    pub policy: String,
    pub outcome: &'static str,
}

pub struct Metrics {
    /// Agents with an open, live session.
    pub agents_online: Family<ComponentLabel, Gauge>,
    /// Sessions registered since start.
    pub sessions_opened: Counter,
    /// Sessions ended, by why.
    pub sessions_closed: Family<ReasonLabel, Counter>,
    /// Time to handle one heartbeat (registry update and ack enqueue).
    pub heartbeat_handling: Histogram,
    /// Scheduled runs skipped because the policy's previous run was still going.
    pub scheduler_skips: Family<PolicyLabel, Counter>,
    /// Scheduled runs, by outcome (started, not_started).
    pub scheduler_runs: Family<PolicyOutcomeLabel, Counter>,
    /// Sets removed by retention.
    pub retention_deleted: Family<PolicyLabel, Counter>,
    /// Scheduled verifications of committed sets, by outcome (ok, failed).
    pub verifications: Family<PolicyOutcomeLabel, Counter>,
}

impl Metrics {
    /// Creates the metrics and registers them under the `aitbc_backup_coordinator` prefix.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let metrics = Metrics {
            agents_online: Family::default(),
            sessions_opened: Counter::default(),
            sessions_closed: Family::default(),
            heartbeat_handling: Histogram::new(exponential_buckets(1e-6, 4.0, 12)),
            scheduler_skips: Family::default(),
            scheduler_runs: Family::default(),
            retention_deleted: Family::default(),
            verifications: Family::default(),
        };
        let sub = registry.sub_registry_with_prefix("aitbc_backup_coordinator");
        sub.register(
            "agents_online",
            "Agents with a live session",
            metrics.agents_online.clone(),
        );
        sub.register(
            "sessions_opened",
            "Agent sessions registered",
            metrics.sessions_opened.clone(),
        );
        sub.register(
            "sessions_closed",
            "Agent sessions ended, by reason",
            metrics.sessions_closed.clone(),
        );
        sub.register(
            "heartbeat_handling_seconds",
            "Time to handle one agent heartbeat",
            metrics.heartbeat_handling.clone(),
        );
        sub.register(
            "scheduler_skips",
            "Scheduled runs skipped because the policy's previous run was still going",
            metrics.scheduler_skips.clone(),
        );
        sub.register(
            "scheduler_runs",
            "Scheduled runs, by outcome",
            metrics.scheduler_runs.clone(),
        );
        sub.register(
            "retention_deleted_sets",
            "Snapshot sets deleted by retention",
            metrics.retention_deleted.clone(),
        );
        sub.register(
            "verifications",
            "Scheduled verifications of committed sets, by outcome",
            metrics.verifications.clone(),
        );
        Arc::new(metrics)
    }
}
