//! Every metric the agent exports, in one place.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

pub struct Metrics {
    /// 1 while the session with the coordinator is established.
    pub session_up: Gauge,
    /// Session attempts, by outcome (`registered`, `failed`).
    pub session_attempts: Family<OutcomeLabel, Counter>,
    /// Heartbeat round trip to the coordinator.
    pub heartbeat_rtt: Histogram,
}

/// The WAL archiver's metrics (standalone counters, registered when the agent serves them).
#[derive(Clone, Default)]
pub struct WalMetrics {
    pub archived_segments: Counter,
    pub gaps: Counter,
    pub receiver_restarts: Counter,
    pub upload_failures: Counter,
    /// Unix seconds of the last completed segment stored.
    pub last_archived: Gauge,
    /// Unix seconds of the last base backup this agent took.
    pub last_base_backup: Gauge,
}

impl WalMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("aitbc_backup_agent_wal");
        sub.register(
            "archived_segments",
            "Completed WAL segments stored in the repository",
            self.archived_segments.clone(),
        );
        sub.register(
            "gaps",
            "Breaks in the archived WAL sequence (segments never archived)",
            self.gaps.clone(),
        );
        sub.register(
            "receiver_restarts",
            "Times pg_receivewal stopped and was restarted",
            self.receiver_restarts.clone(),
        );
        sub.register(
            "upload_failures",
            "WAL upload passes that failed (retried on the next pass)",
            self.upload_failures.clone(),
        );
        sub.register(
            "last_archived_timestamp_seconds",
            "When the last completed WAL segment was stored",
            self.last_archived.clone(),
        );
        sub.register(
            "last_base_backup_timestamp_seconds",
            "When this agent last stored a base backup",
            self.last_base_backup.clone(),
        );
    }
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let metrics = Metrics {
            session_up: Gauge::default(),
            session_attempts: Family::default(),
            heartbeat_rtt: Histogram::new(exponential_buckets(1e-4, 4.0, 10)),
        };
        let sub = registry.sub_registry_with_prefix("aitbc_backup_agent");
        sub.register(
            "session_up",
            "1 while the coordinator session is established",
            metrics.session_up.clone(),
        );
        sub.register(
            "session_attempts",
            "Coordinator session attempts by outcome",
            metrics.session_attempts.clone(),
        );
        sub.register(
            "heartbeat_rtt_seconds",
            "Heartbeat round trip to the coordinator",
            metrics.heartbeat_rtt.clone(),
        );
        Arc::new(metrics)
    }
}
