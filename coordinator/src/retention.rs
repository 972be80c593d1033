//! Retention: which of a policy's sets go. A committed set is kept when any rule keeps it —
//! younger than `days`, among the newest `keep_last`, the newest of one of the last
//! `keep_daily` days / `keep_weekly` ISO weeks / `keep_monthly` months that have sets — and the
//! newest committed set and pinned sets are always kept. Deleting goes set manifest first (the
//! set is gone from that instant), then its component manifests; the data goes at GC.
//! Aborted sets' records expire by the same age rule (or, without one, once a newer set of
//! the policy committed).

use std::collections::BTreeSet;

use chrono::{DateTime, Datelike, Utc};

use crate::catalog::{SetRecord, SetState};
use crate::config::PolicyRetention;

/// The rules with the policy's `days` resolved.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub days: u32,
    pub keep_last: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
}

impl Rules {
    pub fn of(policy: &PolicyRetention, default_days: u32) -> Rules {
        Rules {
            days: policy.days.unwrap_or(default_days),
            keep_last: policy.keep_last,
            keep_daily: policy.keep_daily,
            keep_weekly: policy.keep_weekly,
            keep_monthly: policy.keep_monthly,
        }
    }
}

fn created(record: &SetRecord) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(&record.created)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The calendar bucket (year, day / ISO week / month) of an instant.
type BucketOf = fn(DateTime<Utc>) -> (i32, u32);

/// Ids of the sets (all of one policy) that retention removes at `now`.
pub fn expired(sets: &[SetRecord], rules: Rules, now: DateTime<Utc>) -> Vec<String> {
    let mut committed: Vec<(&SetRecord, DateTime<Utc>)> = sets
        .iter()
        .filter(|s| s.state == SetState::Committed)
        .filter_map(|s| created(s).map(|t| (s, t)))
        .collect();
    // Newest first.
    committed.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.id.cmp(&a.0.id)));
    let young =
        |t: DateTime<Utc>| rules.days > 0 && now - t < chrono::Duration::days(rules.days.into());

    let mut keep: BTreeSet<&str> = BTreeSet::new();
    if let Some((newest, _)) = committed.first() {
        keep.insert(&newest.id);
    }
    for (set, t) in &committed {
        if set.pinned || young(*t) {
            keep.insert(&set.id);
        }
    }
    for (set, _) in committed.iter().take(rules.keep_last as usize) {
        keep.insert(&set.id);
    }
    let buckets: [(u32, BucketOf); 3] = [
        (rules.keep_daily, |t| (t.year(), t.ordinal())),
        (rules.keep_weekly, |t| {
            let w = t.iso_week();
            (w.year(), w.week())
        }),
        (rules.keep_monthly, |t| (t.year(), t.month())),
    ];
    for (count, bucket_of) in buckets {
        let mut seen = BTreeSet::new();
        for (set, t) in &committed {
            if seen.len() as u32 >= count {
                break;
            }
            // Newest first, so the first set of a bucket is its newest.
            if seen.insert(bucket_of(*t)) {
                keep.insert(&set.id);
            }
        }
    }

    let newest_commit = committed.first().map(|(_, t)| *t);
    let mut out: Vec<String> = committed
        .iter()
        .filter(|(s, _)| !keep.contains(s.id.as_str()))
        .map(|(s, _)| s.id.clone())
        .collect();
    for set in sets.iter().filter(|s| s.state == SetState::Aborted) {
        let Some(t) = created(set) else { continue };
        let expired = if rules.days > 0 {
            !young(t)
        } else {
            newest_commit.is_some_and(|newest| newest > t)
        };
        if expired {
            out.push(set.id.clone());
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use aitbc_backup_proto::model::Mode;

    fn set(id: &str, created: &str, state: SetState, pinned: bool) -> SetRecord {
        SetRecord {
            id: id.into(),
            policy: "p".into(),
            created: created.into(),
            mode: Mode::Coordinated,
            state,
            components: Vec::new(),
            cut_skew_ms: 0.0,
            write_pause_ms: 0.0,
            pinned,
            abort_reason: String::new(),
        }
    }

    fn rules(days: u32, last: u32, daily: u32, weekly: u32, monthly: u32) -> Rules {
        Rules {
            days,
            keep_last: last,
            keep_daily: daily,
            keep_weekly: weekly,
            keep_monthly: monthly,
        }
    }

    fn now() -> DateTime<Utc> {
        "2026-11-26T12:00:00Z".parse().expect("time")
    }

    /// One committed set a day at 02:00 for `days` days back from 2026-11-26.
    fn daily_sets(days: i64) -> Vec<SetRecord> {
        (0..days)
            .map(|d| {
                let t = now() - chrono::Duration::days(d) - chrono::Duration::hours(10);
                set(
                    &format!("s{d:03}"),
                    &t.to_rfc3339(),
                    SetState::Committed,
                    false,
                )
            })
            .collect()
    }

    #[test]
    fn the_old_scripts_rule_keeps_thirty_days() {
        let sets = daily_sets(40);
        let gone = expired(&sets, rules(30, 0, 0, 0, 0), now());
        // Sets 0..=29 are younger than 30 days (the 30th is 30 d 10 h old).
        assert_eq!(gone.len(), 10);
        assert!(gone.iter().all(|id| id.as_str() >= "s030"));
    }

    #[test]
    fn keep_last_daily_weekly_monthly_union() {
        let sets = daily_sets(100);
        let gone = expired(&sets, rules(0, 3, 7, 4, 3), now());
        let kept: Vec<&str> = sets
            .iter()
            .map(|s| s.id.as_str())
            .filter(|id| !gone.iter().any(|g| g == id))
            .collect();
        // 2026-11-26 is a Thursday. 7 days: s000..s006 (Nov 26..20), covering the last 3.
        // 4 ISO weeks: the newest of Nov 23-29 (s000), 16-22 (Sunday Nov 22, s004), 9-15
        // (s011), 2-8 (s018). 3 months: Nov (s000), Oct 31 (s026), Sep 30 (s057).
        let expected = [
            "s000", "s001", "s002", "s003", "s004", "s005", "s006", "s011", "s018", "s026", "s057",
        ];
        assert_eq!(kept, expected);
    }

    #[test]
    fn newest_and_pinned_always_survive() {
        let mut sets = daily_sets(5);
        sets[4].pinned = true;
        let gone = expired(&sets, rules(0, 0, 0, 0, 0), now());
        assert_eq!(gone, ["s001", "s002", "s003"]);
    }

    #[test]
    fn aborted_records_expire() {
        let mut sets = daily_sets(3);
        let t = (now() - chrono::Duration::days(2)).to_rfc3339();
        sets.push(set("a1", &t, SetState::Aborted, false));
        assert!(expired(&sets, rules(0, 5, 0, 0, 0), now()).contains(&"a1".to_owned()));
        assert!(!expired(&sets, rules(30, 0, 0, 0, 0), now()).contains(&"a1".to_owned()));
    }
}
