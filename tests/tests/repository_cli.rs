//! `aitbc-backup repo ...` as operators use it, against a local directory and s3s-fs, and with
//! a damaged component manifest.

use std::process::{Command, Output};

use aitbc_backup_tests::data::generate;
use aitbc_backup_tests::fleet::binary;
use aitbc_backup_tests::process::output_with_stdin;
use aitbc_backup_tests::s3::S3Server;

struct Cli {
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Cli {
    fn run(&self, extra: &[&str], stdin: Option<&[u8]>) -> Output {
        output_with_stdin(
            Command::new(binary("aitbc-backup"))
                .arg("repo")
                .args(&self.args)
                .args(extra)
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .envs(self.env.iter().map(|(k, v)| (k, v))),
            stdin,
        )
    }

    fn ok(&self, extra: &[&str], stdin: Option<&[u8]>) -> String {
        let out = self.run(extra, stdin);
        assert!(
            out.status.success(),
            "repo {extra:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn exercise(cli: &Cli, chunk_file: impl Fn(&str) -> std::path::PathBuf) {
    cli.ok(&["init"], None);
    let out = cli.run(&["init"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds a repository"));

    let data = generate(5 << 20, 90);
    let id = cli
        .ok(&["put", "ledger", "--stream", "tar"], Some(&data))
        .trim()
        .to_owned();
    let again: serde_json::Value =
        serde_json::from_str(&cli.ok(&["--json", "put", "ledger"], Some(&data))).expect("json");
    assert_eq!(again["new_chunks"], 0);

    let list: serde_json::Value =
        serde_json::from_str(&cli.ok(&["--json", "ls"], None)).expect("json");
    assert_eq!(list.as_array().map(Vec::len), Some(2));
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["raw_size"], data.len() as u64);
    let table = cli.ok(&["ls"], None);
    assert!(
        table.lines().nth(1).is_some_and(|l| l.starts_with(&id)),
        "{table}"
    );
    let shown: serde_json::Value =
        serde_json::from_str(&cli.ok(&["--json", "show", &id], None)).expect("json");
    assert_eq!(shown["stream"], "tar");
    let chunk_count = shown["chunks"].as_array().map(Vec::len).unwrap_or(0);
    assert!(chunk_count >= 2, "5 MiB in {chunk_count} chunks");
    assert_eq!(list[0]["chunks"], chunk_count as u64);

    // cat to stdout and to a file.
    let out = cli.run(&["cat", &id], None);
    assert!(out.status.success());
    assert_eq!(out.stdout, data);
    let dir = aitbc_backup_tests::temp_dir("cli-cat");
    let target = dir.path().join("restored");
    cli.ok(&["cat", &id, "-o", target.to_str().expect("utf-8")], None);
    assert_eq!(std::fs::read(&target).expect("read"), data);

    let out = cli.run(&["cat", "20990101T000000Z-00000000"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no manifest with id"));

    cli.ok(&["verify", "--read-data"], None);
    // Corrupt one chunk on disk: verify names it and exits 1.
    let full: serde_json::Value =
        serde_json::from_str(&cli.ok(&["--json", "verify"], None)).expect("json");
    assert_eq!(full["problems"].as_array().map(Vec::len), Some(0));
    let chunk_id = {
        let dump = cli.ok(&["--json", "show", &id], None);
        // `show --json` prints the whole manifest when asked in JSON.
        let manifest: serde_json::Value = serde_json::from_str(&dump).expect("json");
        manifest["chunks"][0]["id"]
            .as_str()
            .expect("chunk id")
            .to_owned()
    };
    let path = chunk_file(&chunk_id);
    let mut bytes = std::fs::read(&path).expect("read chunk file");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&path, bytes).expect("write chunk file");
    let out = cli.run(&["verify", "--read-data"], None);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    // Our own check says "corrupt"; s3s-fs notices first and fails the read: named either way.
    assert!(text.contains(&chunk_id), "{text}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("verify failed"));

    // GC: nothing unreferenced yet; forget both manifests, then GC without grace removes all.
    let gc: serde_json::Value =
        serde_json::from_str(&cli.ok(&["--json", "gc", "--grace", "0s"], None)).expect("json");
    assert_eq!(gc["deleted_chunks"], 0);
    for manifest in list.as_array().expect("list") {
        cli.ok(&["forget", manifest["id"].as_str().expect("id")], None);
    }
    let dry: serde_json::Value =
        serde_json::from_str(&cli.ok(&["--json", "gc", "--dry-run", "--grace", "0s"], None))
            .expect("json");
    assert!(dry["deleted_chunks"].as_u64().unwrap_or(0) > 0);
    let gc: serde_json::Value =
        serde_json::from_str(&cli.ok(&["--json", "gc", "--grace", "0s"], None)).expect("json");
    assert_eq!(gc["deleted_chunks"], dry["deleted_chunks"]);
    assert_eq!(gc["chunks"], gc["deleted_chunks"]);
}

#[test]
fn repo_commands_on_a_local_directory() {
    let dir = aitbc_backup_tests::temp_dir("cli-repo");
    let root = dir.path().join("repo");
    let cli = Cli {
        args: vec!["--repository".into(), format!("file://{}", root.display())],
        env: vec![],
    };
    exercise(&cli, |id| root.join("chunks").join(&id[..2]).join(id));
}

#[test]
fn repo_commands_on_s3() {
    let server = S3Server::s3s_fs();
    let root = server.root.clone().expect("s3s-fs root");
    let bucket = server.bucket.clone();
    let cli = Cli {
        args: vec![
            "--repository".into(),
            format!("s3://{bucket}/backups"),
            "--endpoint".into(),
            server.endpoint(),
            "--path-style".into(),
        ],
        env: server.client_env(),
    };
    exercise(&cli, |id| {
        root.join(&bucket)
            .join("backups/chunks")
            .join(&id[..2])
            .join(id)
    });
}

#[test]
fn encrypted_repository_from_the_cli() {
    let dir = aitbc_backup_tests::temp_dir("cli-keys");
    let url = format!("file://{}", dir.path().join("repo").display());
    let pass_file = dir.path().join("pass");
    std::fs::write(&pass_file, "s3cret passphrase\n").expect("write");
    let new_file = dir.path().join("new");
    std::fs::write(&new_file, "another passphrase\n").expect("write");
    let cli = Cli {
        args: vec![
            "--repository".into(),
            url.clone(),
            "--passphrase-file".into(),
            pass_file.display().to_string(),
        ],
        env: vec![],
    };
    cli.ok(&["init", "--encrypt"], None);
    let data = generate(2 << 20, 91);
    let id = cli.ok(&["put", "x"], Some(&data)).trim().to_owned();
    assert_eq!(cli.run(&["cat", &id], None).stdout, data);

    // The same through the environment; a wrong one is refused clearly.
    let env_cli = Cli {
        args: vec!["--repository".into(), url.clone()],
        env: vec![("AITBC_CLI_PASSPHRASE".into(), "wrong".into())],
    };
    let out = env_cli.run(&["ls"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("none of the repository's 1 keys"));
    let out = Cli {
        args: vec!["--repository".into(), url],
        env: vec![],
    }
    .run(&["ls"], None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("passphrase or key file is needed"));

    let rotated = cli.ok(
        &[
            "keys",
            "rotate",
            "--new-passphrase-file",
            new_file.to_str().expect("utf-8"),
        ],
        None,
    );
    assert!(rotated.contains("rotated"), "{rotated}");
    let out = cli.run(&["ls"], None);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("was revoked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let keys: serde_json::Value = serde_json::from_str(
        &Cli {
            args: vec![
                "--repository".into(),
                cli.args[1].clone(),
                "--passphrase-file".into(),
                new_file.display().to_string(),
            ],
            env: vec![],
        }
        .ok(&["--json", "keys", "list"], None),
    )
    .expect("json");
    assert_eq!(keys.as_array().map(Vec::len), Some(2));
}

#[test]
fn a_damaged_component_manifest_is_named_and_the_others_still_listed() {
    let dir = aitbc_backup_tests::temp_dir("cli-damaged");
    let root = dir.path().join("repo");
    let cli = Cli {
        args: vec!["--repository".into(), format!("file://{}", root.display())],
        env: vec![],
    };
    cli.ok(&["init"], None);
    let streams: Vec<Vec<u8>> = (0..3).map(|i| generate(256 << 10, 200 + i)).collect();
    let ids: Vec<String> = streams
        .iter()
        .enumerate()
        .map(|(i, data)| {
            cli.ok(&["put", &format!("stream-{i}")], Some(data))
                .trim()
                .to_owned()
        })
        .collect();
    let damaged = &ids[1];
    let object = format!("manifests/components/{damaged}.json");
    aitbc_backup_tests::repository::damage_manifest(&root.join(&object));

    // `ls`: exit 0, the good backups listed as before, the damaged one as a DAMAGED row and
    // named on stderr.
    let out = cli.run(&["ls"], None);
    assert_eq!(out.status.code(), Some(0));
    let table = String::from_utf8_lossy(&out.stdout);
    for (i, id) in [(0, &ids[0]), (2, &ids[2])] {
        let row = table
            .lines()
            .find(|l| l.starts_with(id.as_str()))
            .unwrap_or_else(|| panic!("{id} not listed:\n{table}"));
        assert!(row.contains(&format!("stream-{i}")), "{row}");
    }
    let row = table
        .lines()
        .find(|l| l.starts_with(damaged.as_str()))
        .unwrap_or_else(|| panic!("{damaged} not listed:\n{table}"));
    assert!(row.contains("DAMAGED"), "{row}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&object) && stderr.contains("damaged"),
        "{stderr}"
    );
    let list: serde_json::Value =
        serde_json::from_str(&cli.ok(&["--json", "ls"], None)).expect("json");
    let list = list.as_array().expect("array");
    assert_eq!(list.len(), 3);
    let good: Vec<&str> = list
        .iter()
        .filter(|e| e["damaged"] == false)
        .filter_map(|e| e["id"].as_str())
        .collect();
    assert_eq!(good, [ids[0].as_str(), ids[2].as_str()]);
    let bad = list
        .iter()
        .find(|e| e["damaged"] == true)
        .expect("a damaged entry");
    assert_eq!(bad["id"], damaged.as_str());
    assert_eq!(bad["object"], object.as_str());
    assert!(
        bad["reason"].as_str().unwrap_or("").contains("checksum"),
        "{bad}"
    );

    // `verify` fails naming it; the good backups still restore.
    let out = cli.run(&["verify"], None);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with(&format!("{object}: damaged:"))),
        "{text}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("verify failed: 1 problem(s)"));
    assert_eq!(cli.run(&["cat", &ids[0]], None).stdout, streams[0]);

    // GC deletes nothing on partial knowledge and says which manifest and what to do.
    let out = cli.run(&["gc", "--grace", "0s"], None);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&object), "{stderr}");
    assert!(stderr.contains("Nothing was deleted"), "{stderr}");
    assert!(
        stderr.contains(&format!("aitbc-backup repo forget {damaged}")),
        "{stderr}"
    );

    // Removed deliberately, GC runs again and the repository verifies.
    cli.ok(&["forget", damaged], None);
    let gc: serde_json::Value =
        serde_json::from_str(&cli.ok(&["--json", "gc", "--grace", "0s"], None)).expect("json");
    assert!(gc["deleted_chunks"].as_u64() > Some(0), "{gc}");
    cli.ok(&["verify", "--read-data"], None);
    assert_eq!(cli.run(&["cat", &ids[2]], None).stdout, streams[2]);
}
