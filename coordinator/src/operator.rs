//! The operator service: what the CLI and grpcurl call. The role check happens before these
//! handlers run (see [`crate::auth::RequireRole`]). Requests are validated here, on receipt
//! ([`Component::from_proto`], [`Mode::from_proto`]); replies and errors are converted in
//! [`convert`].

pub mod convert;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use aitbc_backup_proto::model::{Component, Mode, RepoKey};
use aitbc_backup_proto::operator_server::Operator;
use aitbc_backup_proto::{
    Agent, CreateSnapshotRequest, DeleteSnapshotRequest, DeleteSnapshotResponse, GetAgentRequest,
    GetSnapshotRequest, ListAgentsRequest, ListAgentsResponse, ListSnapshotsRequest,
    ListSnapshotsResponse, PinSnapshotRequest, RestoreEvent, RestoreSnapshotRequest, Snapshot,
    SnapshotEvent, VerifySnapshotRequest, VerifySnapshotResponse,
};
use aitbc_backup_repository::RepoError;
use futures::StreamExt;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::catalog::SetState;
use crate::fleet::Fleet;
use crate::restore::{RestoreRequest, Target};
use crate::snapshot::{DEFAULT_POLICY, SetRequest, Sets};

pub struct OperatorService {
    pub fleet: Arc<Fleet>,
    pub sets: Arc<Sets>,
}

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn components(field: &'static str, values: &[i32]) -> Result<Vec<Component>, Status> {
    values
        .iter()
        .map(|v| Component::from_proto(field, *v).map_err(Status::from))
        .collect()
}

fn repo_status(err: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("{err:#}"))
}

impl OperatorService {
    /// A set the catalog does not list: damaged (its manifest cannot be read) or unknown.
    fn unknown_set(&self, set_id: &str) -> Status {
        match self.sets.catalog.damaged_set(set_id) {
            Some(damaged) => Status::data_loss(format!(
                "snapshot set `{set_id}`: {damaged}; it cannot be shown or restored, and retention \
                 leaves it alone. Restore the object from a copy of the repository or remove it \
                 deliberately"
            )),
            None => Status::not_found(format!("no snapshot set `{set_id}`")),
        }
    }

    fn committed(&self, set_id: &str) -> Result<crate::catalog::SetRecord, Status> {
        let record = self
            .sets
            .catalog
            .get(set_id)
            .ok_or_else(|| self.unknown_set(set_id))?;
        if record.state != SetState::Committed {
            return Err(Status::failed_precondition(format!(
                "snapshot set `{set_id}` is not committed"
            )));
        }
        Ok(record)
    }
}

#[tonic::async_trait]
impl Operator for OperatorService {
    async fn list_agents(
        &self,
        _request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        let agents = self.fleet.list().into_iter().map(convert::agent).collect();
        Ok(Response::new(ListAgentsResponse { agents }))
    }

    async fn get_agent(
        &self,
        request: Request<GetAgentRequest>,
    ) -> Result<Response<Agent>, Status> {
        let name = request.into_inner().name;
        self.fleet
            .get(&name)
            .map(|view| Response::new(convert::agent(view)))
            .ok_or_else(|| Status::not_found(format!("no agent named `{name}` has registered")))
    }

    type CreateSnapshotStream = EventStream<SnapshotEvent>;

    async fn create_snapshot(
        &self,
        request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<Self::CreateSnapshotStream>, Status> {
        let request = request.into_inner();
        self.sets.catalog_ready().await?;
        let set = SetRequest {
            policy: if request.policy.is_empty() {
                DEFAULT_POLICY.to_owned()
            } else {
                request.policy
            },
            components: components("components", &request.components)?,
            agents: request.agents,
            mode: Mode::from_proto("mode", request.mode)?,
        };
        let (set_id, events) = self.sets.start(set)?;
        // A set queued behind another says so from its first event.
        let started = convert::started(set_id.clone(), &events.queued_behind);
        let following = futures::stream::unfold(events, move |mut events| {
            let set_id = set_id.clone();
            async move {
                let event = events.next().await?;
                Some((Ok(convert::snapshot_event(&set_id, event)), events))
            }
        });
        Ok(Response::new(Box::pin(
            futures::stream::once(async { Ok(started) }).chain(following),
        )))
    }

    async fn list_snapshots(
        &self,
        _request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        self.sets.catalog_ready().await?;
        let snapshots = self
            .sets
            .catalog
            .list()
            .iter()
            .map(convert::snapshot)
            .collect();
        Ok(Response::new(ListSnapshotsResponse { snapshots }))
    }

    async fn get_snapshot(
        &self,
        request: Request<GetSnapshotRequest>,
    ) -> Result<Response<Snapshot>, Status> {
        self.sets.catalog_ready().await?;
        let set_id = request.into_inner().set_id;
        self.sets
            .catalog
            .get(&set_id)
            .map(|r| Response::new(convert::snapshot(&r)))
            .ok_or_else(|| self.unknown_set(&set_id))
    }

    async fn pin_snapshot(
        &self,
        request: Request<PinSnapshotRequest>,
    ) -> Result<Response<Snapshot>, Status> {
        self.sets.catalog_ready().await?;
        let request = request.into_inner();
        self.committed(&request.set_id)?;
        let cancel = CancellationToken::new();
        let repo = self.sets.repo.get(&cancel).await.map_err(repo_status)?;
        repo.pin_set(&request.set_id, request.pinned, &cancel)
            .await
            .map_err(repo_status)?;
        self.sets
            .catalog
            .update(&request.set_id, |r| r.pinned = request.pinned);
        tracing::info!(set = %request.set_id, pinned = request.pinned, "snapshot set pin changed");
        let record = self.committed(&request.set_id)?;
        Ok(Response::new(convert::snapshot(&record)))
    }

    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        self.sets.catalog_ready().await?;
        let set_id = request.into_inner().set_id;
        let record = self
            .sets
            .catalog
            .get(&set_id)
            .ok_or_else(|| self.unknown_set(&set_id))?;
        if record.pinned {
            return Err(Status::failed_precondition(format!(
                "snapshot set `{set_id}` is pinned; unpin it first"
            )));
        }
        if record.state == SetState::Running {
            return Err(Status::failed_precondition(format!(
                "snapshot set `{set_id}` is still running"
            )));
        }
        let deleted = Box::pin(self.sets.delete(&record))
            .await
            .map_err(repo_status)?;
        Ok(Response::new(DeleteSnapshotResponse {
            deleted_manifests: deleted,
        }))
    }

    type RestoreSnapshotStream = EventStream<RestoreEvent>;

    async fn restore_snapshot(
        &self,
        request: Request<RestoreSnapshotRequest>,
    ) -> Result<Response<Self::RestoreSnapshotStream>, Status> {
        self.sets.catalog_ready().await?;
        let request = request.into_inner();
        let mut targets = HashMap::new();
        for target in request.targets {
            let component = Component::from_proto("targets.component", target.component)?;
            targets.insert(
                component,
                Target {
                    dir: target.target_dir,
                    url: target.target_url,
                },
            );
        }
        let set_id = request.set_id;
        let restore = RestoreRequest {
            set_id: set_id.clone(),
            components: components("components", &request.components)?,
            targets,
            force: request.force,
            trial: request.trial,
            key: RepoKey::from_proto("key", request.key)?,
        };
        let events = self.sets.restore(restore)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(events).map(
            move |event| Ok(convert::restore_event(&set_id, event)),
        ))))
    }

    async fn verify_snapshot(
        &self,
        request: Request<VerifySnapshotRequest>,
    ) -> Result<Response<VerifySnapshotResponse>, Status> {
        self.sets.catalog_ready().await?;
        let request = request.into_inner();
        let record = self.committed(&request.set_id)?;
        let key = RepoKey::from_proto("key", request.key)?;
        let report = Box::pin(self.sets.verify(&request.set_id, request.read_data, key))
            .await
            .map_err(|e| match e.downcast_ref::<RepoError>() {
                Some(RepoError::NoSuchManifest(_)) => Status::not_found(format!("{e:#}")),
                // Not worth retrying: the key given (or its absence) is the problem.
                Some(
                    RepoError::WrongKey { .. }
                    | RepoError::RevokedKey { .. }
                    | RepoError::NoKey(_)
                    | RepoError::KeyRequired,
                ) => Status::permission_denied(format!("{e:#}")),
                _ => repo_status(e),
            })?;
        self.sets
            .metrics
            .verifications
            .get_or_create(&crate::metrics::PolicyOutcomeLabel {
                policy: record.policy,
                outcome: if report.ok() { "ok" } else { "failed" },
            })
            .inc();
        Ok(Response::new(VerifySnapshotResponse {
            ok: report.ok(),
            problems: report.problems.iter().map(|p| p.to_string()).collect(),
            manifests: report.manifests as u64,
            chunks: report.chunks as u64,
            chunks_read: report.chunks_read as u64,
        }))
    }
}
