//! `aitbc-backup inject --component C < manifests.yaml > out.yaml`: adds the agent as a native
//! sidecar (an init container with `restartPolicy: Always`, Kubernetes >= 1.29) to every pod
//! template of a YAML stream — Pod, Deployment, StatefulSet, DaemonSet, Job, CronJob — with its
//! certificate and scratch volumes, environment and probes, and the `aitbc-backup/agent` label
//! the coordinator's NetworkPolicy admits. Running it twice gives the same output as once. The
//! sidecar is the one `deploy/kubernetes/components/agent-*` add (a test keeps them equal).

use crate::output::out;

use std::io::Read;

use aitbc_backup_proto::model::Component;
use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::json;
use serde_yaml::{Mapping, Value};

pub const CONTAINER: &str = "aitbc-backup-agent";
const TLS_VOLUME: &str = "aitbc-backup-tls";
const SCRATCH_VOLUME: &str = "aitbc-backup-scratch";
const AGENT_LABEL: &str = "aitbc-backup/agent";

#[derive(clap::Args, Debug, Clone)]
pub struct InjectArgs {
    /// What the pods run: postgres, redis or ledger.
    #[arg(long)]
    component: Component,
    /// The agent's name (its certificate's); the TLS secret is `aitbc-backup-agent-<name>-tls`.
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value = "https://aitbc-backup-coordinator:7443")]
    coordinator: String,
    #[arg(long, default_value = concat!("ghcr.io/aitbc/aitbc-backup:", env!("CARGO_PKG_VERSION")))]
    image: String,
    /// The repository (`s3://` alone: the old scripts' bucket `<prefix>-<namespace>`).
    #[arg(long, default_value = "s3://")]
    repository: String,
    /// Ledger: the pod's volume holding the node's data directory.
    #[arg(long, default_value = "data")]
    data_volume: String,
    /// Ledger: where the sidecar mounts it (the agent's ledger.data_dir).
    #[arg(long, default_value = "/data")]
    data_path: String,
    /// Copy documents without a pod template (Services, ConfigMaps, ...) through unchanged
    /// instead of refusing them.
    #[arg(long)]
    pass_through: bool,
}

/// Reads the manifests from stdin and prints them with the sidecar.
pub fn run(args: &InjectArgs) -> anyhow::Result<()> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .context("read manifests from stdin")?;
    out!("{}", inject(&input, args)?)?;
    Ok(())
}

/// Adds the sidecar to every pod template of a YAML stream.
pub fn inject(input: &str, args: &InjectArgs) -> anyhow::Result<String> {
    let mut out = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(input).enumerate() {
        let mut doc = Value::deserialize(document)
            .with_context(|| format!("document {}: not valid YAML", index + 1))?;
        if doc.is_null() {
            continue;
        }
        let kind = doc["kind"].as_str().unwrap_or("").to_owned();
        match pod_template(&mut doc, &kind) {
            Some(template) => add_sidecar(template, args)?,
            None if args.pass_through => {}
            None => bail!(
                "document {} is a `{}`, which has no pod template: inject works on Pod, Deployment, \
                 StatefulSet, DaemonSet, Job and CronJob (--pass-through copies other kinds unchanged)",
                index + 1,
                if kind.is_empty() {
                    "document without a kind"
                } else {
                    &kind
                }
            ),
        }
        out.push(serde_yaml::to_string(&doc)?);
    }
    if out.is_empty() {
        bail!("no manifests on stdin");
    }
    Ok(out.join("---\n"))
}

/// The object whose `metadata` and `spec` make the pods: the Pod itself or a workload's template.
fn pod_template<'a>(doc: &'a mut Value, kind: &str) -> Option<&'a mut Value> {
    let path: &[&str] = match kind {
        "Pod" => &[],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        _ => return None,
    };
    let mut node = doc;
    for key in path {
        node = node.as_mapping_mut()?.get_mut(*key)?;
    }
    node.is_mapping().then_some(node)
}

fn add_sidecar(template: &mut Value, args: &InjectArgs) -> anyhow::Result<()> {
    let labels = entry(entry(template, "metadata")?, "labels")?;
    labels
        .as_mapping_mut()
        .context("metadata.labels is not a mapping")?
        .insert(AGENT_LABEL.into(), "true".into());
    let spec = entry(template, "spec")?;
    upsert_named(entry(spec, "initContainers")?, sidecar(args)?)?;
    for volume in volumes(args)? {
        upsert_named(entry(spec, "volumes")?, volume)?;
    }
    Ok(())
}

/// `parent[key]`, created (a mapping, or a sequence for the lists) when missing.
fn entry<'a>(parent: &'a mut Value, key: &str) -> anyhow::Result<&'a mut Value> {
    let map = parent
        .as_mapping_mut()
        .with_context(|| format!("the parent of `{key}` is not a mapping"))?;
    let empty = if matches!(key, "initContainers" | "volumes") {
        Value::Sequence(Vec::new())
    } else {
        Value::Mapping(Mapping::new())
    };
    let value = map.entry(key.into()).or_insert(empty);
    if value.is_null() {
        *value = Value::Mapping(Mapping::new());
    }
    Ok(value)
}

/// Replaces the list item with the same `name`, or appends: injecting twice equals once.
fn upsert_named(list: &mut Value, item: Value) -> anyhow::Result<()> {
    let list = list.as_sequence_mut().context("expected a list")?;
    match list.iter_mut().find(|v| v["name"] == item["name"]) {
        Some(existing) => *existing = item,
        None => list.push(item),
    }
    Ok(())
}

fn yaml(value: serde_json::Value) -> anyhow::Result<Value> {
    Ok(serde_yaml::to_value(value)?)
}

fn agent_name(args: &InjectArgs) -> String {
    args.name
        .clone()
        .unwrap_or_else(|| args.component.as_str().to_owned())
}

fn volumes(args: &InjectArgs) -> anyhow::Result<Vec<Value>> {
    Ok(vec![
        yaml(json!({"name": TLS_VOLUME,
                    "secret": {"secretName": format!("aitbc-backup-agent-{}-tls", agent_name(args))}}))?,
        yaml(json!({"name": SCRATCH_VOLUME, "emptyDir": {}}))?,
    ])
}

fn sidecar(args: &InjectArgs) -> anyhow::Result<Value> {
    let mut env = vec![
        json!({"name": "AITBC_BACKUP_COMPONENT", "value": args.component.as_str()}),
        json!({"name": "AITBC_BACKUP_COORDINATOR__URL", "value": args.coordinator}),
        json!({"name": "AITBC_BACKUP_REPOSITORY__URL", "value": args.repository}),
        json!({"name": "AITBC_BACKUP_REPOSITORY__NAMESPACE",
               "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}),
        // The component's writer credential (`repo keys issue --writer`): it writes this
        // component's backups and reads none.
        json!({"name": "AITBC_BACKUP_REPOSITORY__CREDENTIAL",
               "valueFrom": {"secretKeyRef": {"name": "aitbc-backup-repository",
                                              "key": format!("{}-credential", args.component.as_str()),
                                              "optional": true}}}),
        json!({"name": "AITBC_BACKUP_LOG__FORMAT", "value": "json"}),
    ];
    let mut mounts = vec![
        json!({"name": TLS_VOLUME, "mountPath": "/etc/aitbc-backup/tls", "readOnly": true}),
        json!({"name": SCRATCH_VOLUME, "mountPath": "/scratch"}),
    ];
    let password = |secret: &str, var: &str| {
        json!({"name": var,
               "valueFrom": {"secretKeyRef": {"name": secret, "key": "password", "optional": true}}})
    };
    match args.component {
        Component::Postgres => env.extend([
            json!({"name": "AITBC_BACKUP_POSTGRES__URL",
                   "value": "postgres://postgres@127.0.0.1:5432/postgres"}),
            password("postgres", "AITBC_BACKUP_POSTGRES__PASSWORD"),
            json!({"name": "AITBC_BACKUP_POSTGRES__SCRATCH_DIR", "value": "/scratch"}),
            json!({"name": "AITBC_BACKUP_POSTGRES__WAL__ARCHIVE", "value": "true"}),
        ]),
        Component::Redis => env.extend([
            json!({"name": "AITBC_BACKUP_REDIS__ADDRESS", "value": "127.0.0.1:6379"}),
            password("redis", "AITBC_BACKUP_REDIS__PASSWORD"),
            // The restore journal outlives the container (a restart gives Redis back).
            json!({"name": "AITBC_BACKUP_REDIS__STATE_DIR", "value": "/scratch/redis"}),
        ]),
        Component::Ledger => {
            env.extend([
                json!({"name": "AITBC_BACKUP_LEDGER__DATA_DIR", "value": args.data_path}),
                json!({"name": "AITBC_BACKUP_LEDGER__SCRATCH_DIR", "value": "/scratch"}),
            ]);
            mounts.push(json!({"name": args.data_volume, "mountPath": args.data_path}));
        }
    }
    let probe = |period: u32, failures: Option<u32>| {
        let mut probe = json!({"httpGet": {"path": "/healthz", "port": "backup-metrics"},
                               "periodSeconds": period});
        if let Some(failures) = failures {
            probe["failureThreshold"] = json!(failures);
        }
        probe
    };
    // No readiness probe: a sidecar's readiness gates the pod's, and a coordinator outage must
    // never take the database out of service.
    yaml(json!({
        "name": CONTAINER,
        "image": args.image,
        "command": ["aitbc-backup-agent"],
        "restartPolicy": "Always",
        "env": env,
        "ports": [{"name": "backup-metrics", "containerPort": 9444}],
        "startupProbe": probe(2, Some(30)),
        "livenessProbe": probe(10, None),
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": mounts,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        inject: InjectArgs,
    }

    fn args(extra: &[&str]) -> InjectArgs {
        let mut argv = vec!["inject"];
        argv.extend_from_slice(extra);
        Cli::parse_from(argv).inject
    }

    const DEPLOYMENT: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: redis\nspec:\n  selector:\n    matchLabels: {app: redis}\n  template:\n    metadata:\n      labels: {app: redis}\n    spec:\n      containers:\n      - name: redis\n        image: redis:7\n";

    #[test]
    fn twice_equals_once() {
        let a = args(&["--component", "redis"]);
        let once = inject(DEPLOYMENT, &a).expect("inject");
        assert_eq!(inject(&once, &a).expect("again"), once);
        let doc: Value = serde_yaml::from_str(&once).expect("YAML");
        let spec = &doc["spec"]["template"]["spec"];
        assert_eq!(spec["initContainers"][0]["name"], CONTAINER);
        assert_eq!(spec["initContainers"][0]["restartPolicy"], "Always");
        assert_eq!(spec["containers"][0]["name"], "redis");
        assert_eq!(spec["volumes"].as_sequence().map(Vec::len), Some(2));
        assert_eq!(
            doc["spec"]["template"]["metadata"]["labels"][AGENT_LABEL],
            "true"
        );
    }

    #[test]
    fn kinds_without_a_pod_template_are_refused_by_name() {
        let service = "apiVersion: v1\nkind: Service\nmetadata:\n  name: x\n";
        let err = inject(
            &format!("{DEPLOYMENT}---\n{service}"),
            &args(&["--component", "redis"]),
        )
        .expect_err("a Service");
        assert!(
            err.to_string().contains("document 2 is a `Service`"),
            "{err}"
        );
        let passed = inject(service, &args(&["--component", "redis", "--pass-through"]))
            .expect("pass through");
        assert!(passed.contains("kind: Service"));
    }
}
