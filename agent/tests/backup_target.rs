//! Backup targets against the real thing: a local directory (also on a
//! tiny full tmpfs) and a real S3 server (`s3s-fs`, installed by
//! scripts/install-deps.sh), started per test on a free port of 127.0.0.1.
//!
//! Each test keeps its files under `/tmp/corral-bktarget-test-<pid>-<n>`,
//! removed at the end (also on a panic: servers are killed and tmpfs
//! unmounted by Drop; leftovers of a killed run are swept by the next
//! one). The tmpfs test needs root.

#[path = "scratch/mod.rs"]
mod scratch;

use anyhow::{anyhow, Result};
use corral_agent::backup::target::{ObjectInfo, Target};
use corral_proto::pb;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DIR_PREFIX: &str = "corral-bktarget-test-";
const ACCESS_KEY: &str = "corral-test-access";
const SECRET_KEY: &str = "s3cr3t-Corral-Test-Value-0123";
const BUCKET: &str = "corral-backups";
/// An unreachable endpoint must fail within this.
const UNREACHABLE_BOUND: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// Fixtures.

/// A test's directory: tmpfs mounts under it unmounted, then removed.
struct TestDir {
    path: PathBuf,
    mounts: Vec<PathBuf>,
}

impl TestDir {
    fn new() -> TestDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        sweep_stale();
        let path = std::env::temp_dir().join(format!(
            "{DIR_PREFIX}{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TestDir {
            path,
            mounts: Vec::new(),
        }
    }

    /// Mounts a tmpfs of `size` at `sub`.
    fn mount_tmpfs(&mut self, sub: &str, size: &str) -> PathBuf {
        let at = self.path.join(sub);
        std::fs::create_dir_all(&at).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&at)
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "mount tmpfs (needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.mounts.push(at.clone());
        at
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg(m).status();
        }
        unmount_under(&self.path);
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Unmounts whatever is mounted under `dir` (a killed run's tmpfs).
fn unmount_under(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let dir = dir.to_string_lossy();
    for line in mounts.lines() {
        if let Some(at) = line.split(' ').nth(1) {
            if at.starts_with(&*dir) {
                let _ = Command::new("umount").arg("-l").arg(at).status();
            }
        }
    }
}

/// Removes the directories of earlier runs whose process is gone.
fn sweep_stale() {
    scratch::sweep_stale(&std::env::temp_dir(), DIR_PREFIX, unmount_under);
}

use scratch::free_port;

/// An s3s-fs server with the bucket `BUCKET`, killed when dropped.
struct S3Server {
    child: Arc<Mutex<Child>>,
    port: u16,
    root: PathBuf,
}

impl S3Server {
    fn start(dir: &Path) -> S3Server {
        let root = dir.join("s3");
        std::fs::create_dir_all(root.join(BUCKET)).unwrap();
        let bin = std::env::var_os("CORRAL_S3S_FS")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
                PathBuf::from(home).join(".cargo/bin/s3s-fs")
            });
        for _ in 0..5 {
            let port = free_port();
            let log = std::fs::File::create(dir.join(format!("s3s-fs-{port}.log"))).unwrap();
            let child = Command::new(&bin)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                .arg(&root)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("starting {} (scripts/install-deps.sh): {e}", bin.display())
                });
            let server = S3Server {
                child: Arc::new(Mutex::new(child)),
                port,
                root: root.clone(),
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = server.child.lock().unwrap().try_wait() {
                    break; // lost the port to someone else: try another
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return server;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("s3s-fs did not start (see {}/s3s-fs-*.log)", dir.display());
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn kill(&self) {
        let mut c = self.child.lock().unwrap();
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Multipart uploads s3s-fs still keeps (its `.upload*` files).
    fn pending_uploads(&self) -> Vec<String> {
        std::fs::read_dir(&self.root)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with(".upload"))
            .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn s3_desc(endpoint: &str) -> pb::BackupTarget {
    pb::BackupTarget {
        name: "offsite".into(),
        kind: "s3".into(),
        path: "cluster-a".into(),
        endpoint: endpoint.into(),
        bucket: BUCKET.into(),
        region: String::new(),
        access_key_id: ACCESS_KEY.into(),
        secret_access_key: SECRET_KEY.into(),
        allow_http: true,
        scope: String::new(),
    }
}

fn local_target(dir: &Path) -> Target {
    let d = pb::BackupTarget {
        name: "here".into(),
        kind: "local".into(),
        path: dir.to_string_lossy().into(),
        ..Default::default()
    };
    Target::open(&d, Path::new("/nonexistent")).unwrap()
}

/// Every file under `dir` (relative paths).
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_string_lossy().to_string());
            }
        }
    }
    out.sort();
    out
}

/// Writes `len` pseudo-random bytes in small writes of varying size;
/// returns their sha256.
fn produce(w: &mut dyn Write, len: usize) -> std::io::Result<String> {
    let mut block = vec![0u8; 64 << 10];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in block.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let mut sha = Sha256::new();
    let mut written = 0;
    let mut i = 0usize;
    while written < len {
        let n = (1 + (i * 7919) % 4000).min(len - written);
        let start = (i * 131) % (block.len() - 4096);
        let piece = &mut block[start..start + n];
        piece[0] = i as u8; // no two blocks alike
        w.write_all(piece)?;
        sha.update(&*piece);
        written += n;
        i += 1;
    }
    Ok(hex::encode(sha.finalize()))
}

fn sha_of_reader(r: &mut dyn Read) -> Result<(String, u64)> {
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; 100_000];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok((hex::encode(sha.finalize()), total));
        }
        sha.update(&buf[..n]);
        total += n as u64;
    }
}

fn names(list: &[ObjectInfo]) -> Vec<&str> {
    list.iter().map(|o| o.name.as_str()).collect()
}

fn assert_no_secret(text: &str) {
    assert!(!text.contains(SECRET_KEY), "the secret leaked: {text}");
}

// ---------------------------------------------------------------------------
// Shared scenarios.

const BIG: usize = 40_000_000;

async fn round_trip(t: &Target) {
    let started = Instant::now();
    let (sha, stored) = t
        .put_stream("db1/2024/full.corral", |w| Ok(produce(w, BIG)?))
        .await
        .unwrap();
    assert_eq!(stored, BIG as u64);
    eprintln!(
        "{}: put {BIG} bytes in {:?}",
        t.describe(),
        started.elapsed()
    );
    let (_, n) = t
        .put_stream("db1/2024/wal-0001", |w| Ok(w.write_all(b"hello wal")?))
        .await
        .unwrap();
    assert_eq!(n, 9);
    let (_, n) = t.put_stream("db2/empty", |_| Ok(())).await.unwrap();
    assert_eq!(n, 0);
    let (_, n) = t
        .put_stream("db10/x", |w| Ok(w.write_all(b"x")?))
        .await
        .unwrap();
    assert_eq!(n, 1);

    let all = t.list("").await.unwrap();
    assert_eq!(
        names(&all),
        [
            "db1/2024/full.corral",
            "db1/2024/wal-0001",
            "db10/x",
            "db2/empty"
        ]
    );
    assert_eq!(all[0].size, BIG as u64);
    assert_eq!(all[1].size, 9);
    assert_eq!(all[3].size, 0);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    for o in &all {
        assert!((now_ms - o.modified_ms).abs() < 600_000, "{o:?}");
    }
    assert_eq!(names(&t.list("db1").await.unwrap()).len(), 3);
    assert_eq!(names(&t.list("db1/").await.unwrap()).len(), 2);
    assert_eq!(
        names(&t.list("db1/2024/w").await.unwrap()),
        ["db1/2024/wal-0001"]
    );
    assert!(t.list("nothing/here").await.unwrap().is_empty());

    // Read back whole, through both interfaces.
    let started = Instant::now();
    let (got, len) = t
        .get_stream("db1/2024/full.corral", sha_of_reader)
        .await
        .unwrap();
    assert_eq!((got.as_str(), len), (sha.as_str(), BIG as u64));
    eprintln!(
        "{}: got {BIG} bytes in {:?}",
        t.describe(),
        started.elapsed()
    );
    let mut chunks = t.get_chunks("db1/2024/full.corral").await.unwrap();
    let mut sha2 = Sha256::new();
    let mut len = 0;
    while let Some(c) = chunks.next().await {
        let c = c.unwrap();
        len += c.len();
        sha2.update(&c);
    }
    assert_eq!((hex::encode(sha2.finalize()), len), (sha.clone(), BIG));
    let small = t
        .get_stream("db1/2024/wal-0001", |r| {
            let mut s = String::new();
            r.read_to_string(&mut s)?;
            Ok(s)
        })
        .await
        .unwrap();
    assert_eq!(small, "hello wal");
    // A consumer stopping early stops the download.
    let first = t
        .get_stream("db1/2024/full.corral", |r| {
            let mut b = [0u8; 10];
            r.read_exact(&mut b)?;
            Ok(b)
        })
        .await
        .unwrap();
    assert_eq!(first.len(), 10);

    // A missing object is named.
    let e = format!(
        "{:#}",
        t.get_stream("db1/missing", sha_of_reader)
            .await
            .unwrap_err()
    );
    assert!(
        e.contains(&t.describe()) && e.contains("db1/missing"),
        "{e}"
    );
    assert!(t.get_chunks("db1/missing").await.is_err());

    assert_eq!(t.delete_prefix("db1/").await.unwrap(), 2);
    assert_eq!(t.delete_prefix("db1/").await.unwrap(), 0);
    assert_eq!(names(&t.list("").await.unwrap()), ["db10/x", "db2/empty"]);
    assert_eq!(t.delete_prefix("db").await.unwrap(), 2);
    assert!(t.list("").await.unwrap().is_empty());
    assert!(t.delete_prefix("").await.is_err());
}

/// `produce` fails after `after` bytes: nothing is stored.
async fn produce_fails(t: &Target, after: usize) {
    let e = t
        .put_stream("db1/broken", move |w| {
            produce(w, after)?;
            Err::<(), _>(anyhow!("the dump failed half-way"))
        })
        .await
        .unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("the dump failed half-way"), "{e}");
    assert!(e.contains(&t.describe()), "{e}");
    assert!(t.list("").await.unwrap().is_empty());
    // And a panicking producer stores nothing either.
    let e = t
        .put_stream("db1/panicked", move |w| {
            produce(w, after)?;
            panic!("producer panics");
            #[allow(unreachable_code)]
            Ok(())
        })
        .await
        .unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("stopped") && e.contains(&t.describe()), "{e}");
    assert!(t.list("").await.unwrap().is_empty());
}

// ---------------------------------------------------------------------------
// Local.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_round_trip() {
    let dir = TestDir::new();
    let root = dir.path.join("backups");
    let t = local_target(&root);
    round_trip(&t).await;
    // Created 0700.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&root).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    assert!(files_under(&root).is_empty(), "{:?}", files_under(&root));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_produce_error_leaves_nothing() {
    let dir = TestDir::new();
    let root = dir.path.join("backups");
    let t = local_target(&root);
    produce_fails(&t, 3_000_000).await;
    assert!(files_under(&root).is_empty(), "{:?}", files_under(&root));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_full_filesystem() {
    let mut dir = TestDir::new();
    let full = dir.mount_tmpfs("full", "1m");
    let t = local_target(&full.join("backups"));
    let writes_failed = Arc::new(AtomicUsize::new(0));
    let seen = writes_failed.clone();
    let started = Instant::now();
    let e = t
        .put_stream("db1/full.corral", move |w| {
            // Swallows the I/O error into its own: the target still reports
            // the storage's cause.
            produce(w, 4_000_000).map_err(|e| {
                seen.fetch_add(1, Ordering::SeqCst);
                anyhow!("dump aborted ({})", e.kind())
            })
        })
        .await
        .unwrap_err();
    let e = format!("{e:#}");
    eprintln!("full filesystem: {e} ({:?})", started.elapsed());
    assert!(e.contains("No space left on device"), "{e}");
    assert!(e.contains(&t.describe()), "{e}");
    assert_eq!(writes_failed.load(Ordering::SeqCst), 1);
    assert!(t.list("").await.unwrap().is_empty());
    assert!(files_under(&full).is_empty(), "{:?}", files_under(&full));
    // Space is back: a small object fits.
    t.put_stream("db1/small", |w| Ok(w.write_all(b"fits")?))
        .await
        .unwrap();
    assert_eq!(names(&t.list("").await.unwrap()), ["db1/small"]);
}

// ---------------------------------------------------------------------------
// S3.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_round_trip() {
    let dir = TestDir::new();
    let server = S3Server::start(&dir.path);
    let t = Target::open(&s3_desc(&server.endpoint()), Path::new("/x")).unwrap();
    assert_eq!(
        t.describe(),
        format!(
            "offsite (s3 {} bucket {BUCKET} prefix cluster-a)",
            server.endpoint()
        )
    );
    assert_no_secret(&format!("{t:?} {}", t.describe()));
    round_trip(&t).await;
    assert!(
        server.pending_uploads().is_empty(),
        "{:?}",
        server.pending_uploads()
    );
    // Keys live under the prefix; another prefix sees none of them.
    t.put_stream("k", |w| Ok(w.write_all(b"v")?)).await.unwrap();
    assert!(server.root.join(BUCKET).join("cluster-a/k").is_file());
    let mut other = s3_desc(&server.endpoint());
    other.path = "cluster-b/".into();
    let other = Target::open(&other, Path::new("/x")).unwrap();
    assert!(other.list("").await.unwrap().is_empty());
    assert_eq!(other.delete_prefix("k").await.unwrap(), 0);
    assert_eq!(names(&t.list("").await.unwrap()), ["k"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_produce_error_aborts_the_upload() {
    let dir = TestDir::new();
    let server = S3Server::start(&dir.path);
    let t = Target::open(&s3_desc(&server.endpoint()), Path::new("/x")).unwrap();
    // 20 MB: the multipart upload has begun (parts of 8 MiB) when it fails.
    produce_fails(&t, 20_000_000).await;
    assert!(
        server.pending_uploads().is_empty(),
        "{:?}",
        server.pending_uploads()
    );
    // Failing inside the first part: nothing was sent at all.
    produce_fails(&t, 1000).await;
    assert!(
        server.pending_uploads().is_empty(),
        "{:?}",
        server.pending_uploads()
    );
    assert!(files_under(&server.root.join(BUCKET)).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_server_dying_mid_upload_stops_the_producer() {
    let dir = TestDir::new();
    let server = S3Server::start(&dir.path);
    let t = Target::open(&s3_desc(&server.endpoint()), Path::new("/x")).unwrap();
    let child = server.child.clone();
    let port = server.port;
    let started = Instant::now();
    let produced = Arc::new(Mutex::new(None));
    let seen = produced.clone();
    let e = t
        .put_stream("db1/big", move |w| {
            let chunk = vec![7u8; 64 << 10];
            let mut written = 0usize;
            let mut killed_at = None;
            loop {
                if written >= 40 << 20 && killed_at.is_none() {
                    let mut c = child.lock().unwrap();
                    let _ = c.kill();
                    let _ = c.wait();
                    killed_at = Some(Instant::now());
                }
                if let Err(e) = w.write_all(&chunk) {
                    *seen.lock().unwrap() = Some((e.to_string(), killed_at.map(|k| k.elapsed())));
                    return Err(e.into());
                }
                written += chunk.len();
                assert!(written < 2 << 30, "the writer never failed");
            }
            #[allow(unreachable_code)]
            Ok(())
        })
        .await
        .unwrap_err();
    let e = format!("{e:#}");
    let (io_error, after_kill) = produced.lock().unwrap().clone().unwrap();
    eprintln!(
        "server killed: producer saw {io_error:?} {after_kill:?} later; put_stream: {e} ({:?})",
        started.elapsed()
    );
    let after_kill = after_kill.expect("failed before the kill");
    assert!(after_kill < UNREACHABLE_BOUND, "{after_kill:?}");
    for text in [&e, &io_error] {
        assert!(text.contains(&t.describe()), "{text}");
        assert!(
            text.contains("onnection refused") || text.contains("onnection reset"),
            "no root cause in {text}"
        );
        assert!(!text.contains("the upload stopped"), "{text}");
        assert_no_secret(text);
    }
    // Nothing listens any more.
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_unreachable_endpoint_fails_fast() {
    // Connection refused: nobody listens on the port.
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let t = Target::open(&s3_desc(&endpoint), Path::new("/x")).unwrap();
    let started = Instant::now();
    let e = format!("{:#}", t.list("").await.unwrap_err());
    eprintln!("refused list: {e} ({:?})", started.elapsed());
    assert!(started.elapsed() < UNREACHABLE_BOUND);
    assert!(e.contains(&t.describe()), "{e}");
    assert!(e.contains("Connection refused"), "{e}");
    assert!(e.contains("[backup.targets.offsite]"), "{e}");
    assert_no_secret(&e);
    let started = Instant::now();
    let e = format!(
        "{:#}",
        t.put_stream("db1/x", |w| Ok(produce(w, 12_000_000)?))
            .await
            .unwrap_err()
    );
    eprintln!("refused put: {e} ({:?})", started.elapsed());
    assert!(started.elapsed() < UNREACHABLE_BOUND);
    assert!(
        e.contains(&t.describe()) && e.contains("Connection refused"),
        "{e}"
    );
    assert_no_secret(&e);

    // A server that accepts connections and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let t = Target::open(&s3_desc(&endpoint), Path::new("/x")).unwrap();
    let (list, put, get) = tokio::join!(
        async {
            let started = Instant::now();
            (t.list("").await.unwrap_err(), started.elapsed())
        },
        async {
            let started = Instant::now();
            let r = t.put_stream("db1/x", |w| Ok(w.write_all(b"small")?)).await;
            (r.unwrap_err(), started.elapsed())
        },
        async {
            let started = Instant::now();
            let r = t.get_stream("db1/x", sha_of_reader).await;
            (r.unwrap_err(), started.elapsed())
        },
    );
    for (what, (e, took)) in [("list", list), ("put", put), ("get", get)] {
        let e = format!("{e:#}");
        eprintln!("silent {what}: {e} ({took:?})");
        assert!(
            took < UNREACHABLE_BOUND + Duration::from_secs(1),
            "{what} took {took:?}"
        );
        assert!(e.contains(&t.describe()), "{e}");
        assert!(e.contains("in time") || e.contains("within"), "{e}");
        assert_no_secret(&e);
    }
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_wrong_credentials_and_missing_bucket_are_explained() {
    let dir = TestDir::new();
    let server = S3Server::start(&dir.path);

    let mut d = s3_desc(&server.endpoint());
    d.secret_access_key = "wrong-secret-value-XYZ".into();
    let t = Target::open(&d, Path::new("/x")).unwrap();
    let e = format!("{:#}", t.list("").await.unwrap_err());
    eprintln!("wrong secret, list: {e}");
    assert!(e.contains(&t.describe()), "{e}");
    assert!(e.contains("refused the credentials"), "{e}");
    assert!(e.contains("[backup.targets.offsite]"), "{e}");
    assert!(!e.contains("wrong-secret-value-XYZ"), "{e}");
    let e = format!(
        "{:#}",
        t.put_stream("db1/x", |w| Ok(w.write_all(b"data")?))
            .await
            .unwrap_err()
    );
    eprintln!("wrong secret, put: {e}");
    assert!(e.contains("refused the credentials"), "{e}");
    assert!(!e.contains("wrong-secret-value-XYZ"), "{e}");

    let mut d = s3_desc(&server.endpoint());
    d.access_key_id = "nobody".into();
    let t = Target::open(&d, Path::new("/x")).unwrap();
    let e = format!("{:#}", t.list("").await.unwrap_err());
    eprintln!("wrong access key: {e}");
    assert!(e.contains("refused the credentials"), "{e}");
    assert_no_secret(&e);

    let mut d = s3_desc(&server.endpoint());
    d.bucket = "no-such-bucket".into();
    let t = Target::open(&d, Path::new("/x")).unwrap();
    let e = format!("{:#}", t.list("").await.unwrap_err());
    eprintln!("missing bucket, list: {e}");
    assert!(e.contains(&t.describe()), "{e}");
    assert!(
        e.contains("no-such-bucket") && e.contains("must exist"),
        "{e}"
    );
    assert!(!e.contains("credentials ("), "{e}");
    // (s3s-fs creates a missing bucket's directory on a put, where S3
    // answers NoSuchBucket: only reads are checked here.)
    let e = format!("{:#}", t.delete_prefix("db1/").await.unwrap_err());
    assert!(e.contains("must exist"), "{e}");
    assert_no_secret(&e);
    assert!(
        server.pending_uploads().is_empty(),
        "{:?}",
        server.pending_uploads()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_server_dying_mid_download_fails_the_consumer() {
    let dir = TestDir::new();
    let server = S3Server::start(&dir.path);
    let t = Target::open(&s3_desc(&server.endpoint()), Path::new("/x")).unwrap();
    t.put_stream("db1/big", |w| Ok(produce(w, 30_000_000)?))
        .await
        .unwrap();
    let child = server.child.clone();
    let seen = Arc::new(Mutex::new(None));
    let seen2 = seen.clone();
    let started = Instant::now();
    let e = t
        .get_stream("db1/big", move |r| {
            let mut buf = vec![0u8; 64 << 10];
            let mut read = 0usize;
            loop {
                if read >= 1 << 20 {
                    let mut c = child.lock().unwrap();
                    if c.try_wait().unwrap().is_none() {
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                }
                match r.read(&mut buf) {
                    Ok(0) => return Ok(read),
                    Ok(n) => read += n,
                    Err(e) => {
                        *seen2.lock().unwrap() = Some((e.to_string(), read));
                        return Err(anyhow!("restore failed: {e}"));
                    }
                }
            }
        })
        .await
        .unwrap_err();
    let e = format!("{e:#}");
    let (io_error, read) = seen
        .lock()
        .unwrap()
        .clone()
        .expect("the consumer saw no error");
    eprintln!(
        "killed mid-download after {read} bytes: consumer saw {io_error:?}; get_stream: {e} ({:?})",
        started.elapsed()
    );
    assert!(read < 30_000_000);
    assert!(started.elapsed() < UNREACHABLE_BOUND);
    for text in [&e, &io_error] {
        assert!(
            text.contains(&t.describe()) && text.contains("db1/big"),
            "{text}"
        );
        assert_no_secret(text);
    }
}
