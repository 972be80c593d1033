//! Every metric the coordinator exports, in one place. Labels are bounded (component, stage,
//! policy, outcome, reason, kind).
//!
//! The backup outcome metrics (`backup_*`, `restore_*`, `snapshot_set_*`, `repository_*`) carry
//! no prefix: `backup_success{component}` is the name the existing alert `backup_success == 0`
//! uses. Only the coordinator exports them (it sees every outcome, an agent that died
//! included), so each component has exactly one series.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use aitbc_backup_proto::model::Component;
use aitbc_backup_repository::DamagedKind;
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
pub struct ComponentStageLabel {
    pub component: String,
    /// `read` (from the component) or `stored` (new bytes in the repository).
    pub stage: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;
type HistogramFamily = Family<ComponentLabel, Histogram, fn() -> Histogram>;

/// Seconds, 1 s to about 9 h.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 16))
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// The kind of a damaged object: `set_manifest` or `component_manifest`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

impl KindLabel {
    pub fn of(kind: DamagedKind) -> Self {
        KindLabel {
            kind: kind.as_str(),
        }
    }
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
    /// Scheduled verifications of committed sets, by outcome (ok, failed, structure_only: a sealed repository's data could not be read without an operator's key).
    pub verifications: Family<PolicyOutcomeLabel, Counter>,
    /// 1 after a committed set included the component, 0 after an aborted one.
    pub backup_success: Family<ComponentLabel, Gauge>,
    pub backup_last_success: Family<ComponentLabel, FloatGauge>,
    /// From the set's start to the component's manifest committed.
    pub backup_duration: HistogramFamily,
    pub backup_bytes: Family<ComponentStageLabel, Counter>,
    /// Of the newest committed set.
    pub cut_skew: FloatGauge,
    pub write_pause: FloatGauge,
    /// One component's restore and verification.
    pub restore_duration: HistogramFamily,
    /// Bytes of every chunk stored, and of every backup's stream (what storing each backup in
    /// full would take).
    pub repository_size: Gauge,
    pub repository_logical: Gauge,
    pub dedup_ratio: FloatGauge,
    /// Manifests that cannot be read, by kind: set manifests from the catalog's load,
    /// component manifests from the latest repository scan.
    pub repository_damaged: Family<KindLabel, Gauge>,
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
            backup_success: Family::default(),
            backup_last_success: Family::default(),
            backup_duration: Family::new_with_constructor(duration_histogram),
            backup_bytes: Family::default(),
            cut_skew: FloatGauge::default(),
            write_pause: FloatGauge::default(),
            restore_duration: Family::new_with_constructor(duration_histogram),
            repository_size: Gauge::default(),
            repository_logical: Gauge::default(),
            dedup_ratio: FloatGauge::default(),
            repository_damaged: Family::default(),
        };
        // Both kinds from the start, so the alert and the dashboard see 0 rather than nothing.
        for kind in DamagedKind::ALL {
            let _ = metrics
                .repository_damaged
                .get_or_create(&KindLabel::of(kind));
        }
        register_outcomes(registry, &metrics);
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

impl Metrics {
    /// Zero series for every policy, so rules and dashboards see them before the first run.
    pub fn init_policies<'a>(&self, policies: impl IntoIterator<Item = &'a str>) {
        for policy in policies {
            let label = PolicyLabel {
                policy: policy.to_owned(),
            };
            let _ = self.scheduler_skips.get_or_create(&label);
            let _ = self.retention_deleted.get_or_create(&label);
            for outcome in ["started", "not_started"] {
                let _ = self.scheduler_runs.get_or_create(&PolicyOutcomeLabel {
                    policy: policy.to_owned(),
                    outcome,
                });
            }
            for outcome in ["ok", "failed"] {
                let _ = self.verifications.get_or_create(&PolicyOutcomeLabel {
                    policy: policy.to_owned(),
                    outcome,
                });
            }
        }
    }
}

fn register_outcomes(registry: &mut Registry, m: &Metrics) {
    registry.register(
        "backup_success",
        "1 after a successful backup of the component (a committed set), 0 after a failed one",
        m.backup_success.clone(),
    );
    registry.register(
        "backup_last_success_timestamp_seconds",
        "Unix time of the component's last successful backup",
        m.backup_last_success.clone(),
    );
    registry.register(
        "backup_duration_seconds",
        "From a set's start to the component's backup committed",
        m.backup_duration.clone(),
    );
    registry.register(
        "backup_bytes",
        "Bytes read from the component and new bytes stored in the repository",
        m.backup_bytes.clone(),
    );
    registry.register(
        "snapshot_set_cut_skew_seconds",
        "Spread of the cut instants of the newest committed set",
        m.cut_skew.clone(),
    );
    registry.register(
        "snapshot_set_write_pause_seconds",
        "How long writers were blocked for the newest committed set (fenced mode)",
        m.write_pause.clone(),
    );
    registry.register(
        "restore_duration_seconds",
        "One component's restore and verification",
        m.restore_duration.clone(),
    );
    registry.register(
        "repository_size_bytes",
        "Bytes of every chunk stored in the repository",
        m.repository_size.clone(),
    );
    registry.register(
        "repository_logical_bytes",
        "Bytes of every backup's stream, as if each were stored in full",
        m.repository_logical.clone(),
    );
    registry.register(
        "repository_dedup_ratio",
        "repository_logical_bytes / repository_size_bytes",
        m.dedup_ratio.clone(),
    );
    registry.register(
        "repository_damaged_objects",
        "Manifests in the repository that cannot be read (skipped; `aitbc-backup repo verify` names them), by kind",
        m.repository_damaged.clone(),
    );
}
