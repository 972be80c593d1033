//! The operator service: what the CLI and grpcurl call. The role check happens before these
//! handlers run (see [`crate::auth::RequireRole`]).

use std::sync::Arc;
use std::time::SystemTime;

use aitbc_backup_proto::operator_server::Operator;
use aitbc_backup_proto::{
    Agent, AgentState, GetAgentRequest, ListAgentsRequest, ListAgentsResponse,
};
use tonic::{Request, Response, Status};

use crate::fleet::{AgentView, Fleet, Liveness};

pub struct OperatorService {
    pub fleet: Arc<Fleet>,
}

#[tonic::async_trait]
impl Operator for OperatorService {
    async fn list_agents(
        &self,
        _request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        let agents = self.fleet.list().into_iter().map(to_proto).collect();
        Ok(Response::new(ListAgentsResponse { agents }))
    }

    async fn get_agent(
        &self,
        request: Request<GetAgentRequest>,
    ) -> Result<Response<Agent>, Status> {
        let name = request.into_inner().name;
        self.fleet
            .get(&name)
            .map(|view| Response::new(to_proto(view)))
            .ok_or_else(|| Status::not_found(format!("no agent named `{name}` has registered")))
    }
}

fn to_proto(view: AgentView) -> Agent {
    Agent {
        name: view.name,
        component: view.component.to_proto() as i32,
        version: view.version,
        host: view.host,
        state: match view.liveness {
            Liveness::Online => AgentState::Online,
            Liveness::Offline => AgentState::Offline,
        } as i32,
        last_seen: Some(timestamp(view.last_seen)),
        connected_since: Some(timestamp(view.connected_since)),
        session_id: view.session_id,
        peer_address: view.peer_address.map(|a| a.to_string()).unwrap_or_default(),
    }
}

fn timestamp(time: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(time)
}
