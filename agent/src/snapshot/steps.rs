//! The snapshot-set phases over the three components: one enum per phase, so the set task does
//! not care which component it drives. Blocking component calls (Redis, SQLite) run on the
//! blocking pool, moving their state in and out.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aitbc_backup_proto::model::Component;
use aitbc_backup_repository::backup::Label;
use aitbc_backup_repository::{Progress, Repository};
use tokio_util::sync::CancellationToken;

use crate::AgentConfig;
use crate::{ledger, postgres, redis};

/// Connected and checked; maybe fenced.
#[allow(clippy::large_enum_variant)] // one per set, moved a handful of times
pub enum Prepared {
    Postgres(postgres::cut::Prepared),
    Redis(redis::backup::Prepared),
    Ledger(ledger::backup::Prepared),
}

/// The consistency point is taken; maybe still fenced.
#[allow(clippy::large_enum_variant)] // one per set, moved a handful of times
pub enum Cut {
    Postgres(postgres::cut::Cut),
    Redis(redis::backup::Cut),
    Ledger(ledger::backup::Cut),
}

/// What an upload committed.
pub struct Uploaded {
    pub manifest_id: String,
    pub report: serde_json::Value,
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(work).await?
}

/// The wall-clock time of a monotonic instant in the past.
pub fn wall_clock(at: Instant) -> SystemTime {
    SystemTime::now() - at.elapsed()
}

/// The monotonic instant of a wall-clock time given in microseconds since the epoch; None for
/// 0, for the past, or for more than `MAX_CUT_DELAY` ahead (a clock far off cuts at once).
pub fn instant_of(unix_micros: i64) -> Option<Instant> {
    const MAX_CUT_DELAY: Duration = Duration::from_secs(1);
    let target = SystemTime::UNIX_EPOCH + Duration::from_micros(u64::try_from(unix_micros).ok()?);
    let ahead = target.duration_since(SystemTime::now()).ok()?;
    (ahead <= MAX_CUT_DELAY).then(|| Instant::now() + ahead)
}

/// The restore point a set's PostgreSQL cut writes when WAL is archived.
pub fn restore_point_name(set_id: &str) -> String {
    format!("aitbc-set-{set_id}")
}

pub async fn prepare(
    config: &AgentConfig,
    component: Component,
    set_id: &str,
) -> anyhow::Result<Prepared> {
    Ok(match component {
        Component::Postgres => {
            let mut prepared = postgres::cut::prepare(&config.postgres).await?;
            if config.postgres.wal.archive {
                prepared = prepared
                    .with_restore_point(restore_point_name(set_id))
                    .await?;
            }
            Prepared::Postgres(prepared)
        }
        Component::Redis => {
            let settings = config.redis.clone();
            Prepared::Redis(blocking(move || redis::backup::prepare(&settings)).await?)
        }
        Component::Ledger => {
            let settings = config.ledger.clone();
            Prepared::Ledger(blocking(move || ledger::backup::prepare(&settings)).await?)
        }
    })
}

impl Prepared {
    /// Blocks the component's writers; they go at [`Cut::release`], at abort, or at the
    /// component's own deadline.
    pub async fn fence(self) -> anyhow::Result<Prepared> {
        Ok(match self {
            Prepared::Postgres(mut p) => {
                p.fence().await?;
                Prepared::Postgres(p)
            }
            Prepared::Redis(mut p) => Prepared::Redis(
                blocking(move || {
                    p.fence()?;
                    Ok(p)
                })
                .await?,
            ),
            Prepared::Ledger(mut p) => Prepared::Ledger(
                blocking(move || {
                    p.fence()?;
                    Ok(p)
                })
                .await?,
            ),
        })
    }

    /// Takes the consistency point at `when` (or at once); returns it with the instant it was
    /// taken. The wait happens on the thread that cuts, so the cut follows its own timer.
    pub async fn cut(self, when: Option<Instant>) -> anyhow::Result<(Cut, Instant)> {
        let wait = move || {
            if let Some(when) = when {
                std::thread::sleep(when.saturating_duration_since(Instant::now()));
            }
        };
        Ok(match self {
            Prepared::Postgres(p) => {
                if let Some(when) = when {
                    tokio::time::sleep_until(when.into()).await;
                }
                let cut = p.cut(false).await?;
                let at = cut.at;
                (Cut::Postgres(cut), at)
            }
            Prepared::Redis(p) => {
                let cut = blocking(move || {
                    wait();
                    p.cut(false)
                })
                .await?;
                let at = cut.at;
                (Cut::Redis(cut), at)
            }
            Prepared::Ledger(p) => {
                let cut = blocking(move || {
                    wait();
                    p.cut()
                })
                .await?;
                let at = cut.at;
                (Cut::Ledger(cut), at)
            }
        })
    }

    /// Gives everything up; fenced writers go now.
    pub async fn abort(self) {
        match self {
            // Dropping the fences releases them (PostgreSQL: COMMIT; SQLite: ROLLBACK).
            Prepared::Postgres(_) | Prepared::Ledger(_) => {}
            Prepared::Redis(mut p) => {
                let unpaused = blocking(move || p.unfence()).await;
                if let Err(err) = unpaused {
                    tracing::warn!(error = %format!("{err:#}"), "CLIENT UNPAUSE failed; the pause ends at its deadline");
                }
            }
        }
    }
}

impl Cut {
    /// Lets fenced writers go; how long they were held (None when not fenced).
    pub async fn release(self) -> anyhow::Result<(Cut, Option<Duration>)> {
        Ok(match self {
            Cut::Postgres(mut c) => {
                let pause = match c.fence.take() {
                    Some(fence) => Some(fence.release().await),
                    None => None,
                };
                (Cut::Postgres(c), pause)
            }
            Cut::Redis(mut c) => {
                blocking(move || {
                    let pause = c.release()?;
                    Ok((Cut::Redis(c), pause))
                })
                .await?
            }
            Cut::Ledger(mut c) => {
                blocking(move || {
                    let pause = c.release();
                    Ok((Cut::Ledger(c), pause))
                })
                .await?
            }
        })
    }

    /// Streams the data from the cut into the repository and commits the component manifest.
    pub async fn upload(
        self,
        repo: &Repository,
        label: &Label,
        full_scan: bool,
        progress: Arc<Progress>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Uploaded> {
        let (manifest_id, report) = match self {
            Cut::Postgres(c) => {
                let report = Box::pin(c.upload(repo, label, progress, cancel)).await?;
                (report.manifest.clone(), serde_json::to_value(report)?)
            }
            Cut::Redis(c) => {
                let report = Box::pin(c.upload(repo, label, progress, cancel)).await?;
                (report.manifest.clone(), serde_json::to_value(report)?)
            }
            Cut::Ledger(c) => {
                let report = Box::pin(c.upload(repo, label, full_scan, progress, cancel)).await?;
                (report.manifest.clone(), serde_json::to_value(report)?)
            }
        };
        Ok(Uploaded {
            manifest_id,
            report,
        })
    }

    /// Gives everything up; fenced writers go now.
    pub async fn abort(self) {
        if let Err(err) = self.release().await {
            tracing::warn!(error = %format!("{err:#}"), "releasing the fence failed; it ends at its deadline");
        }
    }
}
