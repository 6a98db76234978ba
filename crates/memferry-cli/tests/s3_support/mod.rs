//! Real S3 servers for the tests: moto server (in memory, checks
//! conditional writes, not signatures) and s3s-fs 0.14.1 (files on disk,
//! checks SigV4), installed on first use by tests/tools/install-s3-servers.sh
//! into the git-ignored `.tools/` (cached afterwards), started on 127.0.0.1
//! at free ports. Servers die with their [`Server`] value.
//!
//! These tests never skip: a server that cannot be installed or started
//! fails the test with the reason.
//!
//! [`Server::start_moto_with_auth`] starts a moto that checks signatures
//! too (an IAM user and access key created first, then moto's
//! `/moto-api/reset-auth` switches authentication on), and [`proxy`] puts a
//! fault-injecting proxy in front of either server.

#![allow(dead_code)]

pub mod proxy;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use memferry::storage::s3::{ObjectClient, S3Config, S3Overrides};

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Moto,
    S3sFs,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Moto, Kind::S3sFs];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Moto => "moto",
            Kind::S3sFs => "s3s-fs",
        }
    }

    /// Whether the server checks request signatures.
    pub fn checks_signatures(self) -> bool {
        self == Kind::S3sFs
    }
}

pub const BUCKET: &str = "memferry-test";
pub const ACCESS_KEY: &str = "memferrytestkey";
pub const SECRET_KEY: &str = "memferry-test-secret-Zq81";

/// Paths of the installed servers.
pub struct Tools {
    pub moto: PathBuf,
    pub s3s_fs: PathBuf,
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

/// Installs the servers once per test binary (the script caches and locks).
pub fn tools() -> &'static Tools {
    static TOOLS: OnceLock<Tools> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let script = repo_root().join("tests/tools/install-s3-servers.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed ({}): the S3 tests need moto and s3s-fs; see its output above",
            script.display(),
            out.status
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(PathBuf::from)
                .unwrap_or_else(|| panic!("install script did not report {k}: {text}"))
        };
        Tools {
            moto: get("moto_server"),
            s3s_fs: get("s3s_fs"),
        }
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A running server with one bucket.
pub struct Server {
    pub kind: Kind,
    pub port: u16,
    child: Option<Child>,
    data: Option<tempfile::TempDir>,
    /// Credentials other than the fixed test ones (moto with auth on).
    credentials: Option<(String, String)>,
}

impl Server {
    /// Starts a server of `kind` with the test bucket created.
    pub fn start(kind: Kind) -> Self {
        let t = tools();
        for _attempt in 0..3 {
            let port = free_port();
            let data = match kind {
                Kind::Moto => None,
                Kind::S3sFs => {
                    let dir = tempfile::tempdir().expect("s3s-fs data dir");
                    std::fs::create_dir(dir.path().join(BUCKET)).expect("bucket dir");
                    Some(dir)
                }
            };
            let server = match (&data, kind) {
                (_, Kind::Moto) => format!("'{}' -H 127.0.0.1 -p {port}", t.moto.display()),
                (Some(dir), _) => format!(
                    "'{}' --host 127.0.0.1 --port {port} --access-key {ACCESS_KEY} --secret-key {SECRET_KEY} '{}'",
                    t.s3s_fs.display(),
                    dir.path().display()
                ),
                (None, _) => unreachable!(),
            };
            // The server runs under a watchdog shell in its own process
            // group: it dies with the test process (shared servers live in
            // statics, which are never dropped) and kill() takes both down.
            let script = format!(
                "{server} >/dev/null 2>&1 & s=$!; while kill -0 {me} 2>/dev/null && kill -0 $s 2>/dev/null; do sleep 0.3; done; kill -9 $s 2>/dev/null",
                me = std::process::id()
            );
            use std::os::unix::process::CommandExt;
            let child = Command::new("sh")
                .args(["-c", &script])
                .process_group(0)
                .stdin(Stdio::null())
                .spawn()
                .expect("starting the server");
            let mut s = Server {
                kind,
                port,
                child: Some(child),
                data,
                credentials: None,
            };
            if s.wait_ready(Duration::from_secs(60)) {
                if kind == Kind::Moto {
                    s.create_bucket_unsigned();
                }
                return s;
            }
            s.kill();
        }
        panic!("{} did not start on 127.0.0.1", kind.name());
    }

    fn wait_ready(&mut self, limit: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Some(c) = &mut self.child
                && let Ok(Some(_)) = c.try_wait()
            {
                return false;
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// moto accepts unsigned requests: create the bucket with a bare PUT.
    fn create_bucket_unsigned(&self) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        write!(
            s,
            "PUT /{BUCKET} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .expect("write");
        let mut line = String::new();
        BufReader::new(&mut s).read_line(&mut line).expect("read");
        assert!(line.contains(" 200"), "creating the bucket on moto: {line}");
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }

    /// Starts a dedicated moto server that checks SigV4 signatures like
    /// AWS: while moto still accepts anything, an IAM user with an
    /// allow-all policy and an access key is created (IAM query API, the
    /// service named by a dummy credential scope) and the bucket made; then
    /// `POST /moto-api/reset-auth` with `0` makes every later request need
    /// valid credentials of that user ([`Self::access_key`],
    /// [`Self::secret_key`]).
    pub fn start_moto_with_auth() -> Self {
        let mut s = Server::start(Kind::Moto);
        let iam = [
            (
                "Authorization",
                "AWS4-HMAC-SHA256 Credential=AKIAMEMFERRYSETUP000/20240101/us-east-1/iam/aws4_request, SignedHeaders=host, Signature=0",
            ),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ];
        let form = |action: &str, extra: &str| {
            format!("Action={action}&Version=2010-05-08&UserName=memferry-test{extra}")
        };
        let (status, body) = s.http("POST", "/", &iam, &form("CreateUser", ""));
        assert!(status.contains(" 200"), "moto CreateUser: {status} {body}");
        let policy = "%7B%22Version%22%3A%222012-10-17%22%2C%22Statement%22%3A%5B%7B%22Effect%22%3A%22Allow%22%2C%22Action%22%3A%22%2A%22%2C%22Resource%22%3A%22%2A%22%7D%5D%7D";
        let (status, body) = s.http(
            "POST",
            "/",
            &iam,
            &form(
                "PutUserPolicy",
                &format!("&PolicyName=all&PolicyDocument={policy}"),
            ),
        );
        assert!(
            status.contains(" 200"),
            "moto PutUserPolicy: {status} {body}"
        );
        let (status, body) = s.http("POST", "/", &iam, &form("CreateAccessKey", ""));
        assert!(
            status.contains(" 200"),
            "moto CreateAccessKey: {status} {body}"
        );
        let field = |name: &str| {
            body.split(&format!("<{name}>"))
                .nth(1)
                .and_then(|rest| rest.split(&format!("</{name}>")).next())
                .unwrap_or_else(|| panic!("no {name} in moto's answer: {body}"))
                .to_string()
        };
        s.credentials = Some((field("AccessKeyId"), field("SecretAccessKey")));
        let (status, body) = s.http(
            "POST",
            "/moto-api/reset-auth",
            &[("Content-Type", "text/plain")],
            "0",
        );
        assert!(status.contains(" 200"), "moto reset-auth: {status} {body}");
        // From now on an unsigned request is refused.
        let (status, _) = s.http("GET", &format!("/{BUCKET}"), &[], "");
        assert!(
            !status.contains(" 200"),
            "moto still answers unsigned requests after reset-auth: {status}"
        );
        s
    }

    /// One plain HTTP/1.1 request (`Connection: close`): the status line
    /// and the body.
    fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (String, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.port,
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        s.write_all(req.as_bytes()).expect("write");
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("read");
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        (
            head.lines().next().unwrap_or("").to_string(),
            body.to_string(),
        )
    }

    /// Whether this server checks request signatures.
    pub fn checks_signatures(&self) -> bool {
        self.kind.checks_signatures() || self.credentials.is_some()
    }

    /// The access key id clients of this server use.
    pub fn access_key(&self) -> String {
        self.credentials
            .as_ref()
            .map_or_else(|| ACCESS_KEY.to_string(), |c| c.0.clone())
    }

    /// The secret access key clients of this server use.
    pub fn secret_key(&self) -> String {
        self.credentials
            .as_ref()
            .map_or_else(|| SECRET_KEY.to_string(), |c| c.1.clone())
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The AWS environment a client of this server needs.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", self.access_key()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }

    /// A memferry command with this server's environment (and no stray AWS
    /// or MEMFERRY variables from the caller).
    pub fn command(&self) -> Command {
        let mut c = crate::common::command();
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("AWS_") {
                c.env_remove(k);
            }
        }
        for (k, v) in self.env() {
            c.env(k, v);
        }
        c
    }

    /// The library's configuration for this server: its endpoint and this
    /// server's credentials, path-style plain HTTP, at most 2 retries
    /// within 5 s.
    pub fn s3_config(&self) -> S3Config {
        S3Config {
            endpoint: Some(self.endpoint()),
            access_key_id: Some(self.access_key()),
            secret_access_key: Some(memferry::storage::s3::Secret::new(self.secret_key())),
            path_style: true,
            allow_http: true,
            retry: memferry::storage::s3::RetryPolicy {
                max_retries: 2,
                total: Duration::from_secs(5),
                ..Default::default()
            },
            ..S3Config::default()
        }
    }

    /// A library client on this server (for listing, corrupting, cleaning).
    pub fn client(&self) -> ObjectClient {
        let _ = S3Overrides::default();
        ObjectClient::new(&self.s3_config(), BUCKET).expect("client")
    }

    /// A fresh prefix for one test.
    pub fn url(&self, test: &str) -> String {
        format!("s3://{BUCKET}/{}-{}", test, unique())
    }

    /// Every key under the prefix of `url`.
    pub fn keys(&self, url: &str) -> Vec<String> {
        let prefix = url
            .strip_prefix(&format!("s3://{BUCKET}/"))
            .expect("our bucket");
        let mut keys: Vec<String> = self
            .client()
            .list(&format!("{prefix}/"))
            .expect("list")
            .into_iter()
            .map(|o| o.key)
            .collect();
        keys.sort();
        keys
    }

    /// Deletes everything under `url` and checks nothing is left.
    pub fn clean(&self, url: &str) {
        let keys = self.keys(url);
        self.client().delete_many(&keys).expect("delete");
        assert!(self.keys(url).is_empty(), "objects left under {url}");
    }

    /// Kills the server now.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", c.id())])
                .status();
            let _ = c.kill();
            let _ = c.wait();
            // Wait until the port is closed: the server is really gone.
            let t = Instant::now();
            while TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && t.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        drop(self.data.take());
    }
}

fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{:x}{:x}-{}",
        t & 0xffff_ffff,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// One shared server of each kind per test binary.
pub fn shared(kind: Kind) -> &'static Server {
    static MOTO: OnceLock<Server> = OnceLock::new();
    static S3S: OnceLock<Server> = OnceLock::new();
    match kind {
        Kind::Moto => MOTO.get_or_init(|| Server::start(Kind::Moto)),
        Kind::S3sFs => S3S.get_or_init(|| Server::start(Kind::S3sFs)),
    }
}

/// Runs `f` on the shared server of every kind in turn (each announced on
/// stderr as `== NAME`).
pub fn each_server(f: impl Fn(&Server)) {
    for kind in Kind::ALL {
        eprintln!("== {}", kind.name());
        f(shared(kind));
    }
}
