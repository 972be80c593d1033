//! The CLI's errors and output as an operator meets them: a path with no repository, a closed
//! pipe, an existing output file.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use aitbc_backup_repository::storage::{Backend, LocalStorage};
use aitbc_backup_repository::{BackupRequest, ChunkerParams, Progress, Repository, Storage};
use aitbc_backup_tests::fleet::binary;
use aitbc_backup_tests::process::output_with_stdin;
use aitbc_backup_tests::repository::test_limits;
use tokio_util::sync::CancellationToken;

fn repo_cli(repository: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    output_with_stdin(
        Command::new(binary("aitbc-backup"))
            .args(["repo", "--repository", repository])
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default()),
        stdin,
    )
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `aitbc-backup ARGS | head -1` in bash: (what head printed, the CLI's stderr, the CLI's
/// exit status from PIPESTATUS).
fn piped_into_head(args: &[&str], dir: &Path) -> (String, String, i32) {
    let stderr = dir.join("cli.stderr");
    let out = Command::new("bash")
        .arg("-c")
        .arg(r#""$@" 2>"$CLI_STDERR" | head -1; echo "${PIPESTATUS[0]}" >"$CLI_STDERR.status""#)
        .arg("bash")
        .arg(binary("aitbc-backup"))
        .args(args)
        .env("CLI_STDERR", &stderr)
        .output()
        .expect("run bash");
    let status = std::fs::read_to_string(dir.join("cli.stderr.status")).expect("status");
    (
        text(&out.stdout),
        std::fs::read_to_string(&stderr).expect("stderr"),
        status.trim().parse().expect("a status"),
    )
}

#[test]
fn keys_where_no_repository_is_fail_naming_the_path() {
    let dir = aitbc_backup_tests::temp_dir("no-repo");
    let url = format!("file://{}", dir.path().display());
    for command in [
        &["keys", "list"][..],
        &["keys", "audit"],
        &["--json", "keys", "list"],
    ] {
        let (global, rest) = command.split_at(usize::from(command[0] == "--json"));
        let out = Command::new(binary("aitbc-backup"))
            .args(global)
            .args(["repo", "--repository", &url])
            .args(rest)
            .env_clear()
            .output()
            .expect("run");
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{command:?}: {err}");
        assert!(
            err.contains(&dir.path().display().to_string())
                && err.contains("holds no repository")
                && err.contains("repo init"),
            "{command:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{command:?} printed a table");
    }
    // A mistyped path is not created by reading it; a file is named as no directory.
    let typo = dir.path().join("typo/deeper");
    let out = repo_cli(
        &format!("file://{}", typo.display()),
        &["keys", "audit"],
        None,
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("holds no repository"));
    assert!(
        !dir.path().join("typo").exists(),
        "reading created the path"
    );
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").expect("write");
    let out = repo_cli(&format!("file://{}", file.display()), &["ls"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("is not a directory"),
        "{}",
        text(&out.stderr)
    );
    std::fs::remove_file(&file).expect("remove");
    // An unencrypted repository has no keys: an empty list, and a note saying why.
    let out = repo_cli(&url, &["init"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = repo_cli(&url, &["keys", "list"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("not encrypted"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_closed_pipe_ends_the_cli_quietly_with_141() {
    let dir = aitbc_backup_tests::temp_dir("pipe");
    let root = dir.path().join("repository");
    let url = format!("file://{}", root.display());

    // Four hundred backups, so that `repo ls --json` prints far more than a pipe holds.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let id = runtime.block_on(async {
        let cancel = CancellationToken::new();
        let storage = Storage::new(
            Backend::Local(LocalStorage::new(&root).expect("local storage")),
            test_limits(),
        );
        let repo = Repository::init(storage, ChunkerParams::default(), None, &cancel)
            .await
            .expect("init");
        for i in 0..400 {
            let request = BackupRequest {
                name: format!("stream-{i}"),
                stream: "raw".into(),
                ..Default::default()
            };
            let data = std::io::Cursor::new(format!("backup {i}\n").into_bytes());
            aitbc_backup_repository::backup(&repo, data, request, Arc::default(), &cancel)
                .await
                .expect("backup");
        }
        // One long stream, for `repo cat` to standard output.
        let lines: String = (0..400_000).map(|i| format!("line {i}\n")).collect();
        let request = BackupRequest {
            name: "long".into(),
            stream: "raw".into(),
            ..Default::default()
        };
        let progress = Arc::new(Progress::default());
        let data = std::io::Cursor::new(lines.into_bytes());
        aitbc_backup_repository::backup(&repo, data, request, progress, &cancel)
            .await
            .expect("backup")
            .id
    });

    // A listing may fit in the pipe's buffer and be written whole before `head` exits (then
    // the CLI ends with 0); the 3 MB stream cannot, so it meets the closed pipe (141).
    for (args, first, statuses) in [
        (
            vec!["--json", "repo", "--repository", &url, "ls"],
            "[",
            &[0, 141][..],
        ),
        (vec!["repo", "--repository", &url, "ls"], "ID", &[0, 141]),
        (
            vec!["repo", "--repository", &url, "cat", &id],
            "line 0",
            &[141],
        ),
    ] {
        let (head, stderr, status) = piped_into_head(&args, dir.path());
        assert_eq!(head.lines().count(), 1, "{args:?}: {head}");
        assert!(head.starts_with(first), "{args:?}: {head}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?} said something: {stderr}");
        assert!(statuses.contains(&status), "{args:?}: {status} {stderr}");
    }
    // Read to the end, the same listing succeeds.
    let out = repo_cli(&url, &["ls"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 402);
}

#[test]
fn cat_does_not_overwrite_a_file_without_force() {
    let dir = aitbc_backup_tests::temp_dir("cat-force");
    let url = format!("file://{}", dir.path().join("repository").display());
    let out = repo_cli(&url, &["init"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = repo_cli(&url, &["put", "db"], Some(b"the backup's bytes"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();

    let target = dir.path().join("db.dump");
    std::fs::write(&target, b"precious").expect("write");
    let path = target.to_str().expect("utf-8");
    let out = repo_cli(&url, &["cat", &id, "-o", path], None);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains(path) && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(&target).expect("read"), b"precious");

    let out = repo_cli(&url, &["cat", &id, "-o", path, "--force"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(&target).expect("read"), b"the backup's bytes");

    // A new file is written without --force, and nothing else is left beside it.
    let fresh = dir.path().join("fresh.dump");
    let out = repo_cli(
        &url,
        &["cat", &id, "-o", fresh.to_str().expect("utf-8")],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(&fresh).expect("read"), b"the backup's bytes");
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["db.dump", "fresh.dump", "repository"]);

    // --force replaces regular files only: a link, a FIFO or a directory is refused by kind
    // and left as it was (a link to a file: the file is not written either).
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    let fifo = dir.path().join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    let subdir = dir.path().join("subdir");
    std::fs::create_dir(&subdir).expect("dir");
    for (path, kind) in [
        (&link, "a symbolic link"),
        (&fifo, "a FIFO"),
        (&subdir, "a directory"),
    ] {
        let out = repo_cli(
            &url,
            &["cat", &id, "-o", path.to_str().expect("utf-8"), "--force"],
            None,
        );
        assert_eq!(out.status.code(), Some(1), "{}", path.display());
        let err = text(&out.stderr);
        assert!(
            err.contains(kind) && err.contains("standard output"),
            "{err}"
        );
    }
    assert!(
        std::fs::symlink_metadata(&link)
            .expect("link")
            .file_type()
            .is_symlink()
    );
    assert!(
        std::fs::symlink_metadata(&fifo)
            .expect("fifo")
            .file_type()
            .is_fifo()
    );
    assert!(std::fs::read_dir(&subdir).expect("dir").next().is_none());
    assert_eq!(std::fs::read(&target).expect("read"), b"the backup's bytes");
}
