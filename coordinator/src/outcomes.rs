//! What the backup outcome metrics say (defined in [`crate::metrics`]): recorded when a set
//! commits or aborts, seeded from the catalog after a restart, and the repository's size,
//! deduplication and damaged manifests recomputed after commits and retention.

use std::time::Duration;

use aitbc_backup_proto::model::Component;
use aitbc_backup_repository::DamagedKind;

use crate::catalog::{SetRecord, SetState};
use crate::metrics::{ComponentLabel, ComponentStageLabel, KindLabel};
use crate::snapshot::Sets;

impl Sets {
    /// After a restart: each component's last success time, and its outcome from the newest
    /// set that included it (committed: 1), so the age alert keeps working across restarts.
    pub(crate) fn seed_metrics(&self) {
        let m = &self.metrics;
        for record in self.catalog.list() {
            // Oldest first: later sets overwrite earlier ones.
            if record.state != SetState::Committed {
                continue;
            }
            let at = chrono::DateTime::parse_from_rfc3339(&record.created)
                .map(|t| t.timestamp_millis() as f64 / 1e3)
                .unwrap_or(0.0);
            for c in &record.components {
                let label = ComponentLabel::of(c.component);
                m.backup_success.get_or_create(&label).set(1);
                m.backup_last_success.get_or_create(&label).set(at);
            }
            m.cut_skew.set(record.cut_skew_ms / 1e3);
            m.write_pause.set(record.write_pause_ms / 1e3);
        }
        self.set_damaged_metrics();
    }

    /// The damaged-object gauges from what the catalog knows.
    pub(crate) fn set_damaged_metrics(&self) {
        for kind in DamagedKind::ALL {
            self.metrics
                .repository_damaged
                .get_or_create(&KindLabel::of(kind))
                .set(self.catalog.damaged_count(kind) as i64);
        }
    }

    /// An aborted set: every component it included failed its backup.
    pub(crate) fn record_failure(&self, components: impl Iterator<Item = Component>) {
        for component in components {
            self.metrics
                .backup_success
                .get_or_create(&ComponentLabel::of(component))
                .set(0);
        }
    }

    pub(crate) fn record_success(&self, record: &SetRecord, took: Duration) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let m = &self.metrics;
        for c in &record.components {
            let label = ComponentLabel::of(c.component);
            m.backup_success.get_or_create(&label).set(1);
            m.backup_last_success.get_or_create(&label).set(now);
            m.backup_duration
                .get_or_create(&label)
                .observe(took.as_secs_f64());
            for (stage, bytes) in [("read", c.bytes_read), ("stored", c.bytes_stored)] {
                m.backup_bytes
                    .get_or_create(&ComponentStageLabel {
                        component: label.component.clone(),
                        stage,
                    })
                    .inc_by(bytes);
            }
        }
        m.cut_skew.set(record.cut_skew_ms / 1e3);
        m.write_pause.set(record.write_pause_ms / 1e3);
    }

    /// Recomputes the repository's size and deduplication (one listing of the chunks and one
    /// read per component manifest); a failure only leaves the gauges as they were.
    pub async fn refresh_repository_metrics(&self) {
        let cancel = self.shutdown.child_token();
        let stats = async {
            let repo = self.repo.get(&cancel).await?;
            anyhow::Ok(Box::pin(repo.stats(&cancel)).await?)
        };
        match stats.await {
            Ok(stats) => {
                for damaged in self
                    .catalog
                    .note_damaged_components(stats.damaged_component_manifests.clone())
                {
                    tracing::warn!(
                        manifest = %damaged.id,
                        object = %damaged.object,
                        reason = %damaged.reason,
                        "damaged component manifest skipped: its backup cannot be restored and GC \
                         stops until it is restored from a copy or removed deliberately \
                         (`aitbc-backup repo forget`)"
                    );
                }
                self.set_damaged_metrics();
                let m = &self.metrics;
                m.repository_size.set(stats.stored_bytes as i64);
                m.repository_logical.set(stats.logical_bytes as i64);
                m.dedup_ratio
                    .set(stats.logical_bytes as f64 / stats.stored_bytes.max(1) as f64);
            }
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "repository metrics not updated")
            }
        }
    }
}
