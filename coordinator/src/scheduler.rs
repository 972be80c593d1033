//! The scheduler: one loop per policy, firing on its cron schedule (UTC). A run never overlaps
//! the policy's previous one (the firing is skipped and counted); a run that shares agents with
//! another set running (an operator's, another policy's) is queued behind it like any set. A run missed while the
//! coordinator was down (the schedule fired between the policy's newest set and now) runs once
//! at start. After each run, the policy's verification (if any), its retention, then GC, then
//! (with an Object Lock) the extension of the locks kept sets need, which also runs on its own
//! timer ([`crate::stored::lock_upkeep`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::catalog::SetState;
use crate::config::{GcSettings, PolicySettings, VerifyAfter};
use crate::metrics::{Metrics, PolicyLabel, PolicyOutcomeLabel};
use crate::retention::Rules;
use crate::snapshot::{SetRequest, Sets};

/// How often the scheduler retries reading the catalog while the repository is unreachable.
const CATALOG_RETRY: Duration = Duration::from_secs(5);
/// How long a missed run waits at start for the policy's agents to reconnect.
const RECONNECT_GRACE: Duration = Duration::from_secs(60);

pub struct Scheduler {
    pub sets: Arc<Sets>,
    pub policies: Vec<PolicySettings>,
    /// `retention.days`: the age rule of policies that do not set their own.
    pub default_days: u32,
    pub gc: GcSettings,
    pub metrics: Arc<Metrics>,
}

impl Scheduler {
    /// Runs every policy's loop until `cancel`.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        while let Err(err) = self.sets.catalog_ready().await {
            tracing::warn!(error = %err, "scheduler waits for the catalog");
            if !aitbc_backup_backoff::sleep_or_cancel(CATALOG_RETRY, &cancel).await {
                return;
            }
        }
        let loops = self.policies.iter().map(|policy| {
            let scheduler = self.clone();
            let cancel = cancel.clone();
            async move { scheduler.policy_loop(policy, &cancel).await }
        });
        futures::future::join_all(loops).await;
    }

    async fn policy_loop(&self, policy: &PolicySettings, cancel: &CancellationToken) {
        let newest = self
            .sets
            .catalog
            .list()
            .into_iter()
            .filter(|s| s.policy == policy.name)
            .filter_map(|s| chrono::DateTime::parse_from_rfc3339(&s.created).ok())
            .max();
        if let Some(newest) = newest
            && policy
                .schedule
                .next_after(&newest.with_timezone(&Utc))
                .is_some_and(|due| due <= Utc::now())
        {
            tracing::info!(policy = %policy.name, "a scheduled run was missed while the coordinator was down; running it now");
            // Agents reconnect after a coordinator restart within their backoff.
            let since = Instant::now();
            while !self.fire(policy, since.elapsed() < RECONNECT_GRACE) {
                if !aitbc_backup_backoff::sleep_or_cancel(Duration::from_secs(1), cancel).await {
                    return;
                }
            }
        }
        loop {
            let Some(next) = policy.schedule.next_after(&Utc::now()) else {
                tracing::warn!(policy = %policy.name, "the schedule never fires again");
                return;
            };
            let wait = (next - Utc::now()).to_std().unwrap_or_default();
            tracing::debug!(policy = %policy.name, %next, "next scheduled run");
            if !aitbc_backup_backoff::sleep_or_cancel(wait, cancel).await {
                return;
            }
            self.fire(policy, false);
        }
    }

    /// Starts a run unless one of the policy is still going; retention follows the run. With
    /// `retry`, a run that finds no agents is not counted and false is returned (try again).
    fn fire(&self, policy: &PolicySettings, retry: bool) -> bool {
        let running = self
            .sets
            .catalog
            .list()
            .into_iter()
            .any(|s| s.policy == policy.name && s.state == SetState::Running);
        let label = PolicyLabel {
            policy: policy.name.clone(),
        };
        if running {
            tracing::warn!(policy = %policy.name, "previous run still going; this run is skipped");
            self.metrics.scheduler_skips.get_or_create(&label).inc();
            return true;
        }
        let request = SetRequest {
            policy: policy.name.clone(),
            components: policy.components.clone(),
            agents: policy.agents.clone(),
            mode: policy.mode,
        };
        let outcome = |outcome| PolicyOutcomeLabel {
            policy: policy.name.clone(),
            outcome,
        };
        match self.sets.start(request) {
            Err(_) if retry => false,
            Err(err) => {
                tracing::warn!(policy = %policy.name, error = %err, "scheduled run not started");
                self.metrics
                    .scheduler_runs
                    .get_or_create(&outcome("not_started"))
                    .inc();
                true
            }
            Ok((set_id, events)) => {
                tracing::info!(policy = %policy.name, set = %set_id, queued_behind = ?events.queued_behind, "scheduled run started");
                self.metrics
                    .scheduler_runs
                    .get_or_create(&outcome("started"))
                    .inc();
                let sets = self.sets.clone();
                let rules = Rules::of(&policy.retention, self.default_days);
                let (name, gc, metrics) =
                    (policy.name.clone(), self.gc.clone(), self.metrics.clone());
                let verify = policy.verify;
                self.sets.tasks.spawn(async move {
                    if events.committed().await && verify != VerifyAfter::None {
                        let wanted = verify;
                        let verify = structure_without_key(&sets, &name, verify).await;
                        let checked = match verify {
                            VerifyAfter::Restore => Box::pin(sets.trial_restore(&set_id, None))
                                .await
                                .map(|failures| failures.iter().map(ToString::to_string).collect())
                                .map_err(anyhow::Error::from),
                            other => {
                                let read_data = other == VerifyAfter::ReadData;
                                Box::pin(sets.verify(&set_id, read_data, None)).await.map(|report| {
                                    report.problems.iter().map(ToString::to_string).collect::<Vec<_>>()
                                })
                            }
                        };
                        let outcome = match checked {
                            // Sound as far as it could look: its data was not read.
                            Ok(problems) if problems.is_empty() && wanted != verify => {
                                "structure_only"
                            }
                            Ok(problems) if problems.is_empty() => "ok",
                            Ok(problems) => {
                                tracing::error!(set = %set_id, ?problems, "scheduled verification FAILED");
                                "failed"
                            }
                            Err(err) => {
                                tracing::error!(set = %set_id, error = %format!("{err:#}"), "scheduled verification could not run");
                                "failed"
                            }
                        };
                        metrics
                            .verifications
                            .get_or_create(&PolicyOutcomeLabel {
                                policy: name.clone(),
                                outcome,
                            })
                            .inc();
                    }
                    match Box::pin(sets.apply_retention(&name, rules, &gc)).await {
                        Ok(deleted) => {
                            metrics
                                .retention_deleted
                                .get_or_create(&PolicyLabel { policy: name })
                                .inc_by(deleted as u64);
                        }
                        Err(err) => {
                            tracing::warn!(policy = %name, error = %format!("{err:#}"), "retention failed; retried after the next run")
                        }
                    }
                    // A new set may reuse chunks whose first lock is running out.
                    if let Err(err) = Box::pin(sets.extend_locks()).await {
                        tracing::error!(error = %format!("{err:#}"), "extending object locks failed; retried by the upkeep");
                    }
                });
                true
            }
        }
    }
}

/// What a scheduled verification can do: reading data (`read_data`, `restore`) in a sealed
/// repository takes an operator's key, which the coordinator holds only if it was given one
/// (`repository.passphrase` instead of a metadata credential). Without it the set's structure
/// is checked, and the log says so at every run.
async fn structure_without_key(sets: &Sets, policy: &str, verify: VerifyAfter) -> VerifyAfter {
    if !matches!(verify, VerifyAfter::ReadData | VerifyAfter::Restore) {
        return verify;
    }
    match sets.reads_data().await {
        Ok(false) => {
            tracing::warn!(
                policy,
                wanted = ?verify,
                "the repository is sealed and the coordinator holds no operator key: the set's \
                 structure is verified, its data is not (run `aitbc-backup snapshot verify \
                 --read-data` or a restore test with the operator's key)"
            );
            VerifyAfter::Structure
        }
        _ => verify,
    }
}
