//! Shared fixtures: a real server on `127.0.0.1:0` with the real default model,
//! started once per test binary on its own runtime thread, and helpers to
//! spawn the `flywheel-server` binary as a process.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::OnceLock;

use flywheel_server::Config;

pub use flywheel_server::testing::*;

/// The shared server on the real default model (default config).
pub fn real_server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let mut config = Config::default();
        let model = model_path();
        for spec in config.settings.models.values_mut() {
            spec.path = model.clone();
        }
        config.settings.limits.max_query_chars = 500;
        config.settings.rails.jailbreak.embedder_dir = embedder_dir();
        start(config)
    })
}

/// `message` with the metadata `authorization: Bearer <token>`.
pub fn authorized<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// A GGUF file with metadata only (the stub engine needs no weights):
/// `general.name` plus `extra` key/value pairs.
pub fn write_stub_model(
    path: &std::path::Path,
    name: &str,
    extra: &[(&str, candle_core::quantized::gguf_file::Value)],
) {
    use candle_core::quantized::{QTensor, gguf_file};
    let name = gguf_file::Value::String(name.into());
    let mut meta: Vec<(&str, &gguf_file::Value)> = vec![("general.name", &name)];
    meta.extend(extra.iter().map(|(k, v)| (*k, v)));
    let none: [(&str, &QTensor); 0] = [];
    flywheel_router::model_prep::write_gguf(path, &meta, &none).unwrap();
}

/// Write a stub model for `version` in `dir` and add it to `store`.
pub fn register_stub(
    store: &flywheel_router::models::store::ModelStore,
    dir: &std::path::Path,
    version: &str,
    extra: &[(&str, candle_core::quantized::gguf_file::Value)],
) {
    let file = dir.join(format!("{version}.gguf"));
    write_stub_model(&file, version, extra);
    store.add(version, &file, None).unwrap();
}

/// A stub-engine config promoting from `registry`, with `token` as admin token.
pub fn stub_config(registry: &std::path::Path, token: Option<&str>) -> Config {
    Config {
        engine: flywheel_server::config::EngineKind::Stub,
        registry_dir: Some(registry.to_path_buf()),
        admin_token: token.map(str::to_string),
        ..Config::default()
    }
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`):
/// the status and the body. Enough for JSON and for whole SSE answers.
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(body.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    (status, if chunked { dechunk(body) } else { body.to_string() })
}

/// The payload of a chunked HTTP/1.1 body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

/// The JSON payloads of an SSE body's `data:` lines (`[DONE]` as a string).
pub fn sse_data(body: &str) -> Vec<serde_json::Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap_or_else(|_| serde_json::Value::String(d.to_string())))
        .collect()
}

/// A folder holding the PyPI package `name==version` (imported as
/// `module`), installed with pip on first use and kept in the target dir's
/// scratch space.
pub fn python_package(name: &str, version: &str, module: &str) -> PathBuf {
    let scratch = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let dir = scratch.join(format!("python-{name}-{version}"));
    if dir.join(module).is_dir() {
        return dir;
    }
    let staging = tempfile::tempdir_in(scratch).unwrap();
    let out = std::process::Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-warn-script-location",
            "--target",
        ])
        .arg(staging.path())
        .arg(format!("{name}=={version}"))
        .output()
        .expect("running python3 -m pip");
    assert!(
        out.status.success(),
        "pip install {name}=={version} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Another test process may have finished first: either copy will do.
    let _ = std::fs::rename(staging.keep(), &dir);
    assert!(dir.join(module).is_dir(), "{module} missing from {}", dir.display());
    dir
}

/// Run `python3 args...` in `cwd` with `PYTHONPATH`, killed after `limit`;
/// returns stdout, panics with stderr on failure.
pub fn python(args: &[&str], cwd: &std::path::Path, pythonpath: &str, limit: std::time::Duration) -> String {
    let mut child = std::process::Command::new("python3")
        .args(args)
        .current_dir(cwd)
        .env("PYTHONPATH", pythonpath)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running python3");
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "python3 {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The workspace root (where the README is).
pub fn workspace_root() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The first Python code block of the README or a docs/ page containing `marker`, as written there.
pub fn readme_python_block(marker: &str) -> String {
    let root = workspace_root();
    let mut pages = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .flat_map(|text| {
            text.split("```python\n")
                .skip(1)
                .filter_map(|rest| rest.split("```").next().map(str::to_string))
                .collect::<Vec<_>>()
        })
        .find(|block| block.contains(marker))
        .unwrap_or_else(|| panic!("a Python block with `{marker}` in the README or docs/"))
}

/// Requests completed by a test's background clients, and a way to wait for
/// more of them (instead of sleeping and hoping traffic flowed meanwhile).
#[derive(Debug, Default)]
pub struct Progress {
    done: std::sync::atomic::AtomicUsize,
    more: tokio::sync::Notify,
}

impl Progress {
    /// One more request completed.
    pub fn tick(&self) {
        self.done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.more.notify_waiters();
    }

    /// Requests completed so far.
    pub fn count(&self) -> usize {
        self.done.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Wait until `n` more requests than now have completed (failing after
    /// 30 s without one).
    pub async fn more(&self, n: usize) {
        let target = self.count() + n;
        loop {
            let more = self.more.notified();
            tokio::pin!(more);
            more.as_mut().enable();
            if self.count() >= target {
                return;
            }
            tokio::time::timeout(std::time::Duration::from_secs(30), more)
                .await
                .expect("the background traffic stopped");
        }
    }
}

/// What `slot` of `server` serves now (`Admin.ListModels`).
pub async fn model_slot(server: &TestServer, slot: &str) -> flywheel_proto::v1::ModelSlot {
    let slots = server
        .admin()
        .await
        .list_models(flywheel_proto::v1::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .slots;
    slots.into_iter().find(|s| s.slot == slot).unwrap()
}
