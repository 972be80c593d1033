//! What ships in `deploy/`: the alert rules pass their unit tests and match the PrometheusRule;
//! the binaries' metrics pass `promtool check metrics` and cover every dashboard query; every
//! kustomize overlay renders and validates against Kubernetes 1.31.

use std::collections::BTreeSet;

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use aitbc_backup_tests::fleet::http_get;
use aitbc_backup_tests::stack::Stack;
use aitbc_backup_tests::tool;

const KUBERNETES: &str = "1.31.0";

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn run(command: &mut Command) -> String {
    let out = command.output().expect("run tool");
    assert!(
        out.status.success(),
        "{command:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn yaml_docs(text: &str) -> Vec<serde_yaml::Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| serde_yaml::Value::deserialize(doc).expect("YAML document"))
        .filter(|doc: &serde_yaml::Value| !doc.is_null())
        .collect()
}

#[test]
fn alert_rules_pass_their_unit_tests_and_match_the_prometheus_rule() {
    let dir = deploy().join("prometheus");
    run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(dir.join("alerts.yaml")));
    run(Command::new("promtool")
        .args(["test", "rules"])
        .arg(dir.join("alerts_test.yaml")));

    let rules: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("alerts.yaml")).expect("alerts"))
            .expect("alerts YAML");
    let monitoring =
        std::fs::read_to_string(deploy().join("kubernetes/base/monitoring.yaml")).expect("read");
    let rule = yaml_docs(&monitoring)
        .into_iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .expect("a PrometheusRule");
    assert_eq!(
        rule["spec"]["groups"], rules["groups"],
        "PrometheusRule differs from alerts.yaml"
    );
    // The old scripts' alert keeps its exact expression.
    let exprs: Vec<&str> = rules["groups"][0]["rules"]
        .as_sequence()
        .expect("rules")
        .iter()
        .filter_map(|r| r["expr"].as_str())
        .collect();
    assert!(exprs.contains(&"backup_success == 0"));
}

/// Metric families of an OpenMetrics text: the names on `# TYPE` lines.
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// The metric names a PromQL expression reads (not functions, aggregations, labels, keywords,
/// strings or durations).
fn metric_names(expr: &str) -> BTreeSet<String> {
    // Drop label matchers, range selectors and strings.
    let mut text = String::new();
    let (mut quote, mut brace, mut bracket) = (false, false, false);
    for c in expr.chars() {
        match c {
            '"' => quote = !quote,
            '{' if !quote => brace = true,
            '}' if !quote => brace = false,
            '[' if !quote => bracket = true,
            ']' if !quote => bracket = false,
            _ if !(quote || brace || bracket) => text.push(c),
            _ => {}
        }
    }
    const KEYWORDS: &[&str] = &["by", "without", "on", "ignoring", "bool", "offset"];
    let mut names = BTreeSet::new();
    let mut rest = text.as_str();
    let mut grouping = false;
    while let Some(start) = rest.find(|c: char| c.is_ascii_alphabetic() || c == '_' || c == ')') {
        rest = &rest[start..];
        if let Some(after) = rest.strip_prefix(')') {
            grouping = false;
            rest = after;
            continue;
        }
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        let word = &rest[..end];
        rest = &rest[end..];
        let next = rest.trim_start();
        if KEYWORDS.contains(&word) {
            grouping = word == "by" || word == "without";
        } else if next.starts_with('(') || next.starts_with("by") || next.starts_with("without") {
            // A function or an aggregation.
        } else if !grouping {
            names.insert(word.to_owned());
        }
    }
    names
}

#[test]
fn metrics_pass_promtool_and_cover_every_dashboard_query() {
    aitbc_backup_tls::install_crypto_provider();
    // A set and a restore, so that every family has samples (empty ones are not exported).
    let stack = Stack::start(20, &[]);
    let set = stack.snapshot("coordinated");
    let redis = aitbc_backup_tests::redis::Redis::start();
    stack.cli_ok(&[
        "restore",
        set["id"].as_str().expect("id"),
        "--component",
        "redis",
        "--target",
        &format!("redis=127.0.0.1:{}", redis.port),
    ]);
    let (_, coordinator_metrics) =
        http_get(stack.coordinator.http_port, "/metrics").expect("metrics");
    let (_, agent_metrics) = stack.agents[0].http_get("/metrics").expect("agent metrics");
    // Each component's outcome, once.
    for component in ["postgres", "redis", "ledger"] {
        let line = format!("backup_success{{component=\"{component}\"}} 1");
        assert_eq!(
            coordinator_metrics.lines().filter(|l| *l == line).count(),
            1,
            "{coordinator_metrics}"
        );
    }
    for (who, text) in [
        ("coordinator", &coordinator_metrics),
        ("agent", &agent_metrics),
    ] {
        let mut promtool = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool");
        std::io::Write::write_all(&mut promtool.stdin.take().expect("stdin"), text.as_bytes())
            .expect("feed promtool");
        let out = promtool.wait_with_output().expect("promtool");
        assert!(
            out.status.success(),
            "promtool check metrics ({who}):\n{}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let exported = families(&coordinator_metrics);
    for name in [
        "backup_success",
        "backup_last_success_timestamp_seconds",
        "backup_duration_seconds",
        "backup_bytes_total",
        "snapshot_set_cut_skew_seconds",
        "snapshot_set_write_pause_seconds",
        "restore_duration_seconds",
        "repository_size_bytes",
        "repository_dedup_ratio",
        "repository_damaged_objects",
        "aitbc_backup_coordinator_agents_online",
        "aitbc_backup_coordinator_scheduler_skips_total",
    ] {
        assert!(
            exported.contains(name),
            "{name} is not exported:\n{coordinator_metrics}"
        );
    }

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy().join("grafana/dashboard.json")).expect("dashboard"),
    )
    .expect("dashboard JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8);
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for name in metric_names(expr) {
                let family = ["_bucket", "_count", "_sum", "_total"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .filter(|base| exported.contains(*base))
                    .unwrap_or(&name);
                assert!(
                    exported.contains(family),
                    "panel `{}` reads `{name}`, which the coordinator does not export",
                    panel["title"]
                );
            }
        }
    }
}

#[test]
fn metric_names_are_read_from_promql() {
    let names = metric_names(
        r#"histogram_quantile(0.95, sum by (component, le) (rate(backup_duration_seconds_bucket{x="y"}[1d])))"#,
    );
    assert_eq!(
        names,
        BTreeSet::from(["backup_duration_seconds_bucket".to_owned()])
    );
    let names = metric_names("time() - backup_last_success_timestamp_seconds > 26 * 3600");
    assert_eq!(
        names,
        BTreeSet::from(["backup_last_success_timestamp_seconds".to_owned()])
    );
}

/// Renders an overlay and validates every object; custom resources are listed as skipped.
fn render_and_validate(overlay: &str) -> Vec<serde_yaml::Value> {
    let kubectl = tool("venv/bin/kubectl");
    let rendered = run(Command::new(kubectl)
        .arg("kustomize")
        .arg(deploy().join("kubernetes/overlays").join(overlay)));
    let docs = yaml_docs(&rendered);
    let dir = aitbc_backup_tests::temp_dir("kustomize");
    let mut files = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        let api = doc["apiVersion"].as_str().unwrap_or_default();
        let kind = doc["kind"].as_str().unwrap_or_default();
        if api.starts_with("cert-manager.io/") || api.starts_with("monitoring.coreos.com/") {
            // kubernetes-validate knows only built-in kinds; these CRDs' schemas are not vendored.
            eprintln!(
                "{overlay}: skipped {kind} {} (custom resource: no schema shipped)",
                doc["metadata"]["name"].as_str().unwrap_or("")
            );
            continue;
        }
        let path = dir.path().join(format!("{i:02}-{kind}.yaml"));
        // JSON, which every YAML reader reads alike (no YAML 1.1 `yes` turning into true).
        std::fs::write(&path, serde_json::to_string(doc).expect("JSON")).expect("write");
        files.push(path);
    }
    let validate = tool("venv/bin/kubernetes-validate");
    run(Command::new(validate)
        .args(["--strict", "-k", KUBERNETES])
        .args(&files));
    docs
}

#[test]
fn every_overlay_renders_and_validates() {
    for overlay in ["dev", "prod"] {
        let docs = render_and_validate(overlay);
        let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        for kind in [
            "Deployment",
            "Service",
            "ServiceAccount",
            "Role",
            "RoleBinding",
            "ConfigMap",
            "PodDisruptionBudget",
            "NetworkPolicy",
            "Issuer",
            "Certificate",
            "PrometheusRule",
            "ServiceMonitor",
        ] {
            assert!(kinds.contains(kind), "{overlay} has no {kind}");
        }
        // Each platform workload got the agent as a native sidecar.
        for (kind, name) in [
            ("StatefulSet", "postgres"),
            ("Deployment", "redis"),
            ("StatefulSet", "blockchain-node"),
        ] {
            let workload = docs
                .iter()
                .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
                .unwrap_or_else(|| panic!("{overlay}: {kind} {name}"));
            let init = &workload["spec"]["template"]["spec"]["initContainers"][0];
            assert_eq!(init["name"], "aitbc-backup-agent", "{overlay}: {name}");
            assert_eq!(init["restartPolicy"], "Always", "{overlay}: {name}");
            assert_eq!(
                workload["spec"]["template"]["metadata"]["labels"]["aitbc-backup/agent"],
                "true"
            );
        }
    }
}

fn inject(component: &str, input: &str, extra: &[&str]) -> std::process::Output {
    let mut child = Command::new(aitbc_backup_tests::fleet::binary("aitbc-backup"))
        .args(["inject", "--component", component])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("aitbc-backup inject");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), input.as_bytes())
        .expect("feed");
    child.wait_with_output().expect("inject")
}

const MORE_KINDS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: one-off}
spec:
  containers: [{name: redis, image: "redis:7"}]
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: ds}
spec:
  selector: {matchLabels: {app: ds}}
  template:
    metadata: {labels: {app: ds}}
    spec:
      containers: [{name: redis, image: "redis:7"}]
---
apiVersion: batch/v1
kind: Job
metadata: {name: job}
spec:
  template:
    spec:
      restartPolicy: Never
      containers: [{name: redis, image: "redis:7"}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: cron}
spec:
  schedule: "0 2 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers: [{name: redis, image: "redis:7"}]
"#;

#[test]
fn inject_adds_the_same_sidecar_as_the_components_to_every_workload_kind() {
    let workloads =
        std::fs::read_to_string(deploy().join("kubernetes/example-platform/workloads.yaml"))
            .expect("workloads");
    let stream = format!("{workloads}\n---{MORE_KINDS}");
    let out = inject("redis", &stream, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let injected = String::from_utf8(out.stdout).expect("UTF-8");
    let docs = yaml_docs(&injected);
    assert_eq!(docs.len(), 7);
    // Every document validates, and every pod template has the sidecar exactly once.
    let dir = aitbc_backup_tests::temp_dir("inject");
    let mut files = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        let path = dir.path().join(format!("{i}.json"));
        std::fs::write(&path, serde_json::to_string(doc).expect("JSON")).expect("write");
        files.push(path);
        let template = match doc["kind"].as_str() {
            Some("Pod") => doc.clone(),
            Some("CronJob") => doc["spec"]["jobTemplate"]["spec"]["template"].clone(),
            _ => doc["spec"]["template"].clone(),
        };
        let sidecars = template["spec"]["initContainers"]
            .as_sequence()
            .expect("initContainers")
            .iter()
            .filter(|c| c["name"] == "aitbc-backup-agent")
            .count();
        assert_eq!(sidecars, 1, "{doc:?}");
    }
    run(Command::new(tool("venv/bin/kubernetes-validate"))
        .args(["--strict", "-k", KUBERNETES])
        .args(&files));
    // Twice is once.
    let again = inject("redis", &injected, &[]);
    assert_eq!(String::from_utf8_lossy(&again.stdout), injected);

    // The same sidecar as the kustomize components add.
    let rendered = render_and_validate("dev");
    for (component, kind, name) in [
        ("postgres", "StatefulSet", "postgres"),
        ("redis", "Deployment", "redis"),
        ("ledger", "StatefulSet", "blockchain-node"),
    ] {
        let source = yaml_docs(&workloads)
            .into_iter()
            .find(|d| d["metadata"]["name"] == name)
            .expect("workload");
        let out = inject(
            component,
            &serde_yaml::to_string(&source).expect("YAML"),
            &[],
        );
        assert!(out.status.success());
        let ours = yaml_docs(&String::from_utf8_lossy(&out.stdout)).remove(0);
        let theirs = rendered
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .expect("rendered workload");
        let sidecar =
            |d: &serde_yaml::Value| d["spec"]["template"]["spec"]["initContainers"][0].clone();
        assert_eq!(
            sidecar(&ours),
            sidecar(theirs),
            "{component}: inject and the component differ"
        );
    }
}

#[test]
fn inject_refuses_kinds_without_a_pod_template() {
    let out = inject(
        "postgres",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
        &[],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("document 1 is a `ConfigMap`, which has no pod template"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}
