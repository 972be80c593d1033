//! The fleet registry: every agent seen since start, with its liveness.
//!
//! Nothing here is durable: after a restart agents reconnect and re-register within their
//! backoff, which rebuilds the registry. An agent is `Online` while its session is open and its
//! last message is younger than `offline_after`; the session task closes a silent session at
//! that moment too, so the two views agree.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use aitbc_backup_proto::CoordinatorMessage;
use aitbc_backup_proto::model::{Component, Registration};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::{ComponentLabel, Metrics};

/// Liveness of an agent as the registry sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Online,
    Offline,
}

/// A snapshot of one agent's entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentView {
    pub name: String,
    pub component: Component,
    pub version: String,
    pub host: String,
    pub liveness: Liveness,
    pub last_seen: SystemTime,
    pub connected_since: SystemTime,
    pub session_id: String,
    pub peer_address: Option<SocketAddr>,
}

/// The sending half of a session's stream to its agent.
pub type Outbound = mpsc::Sender<Result<CoordinatorMessage, tonic::Status>>;

struct Entry {
    view: AgentView,
    /// Commands to the agent go here.
    outbound: Outbound,
    /// Cancels the current session (when it is replaced by a newer one).
    session_cancel: CancellationToken,
    open: bool,
}

/// What a session needs to know about its own registration.
pub struct SessionTicket {
    pub session_id: String,
    pub cancel: CancellationToken,
}

pub struct Fleet {
    entries: Mutex<HashMap<String, Entry>>,
    offline_after: Duration,
    metrics: Arc<Metrics>,
}

impl Fleet {
    pub fn new(offline_after: Duration, metrics: Arc<Metrics>) -> Self {
        Fleet {
            entries: Mutex::new(HashMap::new()),
            offline_after,
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the lock cannot leave an entry half-updated (every update is a
        // few field stores), so a poisoned lock is still usable.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a new session. A previous session of the same agent is cancelled: an agent has
    /// one session at a time, the newest.
    pub fn connect(
        &self,
        registration: Registration,
        peer_address: Option<SocketAddr>,
        parent: &CancellationToken,
        outbound: Outbound,
    ) -> SessionTicket {
        let now = SystemTime::now();
        let session_id = new_session_id();
        let cancel = parent.child_token();
        let view = AgentView {
            name: registration.name.clone(),
            component: registration.component,
            version: registration.version,
            host: registration.host,
            liveness: Liveness::Online,
            last_seen: now,
            connected_since: now,
            session_id: session_id.clone(),
            peer_address,
        };
        let mut entries = self.lock();
        let previous = entries.insert(
            registration.name,
            Entry {
                view,
                outbound,
                session_cancel: cancel.clone(),
                open: true,
            },
        );
        if let Some(previous) = previous
            && previous.open
        {
            previous.session_cancel.cancel();
            self.gauge(previous.view.component).dec();
        }
        self.gauge(registration.component).inc();
        self.metrics.sessions_opened.inc();
        SessionTicket { session_id, cancel }
    }

    /// Records a heartbeat of the given session; false if that session is no longer current.
    pub fn heartbeat(&self, name: &str, session_id: &str) -> bool {
        let mut entries = self.lock();
        match entries.get_mut(name) {
            Some(entry) if entry.view.session_id == session_id && entry.open => {
                entry.view.last_seen = SystemTime::now();
                true
            }
            _ => false,
        }
    }

    /// Marks the agent offline if `session_id` is still its current session.
    pub fn disconnect(&self, name: &str, session_id: &str) {
        let mut entries = self.lock();
        if let Some(entry) = entries.get_mut(name)
            && entry.view.session_id == session_id
            && entry.open
        {
            entry.open = false;
            self.gauge(entry.view.component).dec();
        }
    }

    /// The current session of an agent that is online: its id and where commands go.
    pub fn outbound(&self, name: &str) -> Option<(String, Outbound)> {
        let entries = self.lock();
        let entry = entries.get(name)?;
        (entry.open && !entry.outbound.is_closed())
            .then(|| (entry.view.session_id.clone(), entry.outbound.clone()))
    }

    /// Every agent that is online now, sorted by name.
    pub fn online(&self) -> Vec<AgentView> {
        let mut views = self.list();
        views.retain(|v| v.liveness == Liveness::Online);
        views
    }

    /// Every agent, sorted by name.
    pub fn list(&self) -> Vec<AgentView> {
        let now = SystemTime::now();
        let entries = self.lock();
        let mut views: Vec<AgentView> = entries.values().map(|e| self.view(e, now)).collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        views
    }

    pub fn get(&self, name: &str) -> Option<AgentView> {
        let now = SystemTime::now();
        self.lock().get(name).map(|e| self.view(e, now))
    }

    fn view(&self, entry: &Entry, now: SystemTime) -> AgentView {
        let silent = now
            .duration_since(entry.view.last_seen)
            .unwrap_or(Duration::ZERO);
        let liveness = if entry.open && silent <= self.offline_after {
            Liveness::Online
        } else {
            Liveness::Offline
        };
        AgentView {
            liveness,
            ..entry.view.clone()
        }
    }

    fn gauge(
        &self,
        component: Component,
    ) -> impl std::ops::Deref<Target = prometheus_client::metrics::gauge::Gauge> + '_ {
        self.metrics
            .agents_online
            .get_or_create(&ComponentLabel::of(component))
    }
}

/// 128 random bits, hex: unique across restarts without any state.
fn new_session_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    fn outbound() -> Outbound {
        mpsc::channel(1).0
    }

    fn registration(name: &str) -> Registration {
        Registration {
            name: name.into(),
            component: Component::Redis,
            version: "0.1.0".into(),
            host: "h".into(),
        }
    }

    #[test]
    fn a_new_session_replaces_the_old_one() {
        let metrics = Metrics::register(&mut Registry::default());
        let fleet = Fleet::new(Duration::from_secs(15), metrics.clone());
        let root = CancellationToken::new();
        let first = fleet.connect(registration("r1"), None, &root, outbound());
        let second = fleet.connect(registration("r1"), None, &root, outbound());
        assert!(first.cancel.is_cancelled());
        assert!(!second.cancel.is_cancelled());
        assert!(!fleet.heartbeat("r1", &first.session_id));
        assert!(fleet.heartbeat("r1", &second.session_id));

        // The old session ending does not take the new one offline.
        fleet.disconnect("r1", &first.session_id);
        assert_eq!(fleet.get("r1").map(|v| v.liveness), Some(Liveness::Online));
        let online = || {
            metrics
                .agents_online
                .get_or_create(&ComponentLabel::of(Component::Redis))
                .get()
        };
        assert_eq!(online(), 1);
        fleet.disconnect("r1", &second.session_id);
        assert_eq!(fleet.get("r1").map(|v| v.liveness), Some(Liveness::Offline));
        assert_eq!(online(), 0);
    }

    #[test]
    fn silence_means_offline() {
        let metrics = Metrics::register(&mut Registry::default());
        let fleet = Fleet::new(Duration::ZERO, metrics);
        fleet.connect(
            registration("r2"),
            None,
            &CancellationToken::new(),
            outbound(),
        );
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(fleet.list()[0].liveness, Liveness::Offline);
    }
}
