//! The whole product on loopback: PostgreSQL, Redis, the node simulator mirroring every block
//! into both, a coordinator and one agent per component, all sharing a local repository.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use crate::agent::init_local_repository;
use crate::fleet::{AgentProcess, CertFiles, CoordinatorProcess, Pki, agent_state, cli};
use crate::node::NodeSim;
use crate::postgres::Postgres;
use crate::redis::Redis;

/// The database the simulator mirrors blocks into.
pub const MIRROR_DB: &str = "aitbc";

pub struct Stack {
    pub pki: Pki,
    pub repository: String,
    pub pg: Postgres,
    pub redis: Redis,
    pub node: NodeSim,
    pub coordinator: CoordinatorProcess,
    pub agents: Vec<AgentProcess>,
    pub dir: tempfile::TempDir,
}

impl Stack {
    /// Starts everything, the simulator at `rate` blocks/s, and waits until the three agents are
    /// online and the chain has some blocks. `coordinator_env` configures the coordinator.
    pub fn start(rate: u32, coordinator_env: &[(&str, &str)]) -> Stack {
        Stack::start_with(rate, coordinator_env, &[], &[])
    }

    /// [`Stack::start`] with extra Redis server arguments and extra env for every agent.
    pub fn start_with(
        rate: u32,
        coordinator_env: &[(&str, &str)],
        redis_args: &[&str],
        agent_env: &[(&str, &str)],
    ) -> Stack {
        let dir = crate::temp_dir("stack");
        let repository = init_local_repository(dir.path());
        Stack::start_in(
            dir,
            repository,
            rate,
            coordinator_env,
            redis_args,
            agent_env,
        )
    }

    /// [`Stack::start`] on an initialized `repository` (an S3 URL, say), which the coordinator
    /// and every agent reach with `repository_env` (endpoint, credentials, expected lock).
    pub fn start_on(repository: &str, repository_env: &[(&str, &str)], rate: u32) -> Stack {
        Stack::start_on_with(repository, repository_env, repository_env, rate)
    }

    /// [`Stack::start_on`] with the coordinator's env and every agent's env apart.
    pub fn start_on_with(
        repository: &str,
        coordinator_env: &[(&str, &str)],
        agent_env: &[(&str, &str)],
        rate: u32,
    ) -> Stack {
        let dir = crate::temp_dir("stack");
        Stack::start_in(
            dir,
            repository.to_owned(),
            rate,
            coordinator_env,
            &[],
            agent_env,
        )
    }

    fn start_in(
        dir: tempfile::TempDir,
        repository: String,
        rate: u32,
        coordinator_env: &[(&str, &str)],
        redis_args: &[&str],
        agent_env: &[(&str, &str)],
    ) -> Stack {
        let pki = Pki::new();
        let pg = Postgres::start();
        pg.psql("postgres", &format!("CREATE DATABASE {MIRROR_DB}"));
        let mut args = vec!["--repl-diskless-sync-delay", "0"];
        args.extend_from_slice(redis_args);
        let redis = Redis::start_with(&args);
        let node = NodeSim::start(
            dir.path(),
            "wal",
            rate,
            &[
                "--mirror-postgres",
                &pg.url(MIRROR_DB),
                "--mirror-redis",
                &format!("127.0.0.1:{}", redis.port),
            ],
        );
        assert!(
            crate::wait_until(Duration::from_secs(20), || node
                .head()
                .is_some_and(|(h, _)| h >= 5)),
            "the simulator writes no blocks: {}",
            node.service.log()
        );
        let mut env: Vec<(&str, &str)> = vec![("AITBC_BACKUP_REPOSITORY__URL", &repository)];
        env.extend_from_slice(coordinator_env);
        let coordinator = CoordinatorProcess::start(&pki, &env);
        let mut stack = Stack {
            pki,
            repository,
            pg,
            redis,
            node,
            coordinator,
            agents: Vec::new(),
            dir,
        };
        for component in ["postgres", "redis", "ledger"] {
            stack.start_agent(component, agent_env);
        }
        stack
    }

    /// (Re)starts the agent of `component` (named after it), configured for this stack's
    /// servers plus `extra` env.
    pub fn start_agent(&mut self, component: &str, extra: &[(&str, &str)]) {
        let scratch = self.dir.path().join(format!("scratch-{component}"));
        std::fs::create_dir_all(&scratch).expect("scratch dir");
        let env: Vec<(String, String)> = vec![
            (
                "AITBC_BACKUP_REPOSITORY__URL".into(),
                self.repository.clone(),
            ),
            ("AITBC_BACKUP_POSTGRES__URL".into(), self.pg.url("postgres")),
            (
                "AITBC_BACKUP_POSTGRES__DATABASES".into(),
                format!(r#"["{MIRROR_DB}"]"#),
            ),
            (
                "AITBC_BACKUP_POSTGRES__FENCE_TABLES".into(),
                format!(r#"["{MIRROR_DB}.public.chain_blocks"]"#),
            ),
            (
                "AITBC_BACKUP_REDIS__ADDRESS".into(),
                format!("127.0.0.1:{}", self.redis.port),
            ),
            (
                "AITBC_BACKUP_LEDGER__DATA_DIR".into(),
                self.node.data_dir.display().to_string(),
            ),
            (
                "AITBC_BACKUP_LEDGER__SCRATCH_DIR".into(),
                scratch.display().to_string(),
            ),
            (
                "AITBC_BACKUP_REDIS__STATE_DIR".into(),
                scratch.display().to_string(),
            ),
            (
                "AITBC_BACKUP_POSTGRES__SCRATCH_DIR".into(),
                scratch.display().to_string(),
            ),
            ("COMPRESSION_LEVEL".into(), "1".into()),
        ];
        let mut env: Vec<(&str, &str)> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        env.extend_from_slice(extra);
        if let Some(mut old) = self
            .agents
            .iter()
            .position(|a| a.name == component)
            .map(|i| self.agents.remove(i))
        {
            old.service().stop();
        }
        let agent = AgentProcess::start(
            &self.pki,
            component,
            component,
            &self.coordinator.url(),
            &env,
        );
        let (operator, url) = (self.pki.operator(), self.coordinator.url());
        assert!(
            crate::wait_until(Duration::from_secs(20), || agent_state(
                &operator, &url, component
            )
            .as_deref()
                == Some("online")),
            "agent {component} did not come online: {}",
            agent.log()
        );
        self.agents.push(agent);
    }

    /// Waits until every agent is online again (after the coordinator was stopped or restarted).
    pub fn wait_agents_online(&self) {
        let (operator, url) = (self.pki.operator(), self.coordinator.url());
        for agent in &self.agents {
            assert!(
                crate::wait_until(Duration::from_secs(30), || agent_state(
                    &operator,
                    &url,
                    &agent.name
                )
                .as_deref()
                    == Some("online")),
                "agent {} did not come back online: {}",
                agent.name,
                agent.log()
            );
        }
    }

    pub fn agent(&mut self, component: &str) -> &mut AgentProcess {
        self.agents
            .iter_mut()
            .find(|a| a.name == component)
            .expect("agent")
    }

    pub fn operator(&self) -> CertFiles {
        self.pki.operator()
    }

    /// The CLI command against this stack's coordinator, not started.
    pub fn cli_command(&self, args: &[&str]) -> std::process::Command {
        crate::fleet::cli_command(&self.pki.operator(), &self.coordinator.url(), args)
    }

    /// The CLI against this stack's coordinator.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli(&self.pki.operator(), &self.coordinator.url(), args)
    }

    /// The CLI, which must succeed; its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "aitbc-backup {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `snapshot list --json`: every set the coordinator knows.
    pub fn snapshots(&self) -> Vec<serde_json::Value> {
        let list: serde_json::Value =
            serde_json::from_str(&self.cli_ok(&["snapshot", "list", "--json"])).expect("list JSON");
        list.as_array().expect("a JSON array").clone()
    }

    /// The listed set `id`, or Null.
    pub fn snapshot_listed(&self, id: &str) -> serde_json::Value {
        self.snapshots()
            .into_iter()
            .find(|s| s["id"] == id)
            .unwrap_or(serde_json::Value::Null)
    }

    /// The local repository's directory.
    pub fn repository_dir(&self) -> PathBuf {
        PathBuf::from(self.repository.trim_start_matches("file://"))
    }

    /// The bodies of the set manifests stored in the repository (unencrypted envelopes).
    pub fn stored_sets(&self) -> Vec<serde_json::Value> {
        let dir = self.repository_dir().join("manifests/sets");
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .map(|e| {
                let envelope: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(e.path()).expect("read set manifest"))
                        .expect("set manifest JSON");
                envelope["body"].clone()
            })
            .collect()
    }

    /// `snapshot create --wait --json` in `mode`: the final event's snapshot.
    pub fn snapshot(&self, mode: &str) -> serde_json::Value {
        let out = self.cli_ok(&["snapshot", "create", "--wait", "--json", "--mode", mode]);
        last_snapshot(&out).unwrap_or_else(|| panic!("no final snapshot event in {out}"))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Restores `set` into fresh servers and a fresh directory; returns the restored heights
    /// (ledger, postgres, redis) and the restore's JSON events.
    pub fn restore_fresh(&self, set: &str) -> ((u64, u64, u64), Vec<serde_json::Value>) {
        self.restore_fresh_with(set, &[])
    }

    /// [`Stack::restore_fresh`] with more arguments to `restore` (the operator's key, say).
    pub fn restore_fresh_with(
        &self,
        set: &str,
        extra: &[&str],
    ) -> ((u64, u64, u64), Vec<serde_json::Value>) {
        let pg = Postgres::start();
        let redis = Redis::start();
        let ledger_dir = self.path(&format!("restored-{set}"));
        let targets = [
            format!("postgres={}", pg.url("postgres")),
            format!("redis=127.0.0.1:{}", redis.port),
            format!("ledger={}", ledger_dir.display()),
        ];
        let mut args = vec!["restore", set, "--json"];
        for target in &targets {
            args.extend(["--target", target.as_str()]);
        }
        args.extend_from_slice(extra);
        let out = self.cli_ok(&args);
        let events = out
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON event"))
            .collect();
        (restored_heights(&ledger_dir, &pg, &redis), events)
    }
}

/// The snapshot of the last event (JSON lines) that carries one.
pub fn last_snapshot(events: &str) -> Option<serde_json::Value> {
    events
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| !e["snapshot"].is_null())
        .map(|e| e["snapshot"].clone())
        .next_back()
}

/// Height of the restored components: (ledger, postgres, redis).
pub fn restored_heights(ledger_dir: &Path, pg: &Postgres, redis: &Redis) -> (u64, u64, u64) {
    let ledger = crate::chain::check_chain(&ledger_dir.join("chain/chain.db"))
        .expect("restored chain")
        .height;
    let postgres: u64 = pg
        .psql(MIRROR_DB, "SELECT max(height) FROM chain_blocks")
        .parse()
        .expect("restored PostgreSQL height");
    let head: serde_json::Value =
        serde_json::from_str(&redis.cli(&["GET", crate::mirror::REDIS_HEAD_KEY]))
            .expect("restored chain:head");
    let redis = head["height"].as_u64().expect("height");
    (ledger, postgres, redis)
}
