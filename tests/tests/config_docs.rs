//! The configuration reference, `docs/configuration.md`, is kept in step with the code.
//!
//! Every `key | default | meaning` table of the page is read, and each binary's configuration
//! (the coordinator's and the agent's default structs) is serialized to JSON and flattened to
//! dotted keys. The test fails when a key of the code is not documented, a documented key does
//! not exist, or a documented default differs from the code's. The page's rules:
//! - a default that starts with a value in backticks is that value (durations are compared as
//!   durations, so `24h` and humantime's `1day` are equal; lists as JSON);
//! - a default in words (`none`, `the URL's host`, ...) means the code's default is empty
//!   (absent, null, `""`, `[]`);
//! - `(required ...)` means there is no default to compare;
//! - the section (`## ` heading) says whose keys they are: *Coordinator*, *Agent*, or *Both
//!   daemons*.
//!
//! The old scripts' variables (`variable | key | default`) are checked against the code's
//! legacy table and defaults too.

use std::collections::{BTreeMap, BTreeSet};

use aitbc_backup_agent::config::AgentConfig;
use aitbc_backup_coordinator::config::CoordinatorConfig;
use serde_json::{Value, json};

const DOC_PATH: &str = "docs/configuration.md";
const DOC: &str = include_str!("../../docs/configuration.md");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Coordinator,
    Agent,
    Both,
}

impl Scope {
    fn covers(self, binary: Binary) -> bool {
        matches!(
            (self, binary),
            (Scope::Both, _)
                | (Scope::Coordinator, Binary::Coordinator)
                | (Scope::Agent, Binary::Agent)
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Binary {
    Coordinator,
    Agent,
}

/// What a default cell says.
#[derive(Debug, Clone, PartialEq)]
enum Documented {
    /// No default: the binary needs the key.
    Required,
    /// No value of its own (words such as "none", "the URL's host").
    Empty,
    /// A value, as written between the first pair of backticks.
    Value(String),
}

impl Documented {
    fn parse(cell: &str) -> Documented {
        let cell = cell.trim();
        if cell.starts_with("(required") {
            Documented::Required
        } else if let Some(rest) = cell.strip_prefix('`') {
            Documented::Value(rest.split('`').next().unwrap_or_default().to_owned())
        } else {
            Documented::Empty
        }
    }
}

#[derive(Debug)]
struct Row {
    scope: Scope,
    key: String,
    default: Documented,
    line: usize,
}

#[derive(Debug)]
struct LegacyRow {
    env: String,
    key: String,
    default: Documented,
    line: usize,
}

#[derive(Debug, Default)]
struct Reference {
    rows: Vec<Row>,
    legacy: Vec<LegacyRow>,
}

fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split('|').map(|c| c.trim().to_owned()).collect()
}

/// The first backticked token of a cell.
fn code_token(cell: &str) -> Option<String> {
    let rest = cell.split_once('`')?.1;
    Some(rest.split_once('`')?.0.to_owned())
}

/// Reads the page's tables; problems with the page itself are returned as errors.
fn parse(doc: &str) -> Result<Reference, Vec<String>> {
    let mut reference = Reference::default();
    let mut errors = Vec::new();
    let mut scope: Option<Scope> = None;
    let mut section = String::new();
    let lines: Vec<&str> = doc.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if let Some(heading) = line.strip_prefix("## ") {
            section = heading.to_owned();
            scope = if heading.starts_with("Coordinator") {
                Some(Scope::Coordinator)
            } else if heading.starts_with("Agent") {
                Some(Scope::Agent)
            } else if heading.starts_with("Both daemons") {
                Some(Scope::Both)
            } else {
                None
            };
        }
        let is_table = line.trim_start().starts_with('|')
            && lines
                .get(i + 1)
                .is_some_and(|next| next.trim_start().starts_with("|---"));
        if !is_table {
            i += 1;
            continue;
        }
        let header = cells(line);
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        let mut j = i + 2;
        while j < lines.len() && lines[j].trim_start().starts_with('|') {
            let row = cells(lines[j]);
            let number = j + 1;
            match header.as_slice() {
                ["key", "default", "meaning"] => {
                    let key = row.first().map(String::as_str).unwrap_or_default();
                    let key = match key.strip_prefix('`').and_then(|k| k.strip_suffix('`')) {
                        Some(key) if !key.contains('`') && !key.contains(' ') => key,
                        _ => {
                            errors.push(format!(
                                "{DOC_PATH}:{number}: the key cell must be one key in backticks, found `{key}`"
                            ));
                            j += 1;
                            continue;
                        }
                    };
                    let Some(scope) = scope else {
                        errors.push(format!(
                            "{DOC_PATH}:{number}: key table under `## {section}`, which names \
                             neither Coordinator, Agent nor Both daemons"
                        ));
                        j += 1;
                        continue;
                    };
                    reference.rows.push(Row {
                        scope,
                        key: key.to_owned(),
                        default: Documented::parse(row.get(1).map(String::as_str).unwrap_or("")),
                        line: number,
                    });
                }
                ["variable", "key", "default"] => {
                    let env = row.first().and_then(|c| code_token(c));
                    let key = row.get(1).and_then(|c| code_token(c));
                    match (env, key) {
                        (Some(env), Some(key)) => reference.legacy.push(LegacyRow {
                            env,
                            key,
                            default: Documented::parse(
                                row.get(2).map(String::as_str).unwrap_or(""),
                            ),
                            line: number,
                        }),
                        _ => errors.push(format!(
                            "{DOC_PATH}:{number}: a variable row needs the variable and the key in backticks"
                        )),
                    }
                }
                _ => {}
            }
            j += 1;
        }
        i = j;
    }
    if errors.is_empty() {
        Ok(reference)
    } else {
        Err(errors)
    }
}

/// Dotted keys of a JSON object; an array of objects (`[[policies]]`) is a key itself and its
/// first element's fields are `<key>.<field>`.
fn flatten(prefix: &str, value: &Value, out: &mut BTreeMap<String, Value>) {
    match value {
        Value::Object(map) => {
            for (name, value) in map {
                let key = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}.{name}")
                };
                flatten(&key, value, out);
            }
        }
        Value::Array(items) if items.first().is_some_and(Value::is_object) => {
            out.insert(prefix.to_owned(), Value::Array(Vec::new()));
            if let Some(first) = items.first() {
                flatten(prefix, first, out);
            }
        }
        other => {
            out.insert(prefix.to_owned(), other.clone());
        }
    }
}

/// One binary's configuration as the code has it: every key it accepts, and the defaults.
struct CodeConfig {
    binary: Binary,
    /// Every key, from a config with its optional parts filled in (secrets, a policy, ...).
    keys: BTreeSet<String>,
    /// The default of each key that has one (serialized from the default struct).
    defaults: BTreeMap<String, Value>,
}

impl CodeConfig {
    fn new(binary: Binary, default: Value, filled: Value) -> CodeConfig {
        let mut defaults = BTreeMap::new();
        flatten("", &default, &mut defaults);
        let mut all = BTreeMap::new();
        flatten("", &filled, &mut all);
        // A policy's fields have no struct default of their own: the filled config holds a
        // policy that sets only what is required, so the rest are serde's defaults.
        for (key, value) in &all {
            if key.starts_with("policies.") {
                defaults.insert(key.clone(), value.clone());
            }
        }
        CodeConfig {
            binary,
            keys: all.into_keys().collect(),
            defaults,
        }
    }

    fn coordinator() -> CodeConfig {
        let default = serde_json::to_value(CoordinatorConfig::default()).expect("serialize");
        let filled: CoordinatorConfig = serde_json::from_value(json!({
            "repository": {"passphrase": "x", "credential": "x"},
            "policies": [{"name": "p", "schedule": "0 * * * *"}],
        }))
        .expect("a coordinator config with a policy and the secrets");
        let filled = serde_json::to_value(filled).expect("serialize");
        CodeConfig::new(Binary::Coordinator, default, filled)
    }

    fn agent() -> CodeConfig {
        let default = serde_json::to_value(AgentConfig::default()).expect("serialize");
        let filled: AgentConfig = serde_json::from_value(json!({
            "component": "ledger",
            "repository": {"passphrase": "x", "credential": "x"},
            "postgres": {"password": "x"},
            "redis": {"password": "x"},
        }))
        .expect("an agent config with its component and the secrets");
        let filled = serde_json::to_value(filled).expect("serialize");
        CodeConfig::new(Binary::Agent, default, filled)
    }
}

fn duration(text: &str) -> Option<std::time::Duration> {
    humantime::parse_duration(text).ok()
}

/// Does the documented value equal the code's default?
fn same_value(documented: &str, code: &Value) -> bool {
    match code {
        Value::String(text) => {
            text == documented
                || matches!((duration(text), duration(documented)), (Some(a), Some(b)) if a == b)
        }
        Value::Number(number) => documented
            .parse::<f64>()
            .is_ok_and(|d| number.as_f64() == Some(d)),
        Value::Bool(flag) => documented == flag.to_string(),
        Value::Array(_) | Value::Object(_) => {
            serde_json::from_str::<Value>(documented).is_ok_and(|d| &d == code)
        }
        Value::Null => false,
    }
}

fn is_empty(code: Option<&Value>) -> bool {
    match code {
        None | Some(Value::Null) => true,
        Some(Value::String(text)) => text.is_empty(),
        Some(Value::Array(items)) => items.is_empty(),
        Some(Value::Object(map)) => map.is_empty(),
        Some(_) => false,
    }
}

fn check_default(
    key: &str,
    line: usize,
    documented: &Documented,
    code: Option<&Value>,
) -> Option<String> {
    match documented {
        Documented::Required => None,
        Documented::Empty if is_empty(code) => None,
        Documented::Empty => Some(format!(
            "{DOC_PATH}:{line}: `{key}` is documented without a default, but the code's is {}",
            code.map(Value::to_string).unwrap_or_default()
        )),
        Documented::Value(value) => match code {
            Some(code) if same_value(value, code) => None,
            Some(code) => Some(format!(
                "{DOC_PATH}:{line}: `{key}` is documented with default `{value}`, but the code's is {code}"
            )),
            None => Some(format!(
                "{DOC_PATH}:{line}: `{key}` is documented with default `{value}`, but the code has none"
            )),
        },
    }
}

/// Every difference between the page and the code, one line each.
fn problems(doc: &str, configs: &[CodeConfig]) -> Vec<String> {
    let reference = match parse(doc) {
        Ok(reference) => reference,
        Err(errors) => return errors,
    };
    let mut problems = Vec::new();
    for config in configs {
        let mut documented = BTreeSet::new();
        for row in reference
            .rows
            .iter()
            .filter(|r| r.scope.covers(config.binary))
        {
            if !documented.insert(row.key.as_str()) {
                problems.push(format!(
                    "{DOC_PATH}:{}: `{}` is documented twice for the {:?}",
                    row.line, row.key, config.binary
                ));
            }
            if !config.keys.contains(&row.key) {
                problems.push(format!(
                    "{DOC_PATH}:{}: `{}` is documented, but the {:?} has no such key",
                    row.line, row.key, config.binary
                ));
                continue;
            }
            problems.extend(check_default(
                &row.key,
                row.line,
                &row.default,
                config.defaults.get(&row.key),
            ));
        }
        for key in &config.keys {
            if !documented.contains(key.as_str()) {
                problems.push(format!(
                    "`{key}` of the {:?} is not documented in {DOC_PATH}",
                    config.binary
                ));
            }
        }
    }
    for row in &reference.legacy {
        let holders: Vec<&CodeConfig> = configs
            .iter()
            .filter(|c| c.keys.contains(&row.key))
            .collect();
        if holders.is_empty() {
            problems.push(format!(
                "{DOC_PATH}:{}: `{}` (for {}) is no key of any binary",
                row.line, row.key, row.env
            ));
        }
        for config in holders {
            problems.extend(check_default(
                &row.key,
                row.line,
                &row.default,
                config.defaults.get(&row.key),
            ));
        }
    }
    problems
}

fn code_configs() -> Vec<CodeConfig> {
    vec![CodeConfig::coordinator(), CodeConfig::agent()]
}

#[test]
fn the_configuration_reference_matches_the_code() {
    let configs = code_configs();
    // Not a vacuous pass: the page's tables were found and the code has its usual size.
    let reference = parse(DOC).unwrap_or_else(|errors| panic!("{}", errors.join("\n")));
    assert!(reference.rows.len() > 60, "{} rows", reference.rows.len());
    assert!(configs.iter().all(|c| c.keys.len() > 30));
    let problems = problems(DOC, &configs);
    assert!(
        problems.is_empty(),
        "docs/configuration.md and the code disagree (fix the page or the code):\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_old_scripts_variables_are_all_documented() {
    let reference = parse(DOC).unwrap_or_else(|errors| panic!("{}", errors.join("\n")));
    let documented: BTreeSet<(String, String)> = reference
        .legacy
        .iter()
        .map(|r| (r.env.clone(), r.key.clone()))
        .collect();
    let code: BTreeSet<(String, String)> = aitbc_backup_coordinator::config::SCHEMA
        .legacy
        .iter()
        .chain(aitbc_backup_agent::config::SCHEMA.legacy)
        .map(|v| (v.env.to_owned(), v.key.to_owned()))
        .collect();
    assert_eq!(documented, code);
}

#[test]
fn a_changed_default_or_key_is_caught() {
    let configs = code_configs();
    let cases = [
        // A default that differs (as if the code's had changed).
        (
            "| `fleet.missed_heartbeats` | `3` |",
            "| `fleet.missed_heartbeats` | `4` |",
            "fleet.missed_heartbeats",
        ),
        (
            "| `gc.grace` | `24h` |",
            "| `gc.grace` | `12h` |",
            "gc.grace",
        ),
        (
            "| `redis.plain_rdb` | `true` |",
            "| `redis.plain_rdb` | `false` |",
            "redis.plain_rdb",
        ),
        // A default in words where the code has a value.
        (
            "| `ledger.chain_db` | `chain/chain.db` |",
            "| `ledger.chain_db` | the node's |",
            "ledger.chain_db",
        ),
        // A key that does not exist, and a key of the code left out.
        ("| `http.listen` |", "| `http.listne` |", "http.listne"),
    ];
    for (from, to, key) in cases {
        assert!(DOC.contains(from), "the page no longer holds {from}");
        let changed = DOC.replacen(from, to, 1);
        let found = problems(&changed, &configs);
        assert!(
            found.iter().any(|p| p.contains(&format!("`{key}`"))),
            "{from} -> {to} not caught: {found:?}"
        );
    }
    // A key of the code left out of the page.
    let removed: String = DOC
        .lines()
        .filter(|line| !line.starts_with("| `postgres.wal.os_user` |"))
        .map(|line| format!("{line}\n"))
        .collect();
    assert_ne!(removed.len(), DOC.len());
    let found = problems(&removed, &configs);
    assert!(
        found
            .iter()
            .any(|p| p.contains("`postgres.wal.os_user` of the Agent is not documented")),
        "{found:?}"
    );
}

#[test]
fn durations_compare_as_durations() {
    assert!(same_value("24h", &json!("1day")));
    assert!(same_value("1m", &json!("60s")));
    assert!(same_value("1m 30s", &json!("90s")));
    assert!(same_value("50ms", &json!("50ms")));
    assert!(!same_value("5s", &json!("10s")));
    assert!(same_value(r#"["a", "b"]"#, &json!(["a", "b"])));
    assert!(same_value("3", &json!(3)));
    assert!(!same_value("3", &json!("4")));
}
