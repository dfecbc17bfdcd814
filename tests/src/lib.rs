//! Helpers shared by the end-to-end tests: they start edgerec's real binaries.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A binary built by `cargo xtask test`, which names their folder in `EDGEREC_BIN_DIR`.
pub fn binary(name: &str) -> PathBuf {
    let dir = std::env::var_os("EDGEREC_BIN_DIR").expect(
        "EDGEREC_BIN_DIR is not set: run `cargo xtask test`, which builds the binaries and sets it",
    );
    let path = PathBuf::from(dir).join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask test`",
        path.display()
    );
    path
}

/// Runs `control-plane` with `args` and returns its output.
pub fn control_plane<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(binary("control-plane"))
        .args(args)
        .output()
        .expect("control-plane starts")
}

/// Standard output of a run that must have succeeded.
pub fn stdout_of(output: &Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Standard error of a run that must have failed with `code`.
pub fn stderr_of_failure(output: &Output, code: i32) -> String {
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A small synthetic data set with a trained two-tower model, a ranker and a bundle built
/// from them by the real command line, shared by the tests of one test binary.
#[derive(Debug)]
pub struct BundleFixture {
    /// The working folder (data set, models, config).
    pub dir: PathBuf,
    /// The bundle file.
    pub bundle: PathBuf,
}

/// Promoted videos of [`synthetic_bundle`].
pub const FIXTURE_PROMOTED: [u64; 2] = [3, 5];

/// The rules and experiment of [`synthetic_bundle`]: retrieval sized for a 400-video
/// catalogue, one promoted slot at position 2, at most 2 videos per channel, and an
/// experiment whose `one-per-channel` arm allows 1.
pub const FIXTURE_CONFIG: &str = r#"
[two_tower]
epochs = 2
hidden_layers = [32]

[ranker]
iterations = 40

[rules]
personalized_candidates = 60
candidates_per_category = 30
max_per_channel = 2
promoted_positions = [2]

[[experiments]]
name = "channel-cap"
salt = "2026-11"

[[experiments.variants]]
name = "control"
weight = 1

[[experiments.variants]]
name = "one-per-channel"
weight = 1

[experiments.variants.rules]
personalized_candidates = 60
candidates_per_category = 30
max_per_channel = 1
promoted_positions = [2]
"#;

/// Builds the fixture once per test binary (about a minute in a debug build).
pub fn synthetic_bundle() -> &'static BundleFixture {
    static FIXTURE: std::sync::OnceLock<BundleFixture> = std::sync::OnceLock::new();
    FIXTURE.get_or_init(|| {
        // Kept for the life of the test process: every test of the binary reads it.
        let dir = tempfile::Builder::new()
            .prefix("edgerec-fixture-")
            .tempdir()
            .expect("a temporary folder")
            .keep();
        let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
        std::fs::write(dir.join("edgerec.toml"), FIXTURE_CONFIG).expect("config written");
        let (data, config, model) = (path("data"), path("edgerec.toml"), path("model"));
        let (ranker_dir, ranker) = (path("ranker"), path("ranker/ranker.json"));
        let bundles = path("bundles");
        let promoted = FIXTURE_PROMOTED.map(|id| id.to_string()).join(",");
        let sizes = [
            "--users",
            "600",
            "--videos",
            "400",
            "--interactions",
            "30000",
            "--seed",
            "11",
        ];
        let trained = ["--data", &data, "--config", &config];
        let steps: [Vec<&str>; 5] = [
            [&["generate"][..], &sizes, &["--out", &data]].concat(),
            vec!["split", "--data", &data],
            [&["train", "two-tower"][..], &trained, &["--out", &model]].concat(),
            [
                &["train", "ranker"][..],
                &trained,
                &["--model", &model, "--out", &ranker_dir],
            ]
            .concat(),
            [
                &["bundle", "build"][..],
                &trained,
                &[
                    "--model",
                    &model,
                    "--ranker",
                    &ranker,
                    "--promoted",
                    &promoted,
                ],
                &["--model-version", "fixture-1", "--out", &bundles],
            ]
            .concat(),
        ];
        for step in steps {
            stdout_of(&control_plane(&step));
        }
        let bundle = bundle_in(&dir.join("bundles"));
        BundleFixture { dir, bundle }
    })
}

fn bundle_in(folder: &Path) -> PathBuf {
    std::fs::read_dir(folder)
        .expect("bundle build wrote its folder")
        .map(|entry| entry.expect("a readable folder").path())
        .find(|p| p.extension().is_some_and(|e| e == "bundle"))
        .expect("bundle build wrote a bundle")
}

impl BundleFixture {
    /// The same models bundled again under another model version (a different bundle, as
    /// a retrain would publish), in a folder of its own.
    pub fn rebuilt_as(&self, model_version: &str) -> PathBuf {
        let path = |name: &str| self.dir.join(name).to_string_lossy().into_owned();
        let out = path(&format!("bundles-{model_version}"));
        let promoted = FIXTURE_PROMOTED.map(|id| id.to_string()).join(",");
        stdout_of(&control_plane([
            "bundle",
            "build",
            "--data",
            &path("data"),
            "--config",
            &path("edgerec.toml"),
            "--model",
            &path("model"),
            "--ranker",
            &path("ranker/ranker.json"),
            "--promoted",
            &promoted,
            "--model-version",
            model_version,
            "--out",
            &out,
        ]));
        bundle_in(Path::new(&out))
    }

    /// The data set folder.
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }
}

/// The host's artifacts folder shared by every test: the compiled module is cached in
/// its `compiled/` folder (under the module's hash), so Cranelift runs once per build of
/// the module, not once per test.
pub fn host_artifacts() -> PathBuf {
    binary("host")
        .parent()
        .expect("binaries live in a folder")
        .join("edgerec-host-artifacts")
}

/// A running server process (host, control plane, S3), killed when dropped.
#[derive(Debug)]
pub struct Service {
    child: std::process::Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Where its standard error goes.
    pub log: PathBuf,
}

/// The host is one kind of [`Service`].
pub type HostProcess = Service;

impl Service {
    /// Starts `command` with its standard error in a log file and waits for the first line
    /// of its standard output, which must be `banner` followed by its URL.
    pub fn start(mut command: Command, banner: &str) -> Self {
        use std::io::BufRead;
        let log_dir = tempfile::Builder::new()
            .prefix("edgerec-service-")
            .tempdir()
            .expect("a temporary folder")
            .keep();
        let log = log_dir.join("stderr.log");
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("a log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("{command:?}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let mut reader = std::io::BufReader::new(stdout);
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .expect("the service writes its address");
        // Keep reading, or its next line would hit a closed pipe and kill it.
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        let Some(url) = line.trim().strip_prefix(banner) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{command:?} did not start: {line:?}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        Self {
            url: url.trim().to_owned(),
            child,
            log,
        }
    }

    /// Starts `host` with the test's edge module on a free loopback port and `args`, and
    /// waits until it listens.
    pub fn host(args: &[&str]) -> Self {
        let wasm = std::env::var_os("EDGEREC_EDGE_WASM").expect(
            "EDGEREC_EDGE_WASM is not set: run `cargo xtask test`, which builds the module",
        );
        let mut command = Command::new(binary("host"));
        command
            .arg("--module")
            .arg(&wasm)
            .args(["--listen", "127.0.0.1:0", "--log-level", "info"])
            .arg("--artifacts")
            .arg(host_artifacts())
            .args(args);
        Self::start(command, "edgerec host listening on ")
    }

    /// What it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills it at once (SIGKILL: no shutdown code runs) and waits for it to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A helper process (redis-server, workerd), killed when dropped.
#[derive(Debug)]
pub struct Background(pub std::process::Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port that was free a moment ago (for servers that cannot report the port
/// they bound).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits (up to a minute) until the host's `/health` reports `version`.
pub fn wait_for_version(host: &Service, version: &str) {
    let started = std::time::Instant::now();
    loop {
        let (_, health) = http::get(&http::client(), &format!("{}/health", host.url));
        if health["model_version"] == version {
            return;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "{version} was not swapped in\n{}",
            host.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The edge module that `cargo xtask test` built (`cargo xtask dist`), named by
/// `EDGEREC_EDGE_WASM`.
pub fn edge_wasm() -> Vec<u8> {
    let path = std::env::var_os("EDGEREC_EDGE_WASM").expect(
        "EDGEREC_EDGE_WASM is not set: run `cargo xtask test`, which builds the module and sets it",
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", PathBuf::from(path).display()))
}

/// Reproducible recommendation requests for parity tests and benchmarks.
pub mod requests {
    use edge::catalog::Catalog;
    use edge::recommend::Request;

    /// Unix seconds the requests are made around (late 2026).
    pub const NOW: i64 = 1_795_000_000;

    /// SplitMix64: a reproducible stream for the request generator.
    pub struct Stream(pub u64);

    impl Stream {
        /// The next value.
        pub fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// A value below `n`.
        pub fn below(&mut self, n: u64) -> u64 {
            self.next_u64() % n
        }

        /// One of `items`.
        pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len() as u64) as usize]
        }

        /// True `percent` times in 100.
        pub fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    /// `count` varied requests at `now`: known, unknown and anonymous viewers, histories,
    /// filters, preferences, and with `invalid`, about 3% that must be refused.
    pub fn varied_requests(catalog: &Catalog, count: usize, invalid: bool) -> Vec<Request> {
        let ids: Vec<u64> = catalog.iter().map(|v| v.video_id()).collect();
        let mut categories: Vec<String> = catalog.iter().map(|v| v.category().to_owned()).collect();
        categories.sort();
        categories.dedup();
        let mut languages: Vec<String> = catalog.iter().map(|v| v.language().to_owned()).collect();
        languages.sort();
        languages.dedup();
        let countries = ["US", "GB", "DE", "FR", "BR", "JP", "IN", "MX", "ES", "KR"];
        let mut stream = Stream(2026);
        (0..count)
            .map(|_| {
                let mut request = Request::new(1 + stream.below(40) as u32, NOW);
                request.timestamp = NOW - stream.below(86_400 * 30) as i64;
                if stream.chance(90) {
                    request.user_id = Some(stream.below(700));
                }
                let history = stream.below(30) as usize;
                request.watch_history = (0..history).map(|_| *stream.pick(&ids)).collect();
                if stream.chance(60) {
                    request.user_features.age = Some(8.0 + stream.below(60) as f64);
                }
                if stream.chance(60) {
                    request.user_features.country = Some((*stream.pick(&countries)).to_owned());
                }
                if stream.chance(50) {
                    request.user_features.language = Some(stream.pick(&languages).clone());
                }
                if stream.chance(30) {
                    request.user_features.device = Some((*stream.pick(&["mobile", "tv"])).into());
                }
                if stream.chance(20) {
                    request.exclude_watched = Some(stream.chance(50));
                }
                if stream.chance(20) {
                    request.excluded_video_ids = (0..5).map(|_| *stream.pick(&ids)).collect();
                }
                if stream.chance(20) {
                    request.user_preferences.categories = vec![stream.pick(&categories).clone()];
                }
                if stream.chance(5) {
                    request.user_preferences.languages = vec![stream.pick(&languages).clone()];
                }
                if stream.chance(3) {
                    request.n = 200;
                }
                if invalid && stream.chance(3) {
                    match stream.below(3) {
                        0 => request.n = 0,
                        1 => request.user_features.age = Some(-1.0),
                        _ => request.n = 5_000,
                    }
                }
                request
            })
            .collect()
    }
}

/// Blocking HTTP for the tests (JSON answers).
pub mod http {
    use std::time::Duration;

    pub use reqwest::blocking::Client;
    use serde_json::Value;

    /// A client with a 30 s timeout.
    pub fn client() -> Client {
        Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("an HTTP client")
    }

    /// GET: the status and the JSON body (`Null` when it is not JSON).
    pub fn get(client: &Client, url: &str) -> (u16, Value) {
        let response = client.get(url).send().expect("the server answers");
        let status = response.status().as_u16();
        (status, response.json().unwrap_or(Value::Null))
    }

    /// POST a JSON body: the status and the JSON body.
    pub fn post(
        client: &Client,
        url: &str,
        body: impl Into<reqwest::blocking::Body>,
    ) -> (u16, Value) {
        let response = client
            .post(url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .expect("the server answers");
        let status = response.status().as_u16();
        (status, response.json().unwrap_or(Value::Null))
    }
}

/// The browser build of the edge module (`cargo xtask dist`'s `dist/web/`: `edgerec.js`,
/// `edgerec_bg.wasm`, `edgerec.d.ts`), named by `EDGEREC_EDGE_WEB`.
pub fn edge_web_dir() -> PathBuf {
    let dir = std::env::var_os("EDGEREC_EDGE_WEB").expect(
        "EDGEREC_EDGE_WEB is not set: run `cargo xtask test`, which builds the browser module and sets it",
    );
    PathBuf::from(dir)
}

/// The repository's root (tests/ is one of its folders).
pub fn repository() -> PathBuf {
    // Read when running, not baked in when compiling: checkouts at other paths that share
    // a target folder reuse each other's test binaries (cargo fingerprints paths relative
    // to the workspace), and a baked-in path would name the other checkout.
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .parent()
        .expect("tests/ is in the repository")
        .to_owned()
}

/// Runs `node` with `args`, panicking with its output unless it succeeds; returns its
/// standard output and standard error (where the scripts print their figures).
pub fn node<I, S>(args: I) -> (String, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut command = Command::new("node");
    command.args(args);
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e} (Node.js is needed)"));
    assert!(
        output.status.success(),
        "{command:?} failed: {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The npm packages `cargo xtask test` installed from `tests/js/package.json`.
pub fn node_modules() -> PathBuf {
    PathBuf::from(std::env::var_os("EDGEREC_NODE_MODULES").expect(
        "EDGEREC_NODE_MODULES is not set: run `cargo xtask test`, which installs the npm packages",
    ))
}
