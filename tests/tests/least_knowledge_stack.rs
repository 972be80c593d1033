//! The whole platform on a sealed repository: the agents hold writer credentials, the
//! coordinator a metadata credential, and only the operator's key, handed over with the
//! request, restores or reads data.

use std::process::{Command, Output};

use aitbc_backup_tests::fleet::binary;
use aitbc_backup_tests::stack::Stack;

fn repo_cli(url: &str, args: &[&str], passphrase: Option<&str>) -> Output {
    let mut command = Command::new(binary("aitbc-backup"));
    command.args(["repo", "--repository", url]).args(args);
    command.env_remove("AITBC_CLI_PASSPHRASE");
    if let Some(p) = passphrase {
        command.env("AITBC_CLI_PASSPHRASE", p);
    }
    command.output().expect("aitbc-backup repo")
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

const OPERATOR: &str = "the operator's passphrase";
const CREDENTIAL: &str = "AITBC_BACKUP_REPOSITORY__CREDENTIAL";

#[test]
fn a_sealed_platform_restores_with_the_operators_key_only() {
    let dir = aitbc_backup_tests::temp_dir("sealed");
    let url = format!("file://{}", dir.path().join("repo").display());
    ok(
        repo_cli(&url, &["init", "--encrypt"], Some(OPERATOR)),
        "init",
    );
    let issue = |args: &[&str]| {
        let mut all = vec!["keys", "issue"];
        all.extend_from_slice(args);
        ok(repo_cli(&url, &all, Some(OPERATOR)), "issue")
            .trim()
            .to_owned()
    };
    let coordinator = issue(&["--metadata"]);
    let writers: Vec<(&str, String)> = ["postgres", "redis", "ledger"]
        .into_iter()
        .map(|c| (c, issue(&["--writer", c])))
        .collect();
    // Issuing needs the operator's key.
    let refused = repo_cli(&url, &["keys", "issue", "--metadata"], None);
    assert!(!refused.status.success());

    // A policy that asks for restore tests, which the coordinator cannot run without a key.
    let policies = r#"[{name = "tested", schedule = "*/3 * * * * *", components = ["redis"],
                          verify = "restore"}]"#;
    let mut stack = Stack::start_on_with(
        &url,
        &[
            (CREDENTIAL, &coordinator),
            ("AITBC_BACKUP_SCHEDULE__ENABLED", "true"),
            ("AITBC_BACKUP_POLICIES", policies),
        ],
        &[],
        20,
    );
    for (component, credential) in &writers {
        stack.start_agent(component, &[(CREDENTIAL, credential.as_str())]);
    }
    stack.wait_agents_online();
    let set = stack.snapshot("fenced");
    assert_eq!(set["state"], "committed", "{set:#}");
    let id = set["id"].as_str().expect("id").to_owned();

    // Without the operator's key: no data check, no restore, and the error says why.
    let verify = stack.cli(&["verify", &id, "--read-data"]);
    assert!(!verify.status.success());
    let message = String::from_utf8_lossy(&verify.stderr).to_string();
    assert!(message.contains("operator's key"), "{message}");
    let structure = stack.cli_ok(&["verify", &id]);
    assert!(!structure.contains("FAILED"), "{structure}");
    let restore = stack.cli(&["restore", &id, "--trial"]);
    assert!(!restore.status.success());
    let message = String::from_utf8_lossy(&restore.stdout).to_string()
        + &String::from_utf8_lossy(&restore.stderr);
    assert!(message.contains("operator's key"), "{message}");

    // With it, handed over with the request: a data check and an ordered restore into fresh
    // servers at the set's cut.
    let key_file = dir.path().join("operator.pass");
    std::fs::write(&key_file, OPERATOR).expect("write");
    let key = key_file.display().to_string();
    stack.cli_ok(&["verify", &id, "--read-data", "--passphrase-file", &key]);
    let ((ledger, postgres, redis), events) =
        stack.restore_fresh_with(&id, &["--passphrase-file", &key]);
    let order: Vec<&str> = events
        .iter()
        .filter(|e| e["phase"] == "verified")
        .filter_map(|e| e["component"].as_str())
        .collect();
    assert_eq!(order, ["postgres", "redis", "ledger"]);
    assert!(
        ledger >= postgres && postgres >= redis && ledger >= 5,
        "{ledger} {postgres} {redis}"
    );
    // The scheduled restore tests ran as structure checks, counted and logged as such.
    let structure_only =
        r#"aitbc_backup_coordinator_verifications_total{policy="tested",outcome="structure_only"}"#;
    assert!(
        aitbc_backup_tests::wait_until(std::time::Duration::from_secs(30), || {
            let (_, body) =
                aitbc_backup_tests::fleet::http_get(stack.coordinator.http_port, "/metrics")
                    .unwrap_or_default();
            body.lines().any(|l| l.starts_with(structure_only))
        }),
        "{}",
        stack.coordinator.log()
    );
    assert!(stack.coordinator.log().contains("holds no operator key"));
    // The passphrase is nowhere in the daemons' logs.
    for log in [stack.coordinator.log()]
        .into_iter()
        .chain(stack.agents.iter().map(|a| a.log()))
    {
        assert!(!log.contains(OPERATOR), "the key was logged");
    }
}
