use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A secret value (password, token). Prints and serializes as `[REDACTED]`, so neither logs
/// nor `--check-config` ever show it; [`Secret::expose`] is the one way to read it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("[REDACTED]")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret)
    }
}

/// A secret given directly (from the environment), else the first line of `file` (a mounted
/// Kubernetes secret), else none. `file_key` names the file's config key in errors.
pub fn secret_or_file(
    secret: Option<&Secret>,
    file: Option<&std::path::Path>,
    file_key: &str,
) -> Result<Option<String>, String> {
    if let Some(secret) = secret {
        return Ok(Some(secret.expose().to_owned()));
    }
    match file {
        Some(path) => std::fs::read_to_string(path)
            .map(|text| Some(text.lines().next().unwrap_or_default().to_owned()))
            .map_err(|err| format!("read {file_key} {}: {err}", path.display())),
        None => Ok(None),
    }
}
