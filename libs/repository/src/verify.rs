//! `verify`: structure (every manifest parses — component, set and archived-WAL manifests —,
//! every chunk they name is stored with the recorded size, every set names existing component
//! manifests, every base backup's WAL chain has no gap) and, with `read_data`, every referenced
//! chunk downloaded, decrypted, decompressed and re-hashed.

use std::collections::{BTreeMap, HashMap};

use futures::StreamExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::damaged::{Damaged, DamagedKind};
use crate::digest::Checker;
use crate::error::RepoError;
use crate::layout;
use crate::manifest::ComponentManifest;
use crate::repo::Repository;
use crate::wal;

/// One thing wrong, naming the object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub object: String,
    pub problem: String,
    /// Manifests that reference the object.
    pub manifests: Vec<String>,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.object, self.problem)
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub manifests: usize,
    pub chunks: usize,
    pub chunks_read: usize,
    pub problems: Vec<Problem>,
    /// Objects whose current version is missing or does not verify while an older version
    /// does (an overwrite or a delete by someone with write access): readable, every backup
    /// still restores, but worth an investigation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overwritten: Vec<String>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks every manifest of the repository (components, sets, archived WAL), the chunks they
/// name, and the WAL chain of every base backup.
pub async fn verify(
    repo: &Repository,
    read_data: bool,
    cancel: &CancellationToken,
) -> Result<VerifyReport, RepoError> {
    needs_data_key(repo, read_data)?;
    let mut ids = repo.component_ids(cancel).await?;
    if keeps_versions(repo) {
        // A component manifest a set names but the listing lacks (a delete marker in front of
        // it) is read from its older version and checked like the others.
        for set_id in repo.set_ids(cancel).await? {
            let Ok(set) = repo.set(&set_id, cancel).await else {
                continue; // reported by verify_sets
            };
            for component in set.components {
                if !ids.contains(&component.manifest_id) {
                    ids.push(component.manifest_id);
                }
            }
        }
    }
    let mut report = VerifyReport::default();
    let mut chunks = References::default();
    let bases = read_components(repo, &ids, &mut chunks, &mut report, cancel).await?;
    let catalog = wal::Catalog::load(repo, cancel).await?;
    for file in catalog.files() {
        let object = file.path();
        match repo.wal_manifest(&object, cancel).await {
            Ok(manifest) => {
                report.manifests += 1;
                chunks.add(object.as_str(), &manifest);
            }
            Err(err) => report.problems.push(Problem {
                object: object.to_string(),
                problem: err.to_string(),
                manifests: vec![object.to_string()],
            }),
        }
    }
    check_chunks(repo, &chunks, read_data, &mut report, cancel).await?;
    if read_data {
        check_digests(repo, &ids, &mut report, cancel).await?;
    }
    verify_sets(repo, &ids, &mut report, cancel).await?;
    for chain in wal::verify_chains(repo, &catalog, &bases, cancel).await? {
        let needed_by = vec![chain.base_backup.clone()];
        if chain.missing.is_empty() && !chain.problem.is_empty() {
            report.problems.push(Problem {
                object: layout::component_manifest(&chain.base_backup).to_string(),
                problem: chain.problem.clone(),
                manifests: needed_by.clone(),
            });
        }
        for segment in &chain.missing {
            report.problems.push(Problem {
                object: wal::WalFile::Segment(segment.clone()).path().to_string(),
                problem: "WAL segment missing: point-in-time recovery from this base backup cannot cross it".into(),
                manifests: needed_by.clone(),
            });
        }
    }
    report.problems.sort_by(|a, b| a.object.cmp(&b.object));
    report.overwritten = repo.overwritten();
    Ok(report)
}

/// Reading data in a sealed repository takes an operator's key: a writer's or the
/// coordinator's credential checks structure only, and says so rather than report every chunk.
fn needs_data_key(repo: &Repository, read_data: bool) -> Result<(), RepoError> {
    if read_data && !repo.reads_data() {
        return Err(RepoError::NoKey(
            "--read-data needs an operator's key (passphrase or key file): this credential \
             reads no data in a sealed repository; without --read-data the structure is checked"
                .into(),
        ));
    }
    Ok(())
}

/// Checks one snapshot set: the component manifests it names and their chunks.
pub async fn verify_set(
    repo: &Repository,
    set_id: &str,
    read_data: bool,
    cancel: &CancellationToken,
) -> Result<VerifyReport, RepoError> {
    needs_data_key(repo, read_data)?;
    let set = repo.set(set_id, cancel).await?;
    let ids: Vec<String> = set.components.into_iter().map(|c| c.manifest_id).collect();
    let mut report = VerifyReport::default();
    let mut chunks = References::default();
    read_components(repo, &ids, &mut chunks, &mut report, cancel).await?;
    check_chunks(repo, &chunks, read_data, &mut report, cancel).await?;
    report.manifests += 1;
    report.problems.sort_by(|a, b| a.object.cmp(&b.object));
    report.overwritten = repo.overwritten();
    Ok(report)
}

/// The chunks manifests reference: chunk id → (raw length, stored length, the component its
/// id is keyed by, manifests).
#[derive(Default)]
struct References(BTreeMap<String, (u32, u32, String, Vec<String>)>);

impl References {
    fn add(&mut self, name: &str, manifest: &ComponentManifest) {
        for chunk in &manifest.chunks {
            let entry = self.0.entry(chunk.id.clone()).or_insert((
                chunk.raw_len,
                chunk.stored_len,
                manifest.keyed_by.clone(),
                Vec::new(),
            ));
            if entry.3.last().map(String::as_str) != Some(name) {
                entry.3.push(name.to_owned());
            }
        }
    }
}

/// Reads the component manifests `ids` (a manifest that cannot be read is a problem) into
/// `chunks`; returns the base backups among them.
async fn read_components(
    repo: &Repository,
    ids: &[String],
    chunks: &mut References,
    report: &mut VerifyReport,
    cancel: &CancellationToken,
) -> Result<Vec<wal::BaseBackup>, RepoError> {
    let mut bases = Vec::new();
    for id in ids {
        match repo.component(id, cancel).await {
            Ok(manifest) => {
                report.manifests += 1;
                if let Some(problem) = stream_problem(&manifest) {
                    report.problems.push(Problem {
                        object: layout::component_manifest(id).to_string(),
                        problem,
                        manifests: vec![id.clone()],
                    });
                }
                chunks.add(id, &manifest);
                bases.extend(wal::BaseBackup::of(manifest));
            }
            Err(RepoError::Cancelled) => return Err(RepoError::Cancelled),
            Err(err) => report.problems.push(Problem {
                object: layout::component_manifest(id).to_string(),
                problem: unreadable(DamagedKind::ComponentManifest, id, &err),
                manifests: vec![id.clone()],
            }),
        }
    }
    Ok(bases)
}

/// What is wrong with a manifest's own arithmetic: a slice past its chunk's end, or references
/// that do not add up to the stream's recorded size.
fn stream_problem(manifest: &ComponentManifest) -> Option<String> {
    if let Some(chunk) = manifest.chunks.iter().find(|c| !c.slice_in_bounds()) {
        return Some(format!(
            "its slice {:?} of chunk {} reaches past the chunk's {} bytes",
            chunk.slice, chunk.id, chunk.raw_len
        ));
    }
    let total: u64 = manifest
        .chunks
        .iter()
        .map(|c| u64::from(c.stream_len()))
        .sum();
    (total != manifest.raw_size).then(|| {
        format!(
            "its chunks add up to {total} bytes, it records {}",
            manifest.raw_size
        )
    })
}

/// Reassembles the stream of every manifest whose files carry content digests (the ledger's
/// databases) and checks them: this catches references that point at the wrong bytes, which
/// re-hashing each chunk cannot. A manifest with a missing or corrupt chunk is reported here
/// too (its stream cannot be reassembled), beside the chunk's own problem.
async fn check_digests(
    repo: &Repository,
    ids: &[String],
    report: &mut VerifyReport,
    cancel: &CancellationToken,
) -> Result<(), RepoError> {
    for id in ids {
        let Ok(manifest) = repo.component(id, cancel).await else {
            continue; // already reported by read_components
        };
        if Checker::new(&manifest).is_empty() {
            continue;
        }
        let sink = tokio::io::sink();
        match crate::restore::restore(repo, &manifest, sink, Default::default(), cancel).await {
            Ok(()) => {}
            Err(RepoError::Cancelled) => return Err(RepoError::Cancelled),
            Err(err) => report.problems.push(Problem {
                object: layout::component_manifest(id).to_string(),
                problem: err.to_string(),
                manifests: vec![id.clone()],
            }),
        }
    }
    Ok(())
}

/// Checks every referenced chunk is stored with its recorded size and, with `read_data`,
/// downloads, decodes and re-hashes it.
async fn check_chunks(
    repo: &Repository,
    chunks: &References,
    read_data: bool,
    report: &mut VerifyReport,
    cancel: &CancellationToken,
) -> Result<(), RepoError> {
    let stored: HashMap<String, u64> = repo
        .storage
        .list(layout::CHUNKS, cancel)
        .await?
        .into_iter()
        .map(|o| (o.path.file_name().to_owned(), o.size))
        .collect();
    report.chunks = chunks.0.len();
    let (mut readable, mut suspects) = (Vec::new(), Vec::new());
    // Where the bucket keeps versions, a chunk whose current version is missing or of the wrong
    // size is read: an older version that verifies is reported as overwritten, not missing.
    let versioned = keeps_versions(repo);
    for (id, (raw_len, stored_len, keyed_by, manifests)) in &chunks.0 {
        let object = layout::chunk(id).to_string();
        let read = (id.clone(), *raw_len, keyed_by.clone(), manifests.clone());
        if versioned && stored.get(id) != Some(&u64::from(*stored_len)) {
            suspects.push(read);
            continue;
        }
        match stored.get(id) {
            None => report.problems.push(Problem {
                object,
                problem: "missing".into(),
                manifests: manifests.clone(),
            }),
            Some(size) if *size != u64::from(*stored_len) => report.problems.push(Problem {
                object,
                problem: format!("size {size} bytes, the manifest records {stored_len}"),
                manifests: manifests.clone(),
            }),
            Some(_) => readable.push(read),
        }
    }
    // Without --read-data only the suspects are read.
    if !read_data {
        readable.clear();
    }
    readable.append(&mut suspects);
    {
        let mut reads = futures::stream::iter(readable)
            .map(|(id, raw_len, keyed_by, manifests)| {
                let repo = repo.reading(&keyed_by);
                async move {
                    let object = layout::chunk(&id);
                    let result = match repo {
                        Ok(repo) => repo.read_chunk(&id, raw_len, cancel).await.map(|_| ()),
                        Err(err) => Err(err),
                    };
                    (object.to_string(), manifests, result)
                }
            })
            .buffer_unordered(repo.download_concurrency());
        while let Some((object, manifests, result)) = reads.next().await {
            report.chunks_read += usize::from(read_data);
            match result {
                Ok(()) => {}
                Err(RepoError::Cancelled) => return Err(RepoError::Cancelled),
                Err(RepoError::Corrupt { reason, .. }) => report.problems.push(Problem {
                    object,
                    problem: format!("corrupt: {reason}"),
                    manifests,
                }),
                Err(err) => report.problems.push(Problem {
                    object,
                    problem: err.to_string(),
                    manifests,
                }),
            }
        }
    }
    Ok(())
}

async fn verify_sets(
    repo: &Repository,
    component_ids: &[String],
    report: &mut VerifyReport,
    cancel: &CancellationToken,
) -> Result<(), RepoError> {
    for meta in repo.storage.list(layout::SET_MANIFESTS, cancel).await? {
        let Some(id) = layout::manifest_id_of(&meta.path) else {
            continue;
        };
        match repo.set(id, cancel).await {
            Ok(set) => {
                report.manifests += 1;
                for component in set.components {
                    if !component_ids.contains(&component.manifest_id)
                        && repo
                            .component(&component.manifest_id, cancel)
                            .await
                            .is_err()
                    {
                        report.problems.push(Problem {
                            object: layout::component_manifest(&component.manifest_id).to_string(),
                            problem: "missing (named by a set manifest)".into(),
                            manifests: vec![id.to_owned()],
                        });
                    }
                }
            }
            Err(RepoError::Cancelled) => return Err(RepoError::Cancelled),
            Err(err) => report.problems.push(Problem {
                object: meta.path.to_string(),
                problem: unreadable(DamagedKind::SetManifest, id, &err),
                manifests: vec![id.to_owned()],
            }),
        }
    }
    Ok(())
}

/// Whether the repository's bucket keeps versions that reads fall back to.
fn keeps_versions(repo: &Repository) -> bool {
    repo.config().object_lock.is_some() || repo.storage.as_of_time().is_some()
}

/// Why a manifest could not be read: `damaged: <reason>` for damage, else the error.
fn unreadable(kind: DamagedKind, id: &str, err: &RepoError) -> String {
    match Damaged::from_error(kind, id, err) {
        Some(damaged) => format!("damaged: {}", damaged.reason),
        None => err.to_string(),
    }
}
