//! Overlapping sets: a set that shares an agent with a set asked for earlier waits until that
//! one has ended (committed or aborted), then runs; sets on disjoint agents run together. Two
//! sets on one agent would compete for its component (Redis defers one of two full syncs,
//! PostgreSQL and the ledger would read twice at once), and neither the operator nor the
//! schedule gains from that: the later set is queued, in arrival order, and says behind which.

use std::sync::Mutex;

use tokio::sync::Notify;

/// The sets not ended yet, oldest first, each with its agents.
#[derive(Default)]
pub struct Queue {
    sets: Mutex<Vec<(String, Vec<String>)>>,
    changed: Notify,
}

impl Queue {
    /// Enters a set; returns the earlier sets it waits for (empty: it may run now).
    pub fn join(&self, id: &str, agents: Vec<String>) -> Vec<String> {
        let mut sets = self.lock();
        sets.push((id.to_owned(), agents));
        Self::ahead_of(&sets, id)
    }

    /// The earlier sets `id` waits for now.
    pub fn ahead(&self, id: &str) -> Vec<String> {
        Self::ahead_of(&self.lock(), id)
    }

    /// Waits until no earlier set shares an agent with `id`.
    pub async fn wait_turn(&self, id: &str) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if Self::ahead_of(&self.lock(), id).is_empty() {
                return;
            }
            changed.await;
        }
    }

    /// The set has ended: the sets behind it may go.
    pub fn leave(&self, id: &str) {
        self.lock().retain(|(set, _)| set != id);
        self.changed.notify_waiters();
    }

    fn ahead_of(sets: &[(String, Vec<String>)], id: &str) -> Vec<String> {
        let Some(position) = sets.iter().position(|(set, _)| set == id) else {
            return Vec::new();
        };
        let agents = &sets[position].1;
        sets[..position]
            .iter()
            .filter(|(_, theirs)| theirs.iter().any(|a| agents.contains(a)))
            .map(|(set, _)| set.clone())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, Vec<String>)>> {
        // The lock guards a list no code can leave half-changed.
        self.sets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// What an operator reads about a queued set.
pub fn waiting_message(ahead: &[String]) -> String {
    let sets: Vec<String> = ahead.iter().map(|s| format!("`{s}`")).collect();
    format!(
        "queued: waits for snapshot set {} to end (it uses the same agents)",
        sets.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agents(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[tokio::test]
    async fn a_set_waits_only_for_earlier_sets_sharing_an_agent() {
        let queue = Queue::default();
        assert!(queue.join("a", agents(&["pg", "redis"])).is_empty());
        assert!(queue.join("b", agents(&["ledger"])).is_empty());
        assert_eq!(queue.join("c", agents(&["redis"])), ["a"]);
        assert_eq!(
            queue.join("d", agents(&["redis", "ledger"])),
            ["a", "b", "c"]
        );
        // In order: d never overtakes c.
        queue.leave("a");
        queue.wait_turn("c").await;
        queue.leave("b");
        let d = queue.wait_turn("d");
        tokio::pin!(d);
        assert!(
            futures::poll!(d.as_mut()).is_pending(),
            "d went before c ended"
        );
        queue.leave("c");
        d.await;
        queue.leave("d");
        assert!(queue.lock().is_empty());
    }
}
