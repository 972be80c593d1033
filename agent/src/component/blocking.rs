//! Components whose phases block (SQLite, a socket driven by hand): their prepared and cut
//! states implement [`BlockingPrepared`] and [`BlockingCut`], and [`OnBlockingPool`] runs each
//! phase on the blocking pool, moving the state in and out, so callers see the async contract.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aitbc_backup_repository::backup::Label;
use aitbc_backup_repository::{Progress, Repository};
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::{Cut, Prepared, Released, Uploaded, blocking};

/// The blocking side of [`Prepared`].
pub trait BlockingPrepared: Send + 'static {
    type Cut: BlockingCut;

    fn fence(&mut self) -> anyhow::Result<()>;

    fn cut(self) -> anyhow::Result<Self::Cut>;

    /// Gives everything up; fenced writers go now.
    fn abort(self);
}

/// The blocking side of [`Cut`]; its upload is async already.
pub trait BlockingCut: Send + 'static {
    fn at(&self) -> Instant;

    fn release(&mut self) -> anyhow::Result<Option<Duration>>;

    fn upload<'a>(
        self,
        repo: &'a Repository,
        label: &'a Label,
        full_scan: bool,
        progress: Arc<Progress>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, anyhow::Result<Uploaded>>;
}

/// A blocking component's state behind the async contract.
pub struct OnBlockingPool<T>(pub T);

/// Prepares a blocking component on the blocking pool.
pub fn prepare_on_blocking_pool<P: BlockingPrepared>(
    prepare: impl FnOnce() -> anyhow::Result<P> + Send + 'static,
) -> BoxFuture<'static, anyhow::Result<Box<dyn Prepared>>> {
    Box::pin(async move {
        let prepared = blocking(prepare).await?;
        Ok(Box::new(OnBlockingPool(prepared)) as Box<dyn Prepared>)
    })
}

impl<P: BlockingPrepared> Prepared for OnBlockingPool<P> {
    fn fence(self: Box<Self>) -> BoxFuture<'static, anyhow::Result<Box<dyn Prepared>>> {
        let mut prepared = self.0;
        Box::pin(async move {
            let prepared = blocking(move || {
                prepared.fence()?;
                Ok(prepared)
            })
            .await?;
            Ok(Box::new(OnBlockingPool(prepared)) as Box<dyn Prepared>)
        })
    }

    /// The wait happens on the thread that cuts, so the cut follows its own timer.
    fn cut(
        self: Box<Self>,
        when: Option<Instant>,
    ) -> BoxFuture<'static, anyhow::Result<Box<dyn Cut>>> {
        let prepared = self.0;
        Box::pin(async move {
            let cut = blocking(move || {
                if let Some(when) = when {
                    std::thread::sleep(when.saturating_duration_since(Instant::now()));
                }
                prepared.cut()
            })
            .await?;
            Ok(Box::new(OnBlockingPool(cut)) as Box<dyn Cut>)
        })
    }

    fn abort(self: Box<Self>) -> BoxFuture<'static, ()> {
        let prepared = self.0;
        Box::pin(async move {
            let _ = blocking(move || {
                prepared.abort();
                Ok(())
            })
            .await;
        })
    }
}

impl<C: BlockingCut> Cut for OnBlockingPool<C> {
    fn at(&self) -> Instant {
        self.0.at()
    }

    fn release(self: Box<Self>) -> BoxFuture<'static, anyhow::Result<Released>> {
        let mut cut = self.0;
        Box::pin(async move {
            blocking(move || {
                let pause = cut.release()?;
                Ok((Box::new(OnBlockingPool(cut)) as Box<dyn Cut>, pause))
            })
            .await
        })
    }

    fn upload<'a>(
        self: Box<Self>,
        repo: &'a Repository,
        label: &'a Label,
        full_scan: bool,
        progress: Arc<Progress>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, anyhow::Result<Uploaded>> {
        self.0.upload(repo, label, full_scan, progress, cancel)
    }
}
