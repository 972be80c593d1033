use super::*;

fn command(order: Order) -> Command {
    Command {
        id: "set-1-cut-0000abcd".into(),
        set_id: "set-1".into(),
        order,
    }
}

#[test]
fn every_order_round_trips_through_the_wire() {
    let orders = [
        Order::Prepare,
        Order::Fence,
        Order::Cut {
            release: true,
            at_unix_micros: Some(1_700_000_000_000_000),
        },
        Order::Cut {
            release: false,
            at_unix_micros: None,
        },
        Order::Upload {
            name: Some("nightly".into()),
            full_scan: true,
        },
        Order::Upload {
            name: None,
            full_scan: false,
        },
        Order::Abort {
            reason: "agent `ledger` failed upload: disk full".into(),
        },
        Order::Restore(RestoreOrder {
            manifest_id: "m-1".into(),
            target: RestoreTarget::Live {
                dir: Some("/restore".into()),
                url: None,
            },
            force: true,
            key: Some(crate::model::RepoKey::Passphrase("correct horse".into())),
        }),
        Order::Restore(RestoreOrder {
            manifest_id: "m-1".into(),
            target: RestoreTarget::Trial,
            force: false,
            key: Some(crate::model::RepoKey::KeyFile(vec![7; 32])),
        }),
    ];
    for order in orders {
        let step = order.step();
        let wire = crate::Command::from(command(order.clone()));
        assert_eq!(wire.action.as_ref().map(Action::step), Some(step));
        assert_eq!(Command::try_from(wire), Ok(command(order)));
    }
}

#[test]
fn invalid_commands_are_refused_naming_the_field() {
    let good = crate::Command::from(command(Order::Prepare));
    let field = |msg: crate::Command| Command::try_from(msg).expect_err("invalid").field;
    assert_eq!(
        field(crate::Command {
            command_id: String::new(),
            ..good.clone()
        }),
        "command.command_id"
    );
    assert_eq!(
        field(crate::Command {
            set_id: String::new(),
            ..good.clone()
        }),
        "command.set_id"
    );
    assert_eq!(
        field(crate::Command {
            action: None,
            ..good.clone()
        }),
        "command.action"
    );
    assert_eq!(
        field(crate::Command {
            action: Some(Action::Cut(crate::Cut {
                release: false,
                at_unix_micros: -5,
            })),
            ..good.clone()
        }),
        "command.cut.at_unix_micros"
    );
    assert_eq!(
        field(crate::Command {
            action: Some(Action::Restore(crate::Restore::default())),
            ..good
        }),
        "command.restore.manifest_id"
    );
}

#[test]
fn a_trial_restore_ignores_its_targets() {
    let wire = crate::Command {
        command_id: "c".into(),
        set_id: "s".into(),
        action: Some(Action::Restore(crate::Restore {
            manifest_id: "m".into(),
            target_dir: "/somewhere".into(),
            target_url: "postgres://elsewhere".into(),
            force: false,
            trial: true,
            key: None,
        })),
    };
    let order = Command::try_from(wire).expect("valid").order;
    assert!(matches!(
        order,
        Order::Restore(RestoreOrder {
            target: RestoreTarget::Trial,
            ..
        })
    ));
}

#[test]
fn every_reply_round_trips_through_the_wire() {
    let replies = [
        Reply::Done(Done::Prepared),
        Reply::Done(Done::Fenced {
            at_unix_micros: Some(10),
        }),
        Reply::Done(Done::Cut {
            at_unix_micros: Some(20),
            released: Some(Released {
                at_unix_micros: 25,
                pause_micros: 5,
            }),
        }),
        Reply::Done(Done::Cut {
            at_unix_micros: Some(20),
            released: None,
        }),
        Reply::Done(Done::Uploaded(Uploaded {
            manifest_id: "m-2".into(),
            report_json: "{}".into(),
            bytes_read: 7,
            bytes_stored: 3,
        })),
        Reply::Done(Done::Aborted),
        Reply::Done(Done::Restored {
            report_json: "{\"rows\":1}".into(),
        }),
    ];
    for reply in replies {
        let Reply::Done(done) = &reply else {
            unreachable!()
        };
        let step = done.step();
        let wire = reply.clone().into_proto("c".into());
        assert_eq!(wire.command_id, "c");
        assert_eq!(Reply::from_proto(step, wire), Ok(reply));
    }
    for step in Step::ALL {
        let failed = Reply::Failed("no space left".into()).into_proto("c".into());
        assert_eq!(
            Reply::from_proto(step, failed),
            Ok(Reply::Failed("no space left".into()))
        );
    }
}

#[test]
fn invalid_results_are_refused_naming_the_field() {
    let ok = crate::CommandResult::default();
    let err = Reply::from_proto(Step::Upload, ok.clone()).expect_err("no manifest");
    assert_eq!(err.field, "result.manifest_id");
    let err = Reply::from_proto(
        Step::Cut,
        crate::CommandResult {
            at_unix_micros: -1,
            ..ok.clone()
        },
    )
    .expect_err("negative instant");
    assert_eq!(err.field, "result.at_unix_micros");
    let err = Reply::from_proto(
        Step::Cut,
        crate::CommandResult {
            released_at_unix_micros: -1,
            ..ok.clone()
        },
    )
    .expect_err("negative release");
    assert_eq!(err.field, "result.released_at_unix_micros");
    // A step reads only its own fields: a stray manifest id on a cut is no cut result.
    assert_eq!(
        Reply::from_proto(
            Step::Cut,
            crate::CommandResult {
                manifest_id: "stray".into(),
                ..ok
            }
        ),
        Ok(Reply::Done(Done::Cut {
            at_unix_micros: None,
            released: None
        }))
    );
}

#[test]
fn a_restore_key_travels_but_never_prints() {
    let order = Order::Restore(RestoreOrder {
        manifest_id: "m".into(),
        target: RestoreTarget::Trial,
        force: false,
        key: Some(crate::model::RepoKey::Passphrase("correct horse".into())),
    });
    let wire = crate::Command::from(Command {
        id: "c".into(),
        set_id: "s".into(),
        order: order.clone(),
    });
    assert!(!format!("{wire:?}").contains("correct horse"), "{wire:?}");
    assert!(!format!("{order:?}").contains("correct horse"));
    assert_eq!(Command::try_from(wire).expect("valid").order, order);
    // A key field present but empty is refused by name.
    let empty = crate::Command {
        command_id: "c".into(),
        set_id: "s".into(),
        action: Some(Action::Restore(crate::Restore {
            manifest_id: "m".into(),
            key: Some(crate::RepositoryKey { secret: None }),
            ..Default::default()
        })),
    };
    let err = Command::try_from(empty).expect_err("empty key");
    assert!(err.to_string().contains("command.restore.key"), "{err}");
}
