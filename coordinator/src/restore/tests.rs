use aitbc_backup_proto::model::{Reply, Step};

use super::*;
use crate::catalog::ComponentRecord;
use crate::testing;

const SET: &str = "20300101T000000000Z-00000001";

/// A committed set of PostgreSQL (`pg-0`) and the ledger (`ledger-0`).
fn committed(sets: &Sets) {
    let component = |agent: &str, component| ComponentRecord {
        agent: agent.to_owned(),
        component,
        manifest_id: format!("manifest-of-{agent}"),
        consistency: None,
        bytes_read: 0,
        bytes_stored: 0,
    };
    sets.catalog.put(SetRecord {
        id: SET.to_owned(),
        policy: "default".to_owned(),
        created: "2030-01-01T00:00:00.000Z".to_owned(),
        mode: Default::default(),
        state: SetState::Committed,
        // Out of order: the restore order is the configuration's.
        components: vec![
            component("ledger-0", Component::Ledger),
            component("pg-0", Component::Postgres),
        ],
        cut_skew_ms: 0.0,
        write_pause_ms: 0.0,
        pinned: false,
        abort_reason: String::new(),
    });
}

#[tokio::test]
async fn a_trial_restore_finds_an_agents_failure_by_type() {
    let sets = testing::sets();
    committed(&sets);
    let mut pg = testing::agent(&sets, "pg-0", Component::Postgres, |_| {
        Reply::Done(Done::Restored {
            report_json: "{}".to_owned(),
        })
    });
    let mut ledger = testing::agent(&sets, "ledger-0", Component::Ledger, |_| {
        Reply::Failed("height 41 does not match the manifest's 42".to_owned())
    });

    let failures = sets.trial_restore(SET, None).await.expect("started");
    assert_eq!(
        failures,
        [TrialFailure {
            component: Component::Ledger,
            error: RestoreFailure::Agent(CallError::Failed {
                agent: "ledger-0".to_owned(),
                step: Step::Restore,
                message: "height 41 does not match the manifest's 42".to_owned(),
            }),
        }]
    );
    assert_eq!(
        failures[0].to_string(),
        "ledger: agent `ledger-0` failed restore: height 41 does not match the manifest's 42"
    );
    // PostgreSQL went first, into scratch targets, from its own manifest.
    for (commands, manifest) in [
        (&mut pg, "manifest-of-pg-0"),
        (&mut ledger, "manifest-of-ledger-0"),
    ] {
        let command = commands.try_recv().expect("one command");
        assert_eq!(
            command.order,
            Order::Restore(RestoreOrder {
                manifest_id: manifest.to_owned(),
                target: RestoreTarget::Trial,
                force: false,
                key: None,
            })
        );
    }
}

#[tokio::test]
async fn a_restore_stops_at_a_component_without_an_agent() {
    let sets = testing::sets();
    committed(&sets);
    let mut ledger = testing::agent(&sets, "ledger-0", Component::Ledger, |_| {
        Reply::Done(Done::Restored {
            report_json: String::new(),
        })
    });
    let mut events = sets
        .restore(RestoreRequest {
            set_id: SET.to_owned(),
            components: Vec::new(),
            targets: HashMap::new(),
            force: false,
            trial: false,
            key: None,
        })
        .expect("started");
    let mut seen = Vec::new();
    while let Some(event) = events.recv().await {
        seen.push(event);
    }
    assert!(
        matches!(
            seen.as_slice(),
            [RestoreEvent::Failed {
                component: Component::Postgres,
                agent: None,
                error: RestoreFailure::NoAgent(Component::Postgres),
                ..
            }]
        ),
        "{seen:?}"
    );
    assert!(ledger.try_recv().is_err(), "the ledger was not touched");
}

#[tokio::test]
async fn a_restore_is_refused_for_a_set_that_is_not_committed() {
    let sets = testing::sets();
    let request = |set_id: &str| RestoreRequest {
        set_id: set_id.to_owned(),
        components: vec![Component::Redis],
        targets: HashMap::new(),
        force: false,
        trial: false,
        key: None,
    };
    assert!(matches!(
        sets.restore(request("nope")),
        Err(RestoreError::NotFound(_))
    ));
    committed(&sets);
    assert!(matches!(
        sets.restore(request(SET)),
        Err(RestoreError::NoComponent {
            component: Component::Redis,
            ..
        })
    ));
}
