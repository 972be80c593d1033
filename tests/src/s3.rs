//! S3-compatible servers: s3s-fs (SigV4, checksums and conditional writes enforced), moto
//! (for what s3s-fs lacks: SSE echo, versioning, object lock) and Ceph radosgw (an object lock
//! enforced as AWS does: moto lets anyone shorten a COMPLIANCE lock).

use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::process::{Service, Spec};

pub const BUCKET: &str = "aitbc-test";
pub const REGION: &str = "us-east-1";

pub struct S3Server {
    pub port: u16,
    pub access_key: String,
    pub secret_key: String,
    pub bucket: String,
    /// s3s-fs only: the directory holding the buckets.
    pub root: Option<PathBuf>,
    service: Service,
    _dir: tempfile::TempDir,
}

fn random_key(len: usize) -> String {
    use rand::Rng;
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

impl S3Server {
    /// s3s-fs with one bucket, [`BUCKET`].
    pub fn s3s_fs() -> S3Server {
        let dir = crate::temp_dir("s3s");
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join(BUCKET)).expect("create bucket directory");
        let port = crate::free_port();
        let (access_key, secret_key) = (random_key(20), random_key(40));
        let service = Service::spawn(Spec {
            name: "s3s-fs",
            program: &crate::tool("bin/s3s-fs"),
            args: vec![
                "--host".into(),
                "127.0.0.1".into(),
                "--port".into(),
                port.to_string(),
                "--access-key".into(),
                access_key.clone(),
                "--secret-key".into(),
                secret_key.clone(),
                root.display().to_string(),
            ],
            env: vec![],
            user: None,
            cwd: Some(dir.path()),
            log: dir.path().join("s3s-fs.log"),
            stop_signal: Signal::SIGTERM,
        });
        let ready = crate::wait_until(Duration::from_secs(20), || crate::port_open(port));
        service.expect_ready(ready, "listening");
        S3Server {
            port,
            access_key,
            secret_key,
            bucket: BUCKET.to_owned(),
            root: Some(root),
            service,
            _dir: dir,
        }
    }

    /// moto in server mode, with [`BUCKET`] created through the S3 API.
    pub fn moto() -> S3Server {
        let dir = crate::temp_dir("moto");
        let port = crate::free_port();
        let service = Service::spawn(Spec {
            name: "moto_server",
            program: &crate::tool("venv/bin/moto_server"),
            args: vec![
                "-H".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
            ],
            env: vec![],
            user: None,
            cwd: Some(dir.path()),
            log: dir.path().join("moto.log"),
            stop_signal: Signal::SIGTERM,
        });
        let ready = crate::wait_until(Duration::from_secs(30), || crate::port_open(port));
        service.expect_ready(ready, "listening");
        let server = S3Server {
            port,
            access_key: "testing".into(),
            secret_key: "testing".into(),
            bucket: BUCKET.to_owned(),
            root: None,
            service,
            _dir: dir,
        };
        let out = server.aws(&["s3api", "create-bucket", "--bucket", BUCKET]);
        assert!(
            out.status.success(),
            "create bucket on moto: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        server
    }

    /// Ceph radosgw on a one-node cluster in memory (`scripts/rgw.sh`), with [`BUCKET`]
    /// created with Object Lock (and so versioning) enabled. Starts in 1-4 s.
    pub fn rgw() -> S3Server {
        let dir = crate::temp_dir("rgw");
        let port = crate::free_port();
        let (access_key, secret_key) = (random_key(20), random_key(40));
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/rgw.sh");
        let cluster = dir.path().join("cluster");
        // The script stops its daemons on SIGTERM (and they get SIGTERM if it dies).
        let mut service = Service::spawn(Spec {
            name: "rgw.sh",
            program: &script,
            args: vec![cluster.display().to_string(), port.to_string()],
            env: vec![
                ("RGW_ACCESS_KEY".into(), access_key.clone()),
                ("RGW_SECRET_KEY".into(), secret_key.clone()),
            ],
            user: None,
            cwd: Some(dir.path()),
            log: dir.path().join("rgw.log"),
            stop_signal: Signal::SIGTERM,
        });
        let ready = crate::wait_until(Duration::from_secs(60), || {
            cluster.join("ready").exists() || service.try_exit().is_some()
        }) && cluster.join("ready").exists();
        service.expect_ready(ready, "ready (is Ceph installed? run scripts/setup.sh)");
        let server = S3Server {
            port,
            access_key,
            secret_key,
            bucket: BUCKET.to_owned(),
            root: None,
            service,
            _dir: dir,
        };
        server.create_locked_bucket(BUCKET);
        server
    }

    /// Creates `bucket` with versioning and Object Lock enabled (moto, radosgw).
    pub fn create_locked_bucket(&self, bucket: &str) {
        let out = self.aws(&[
            "s3api",
            "create-bucket",
            "--bucket",
            bucket,
            "--object-lock-enabled-for-bucket",
        ]);
        assert!(
            out.status.success(),
            "create locked bucket: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Environment for the product's daemons and CLI to reach a repository on this server.
    pub fn repository_env(&self) -> Vec<(String, String)> {
        let mut env = self.client_env();
        env.extend([
            (
                "AITBC_BACKUP_REPOSITORY__S3_ENDPOINT".into(),
                self.endpoint(),
            ),
            (
                "AITBC_BACKUP_REPOSITORY__S3_PATH_STYLE".into(),
                "true".into(),
            ),
        ]);
        env
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Environment for an S3 client of this server (AWS SDK and awscli variable names).
    pub fn client_env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret_key.clone()),
            ("AWS_REGION".into(), REGION.into()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ]
    }

    /// Runs the venv's awscli against this server.
    pub fn aws(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(crate::tool("venv/bin/aws"))
            .args(["--endpoint-url", &self.endpoint()])
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", std::env::temp_dir())
            .envs(self.client_env())
            .output()
            .expect("run aws")
    }

    pub fn pid(&self) -> u32 {
        self.service.pid()
    }
}
