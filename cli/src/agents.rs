//! `aitbc-backup agents list | get`.

use crate::output::outln;

use aitbc_backup_proto::{Agent, AgentState, GetAgentRequest, ListAgentsRequest};
use serde::Serialize;

use crate::client::{ConnectionArgs, status_error};
use crate::output::{component_name, print_table};

#[derive(clap::Subcommand)]
pub enum AgentsCommand {
    /// List every agent the coordinator has seen, online or not.
    List,
    /// Show one agent.
    Get {
        /// The agent's name.
        name: String,
    },
}

/// The JSON shape of an agent (stable for scripts).
#[derive(Serialize)]
struct AgentJson {
    name: String,
    component: String,
    version: String,
    host: String,
    state: &'static str,
    last_seen: Option<String>,
    connected_since: Option<String>,
    session_id: String,
    peer_address: String,
}

pub async fn run(
    command: AgentsCommand,
    connection: &ConnectionArgs,
    json: bool,
) -> anyhow::Result<()> {
    let mut client = connection.operator().await?;
    let agents = match command {
        AgentsCommand::List => {
            client
                .list_agents(ListAgentsRequest {})
                .await
                .map_err(|s| status_error("ListAgents", s))?
                .into_inner()
                .agents
        }
        AgentsCommand::Get { name } => vec![
            client
                .get_agent(GetAgentRequest { name })
                .await
                .map_err(|s| status_error("GetAgent", s))?
                .into_inner(),
        ],
    };
    let agents: Vec<AgentJson> = agents.into_iter().map(to_json).collect();
    if json {
        outln!("{}", serde_json::to_string_pretty(&agents)?)?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            vec![
                a.name.clone(),
                a.component.clone(),
                a.state.to_owned(),
                a.last_seen.clone().unwrap_or_default(),
                a.version.clone(),
                a.host.clone(),
            ]
        })
        .collect();
    print_table(
        &["NAME", "COMPONENT", "STATE", "LAST SEEN", "VERSION", "HOST"],
        &rows,
    )?;
    Ok(())
}

fn to_json(agent: Agent) -> AgentJson {
    let component = component_name(agent.component).to_owned();
    let state = match AgentState::try_from(agent.state) {
        Ok(AgentState::Online) => "online",
        Ok(AgentState::Offline) => "offline",
        _ => "unknown",
    };
    AgentJson {
        name: agent.name,
        component,
        version: agent.version,
        host: agent.host,
        state,
        last_seen: agent.last_seen.map(rfc3339),
        connected_since: agent.connected_since.map(rfc3339),
        session_id: agent.session_id,
        peer_address: agent.peer_address,
    }
}

pub fn rfc3339(ts: prost_types::Timestamp) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp(ts.seconds, ts.nanos.max(0) as u32)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}
