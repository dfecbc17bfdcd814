//! The edge module outside wasmtime: its browser build (wasm-bindgen) in Node against the
//! same code run natively, the browser demo in headless Chromium, and the raw-ABI module
//! in Cloudflare's workerd against the wasmtime host.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use edge::recommend::{Recommender, StageMs};
use edgerec_e2e::http::client;
use edgerec_e2e::requests::varied_requests;
use edgerec_e2e::{
    Background, HostProcess, Service, binary, control_plane, edge_wasm, edge_web_dir, free_port,
    node, node_modules, repository, stdout_of, synthetic_bundle,
};
use serde_json::{Value, json};

/// Numbers compared as f64: JavaScript writes 3.0 as `3`, serde_json as `3.0`.
fn numbers_as_f64(value: Value) -> Value {
    match value {
        Value::Number(n) => serde_json::Number::from_f64(n.as_f64().expect("a finite number"))
            .map_or(Value::Null, Value::Number),
        Value::Array(items) => Value::Array(items.into_iter().map(numbers_as_f64).collect()),
        Value::Object(fields) => Value::Object(
            fields
                .into_iter()
                .map(|(k, v)| (k, numbers_as_f64(v)))
                .collect(),
        ),
        other => other,
    }
}

#[test]
fn a_thousand_requests_answer_identically_in_node_and_natively() {
    let fixture = synthetic_bundle();
    let bundle = std::fs::read(&fixture.bundle).unwrap();
    let native = Recommender::from_bundle(&bundle).unwrap();
    let requests = varied_requests(native.catalog(), 1000, true);
    let dir = tempfile::tempdir().unwrap();
    let requests_path = dir.path().join("requests.json");
    let answers_path = dir.path().join("answers.json");
    std::fs::write(&requests_path, serde_json::to_vec(&requests).unwrap()).unwrap();
    let (_, figures) = node([
        repository().join("tests/js/node-parity.mjs").as_os_str(),
        edge_web_dir().as_os_str(),
        fixture.bundle.as_os_str(),
        requests_path.as_os_str(),
        answers_path.as_os_str(),
    ]);
    eprintln!("{figures}");
    let answers: Vec<Value> =
        serde_json::from_slice(&std::fs::read(&answers_path).unwrap()).unwrap();
    assert_eq!(answers.len(), requests.len());
    let (mut answered, mut refused) = (0, 0);
    for (index, (request, answer)) in requests.into_iter().zip(answers).enumerate() {
        let expected = native
            .start(request.clone())
            .map(|run| run.finish(&native, StageMs::default()));
        match expected {
            Ok(expected) => {
                let expected = numbers_as_f64(serde_json::to_value(expected).unwrap());
                let got = numbers_as_f64(answer["ok"].clone());
                assert_eq!(got, expected, "request {index}: {request:?}");
                answered += 1;
            }
            Err(expected) => {
                assert_eq!(
                    (
                        answer["error"]["code"].as_str(),
                        answer["error"]["message"].as_str()
                    ),
                    (Some(expected.code()), Some(expected.to_string().as_str())),
                    "request {index}: {request:?}"
                );
                refused += 1;
            }
        }
    }
    assert!(
        answered > 900 && refused > 0,
        "{answered} answered, {refused} refused"
    );
}

#[test]
fn the_browser_build_refuses_bad_input_with_coded_errors() {
    let fixture = synthetic_bundle();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("bad-input.mjs");
    std::fs::write(
        &script,
        r#"
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
const [webDir, bundlePath] = process.argv.slice(2);
const { initSync, Recommender } = await import(pathToFileURL(join(webDir, "edgerec.js")));
initSync({ module: readFileSync(join(webDir, "edgerec_bg.wasm")) });
const codeOf = (f) => { try { f(); return "no error"; } catch (e) { return `${e.code}: ${e.message}`; } };
const bytes = readFileSync(bundlePath);
const results = {
  truncated: codeOf(() => new Recommender(bytes.subarray(0, bytes.length - 100))),
  garbage: codeOf(() => new Recommender(new Uint8Array([1, 2, 3]))),
};
const recommender = new Recommender(bytes);
Object.assign(results, {
  not_an_object: codeOf(() => recommender.recommend("hello")),
  unknown_field: codeOf(() => recommender.recommend({ timestamp: 1, colour: "red" })),
  nan_age: codeOf(() => recommender.recommend({ timestamp: 1, user_features: { age: NaN } })),
  n_zero: codeOf(() => recommender.recommend({ timestamp: 1, n: 0 })),
  fractional_timestamp: codeOf(() => recommender.recommend({ timestamp: 1.5 })),
  still_serves: recommender.recommend({ timestamp: 1, n: 3 }).recommendations.length,
  unknown_video: String(recommender.video(123456789)),
  first_category: recommender.categories()[0],
});
console.log(JSON.stringify(results));
"#,
    )
    .unwrap();
    let output = Command::new("node")
        .arg(&script)
        .arg(edge_web_dir())
        .arg(&fixture.bundle)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let results: Value = serde_json::from_slice(&output.stdout).unwrap();
    eprintln!("{results:#}");
    let text = |key: &str| results[key].as_str().unwrap_or_default().to_owned();
    assert!(
        text("truncated").starts_with("invalid_bundle: "),
        "{results}"
    );
    assert!(text("garbage").starts_with("invalid_bundle: "), "{results}");
    for key in ["not_an_object", "unknown_field", "fractional_timestamp"] {
        assert!(
            text(key).starts_with("invalid_request: "),
            "{key}: {results}"
        );
    }
    assert!(text("unknown_field").contains("colour"), "{results}");
    assert!(text("nan_age").starts_with("invalid_request: ") && text("nan_age").contains("age"));
    assert!(text("n_zero").starts_with("invalid_request: ") && text("n_zero").contains('n'));
    assert_eq!(results["still_serves"], 3);
    assert_eq!(results["unknown_video"], "undefined");
    assert!(!text("first_category").is_empty());
}

/// Publishes the synthetic bundle and its viewers' profiles to a store folder.
fn published_store() -> tempfile::TempDir {
    let fixture = synthetic_bundle();
    let store = tempfile::tempdir().unwrap();
    stdout_of(&control_plane([
        "publish".as_ref(),
        "--bundle".as_ref(),
        fixture.bundle.as_os_str(),
        "--store".as_ref(),
        store.path().as_os_str(),
        "--profiles-from".as_ref(),
        fixture.data().as_os_str(),
    ]));
    store
}

fn fixture_model_version() -> String {
    let bundle = std::fs::read(&synthetic_bundle().bundle).unwrap();
    Recommender::from_bundle(&bundle)
        .unwrap()
        .model_version()
        .to_owned()
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

#[test]
fn the_browser_demo_reranks_toward_what_the_viewer_watches_and_works_offline() {
    let store = published_store();
    let state = tempfile::tempdir().unwrap();
    let www = std::env::var_os("EDGEREC_WWW")
        .expect("EDGEREC_WWW is not set: run `cargo xtask test`, which assembles the demo");
    let mut command = Command::new(binary("control-plane"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--state"])
        .arg(state.path())
        .arg("--store")
        .arg(store.path())
        .arg("--www")
        .arg(&www)
        .env("EDGEREC_API_TOKEN", "browser-test-token");
    let service = Service::start(command, "edgerec control plane listening on ");
    let screenshot = binary("host")
        .parent()
        .expect("a folder")
        .join("browser-demo.png");
    let manifest = store.path().join("manifests/production.json");
    let host = HostProcess::host(&["--manifest", manifest.to_str().unwrap()]);
    let (stdout, _) = node([
        repository().join("tests/js/browser-demo.mjs").as_os_str(),
        format!("{}/demo/", service.url).as_ref(),
        screenshot.as_os_str(),
        host.url.as_ref(),
    ]);
    let seen: Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    eprintln!("{seen:#}\nscreenshot: {}", screenshot.display());
    assert!(screenshot.is_file());
    assert_eq!(seen["problems"], json!([]));

    let target = seen["target"].as_str().unwrap();
    let share = |key: &str| {
        let categories = seen[key].as_array().unwrap();
        assert!(!categories.is_empty(), "{key}: no recommendations");
        categories.iter().filter(|c| *c == target).count() as f64 / categories.len() as f64
    };
    let (before, after) = (share("before"), share("after"));
    let catalogue = seen["catalogueShare"].as_f64().unwrap();
    // Six videos of one category watched: the re-ranked page leans to it, well above its
    // share of the catalogue and of the first page.
    assert!(
        after >= (2.0 * catalogue).max(before + 0.25),
        "{target}: {before:.2} of the first page, {after:.2} after six watches, {catalogue:.2} of the catalogue"
    );
    let skipped = &seen["skipped"];
    assert!(
        !seen["afterSkip"].as_array().unwrap().contains(skipped),
        "a skipped video came back: {seen}"
    );
    for watched in seen["watched"].as_array().unwrap() {
        assert!(!seen["afterSkip"].as_array().unwrap().contains(watched));
    }
    // Offline, from the worker's cache, with the history kept.
    assert_eq!(seen["offline"].as_array().unwrap().len(), 12, "{seen}");
    assert!(seen["historyLength"].as_u64().unwrap() >= 8, "{seen}");
    assert_eq!(seen["modelVersion"], fixture_model_version().as_str());
    assert!(seen["reranks"].as_u64().unwrap() >= 50);
    // Shared once switched on: the host (another origin, so through CORS) took the watch
    // and now keeps a history for the page's viewer id.
    assert_eq!(seen["sharedStatus"], 202, "{seen}");
    let viewer = seen["viewer"].as_u64().unwrap();
    let (_, health) = edgerec_e2e::http::get(&client(), &format!("{}/health", host.url));
    assert_eq!(
        health["profiles"], 601,
        "the fixture's 600 viewers and the page's {viewer}"
    );
}

/// Bundles worker/worker.mjs with its npm dependency into one ES module (what wrangler
/// does for a deploy), beside a copy of the raw-ABI module.
fn built_worker(dir: &Path) -> PathBuf {
    let out = dir.join("worker.bundle.mjs");
    let status = Command::new(node_modules().join(".bin/esbuild"))
        .arg(repository().join("worker/worker.mjs"))
        .args([
            "--bundle",
            "--format=esm",
            "--platform=neutral",
            "--main-fields=module,main",
            "--external:./edge.wasm",
        ])
        .arg(format!("--outfile={}", out.display()))
        .env("NODE_PATH", node_modules())
        .status()
        .unwrap();
    assert!(status.success(), "esbuild failed");
    std::fs::write(dir.join("edge.wasm"), edge_wasm()).unwrap();
    out
}

/// Starts workerd serving the worker with the store's bundle and profiles as data bindings.
fn start_workerd(dir: &Path, store: &Path) -> (Background, String) {
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(store.join("manifests/production.json")).unwrap())
            .unwrap();
    let artifact = |name: &str| store.join(manifest[name]["key"].as_str().unwrap());
    std::fs::copy(artifact("bundle"), dir.join("bundle.bin")).unwrap();
    std::fs::copy(artifact("profiles"), dir.join("profiles.msgpack")).unwrap();
    built_worker(dir);
    let port = free_port();
    std::fs::write(
        dir.join("config.capnp"),
        format!(
            r#"using Workerd = import "/workerd/workerd.capnp";
const config :Workerd.Config = (
  services = [ (name = "edgerec", worker = .edgerec) ],
  sockets = [ (name = "http", address = "127.0.0.1:{port}", http = (), service = "edgerec") ],
);
const edgerec :Workerd.Worker = (
  modules = [
    (name = "worker.mjs", esModule = embed "worker.bundle.mjs"),
    (name = "edge.wasm", wasm = embed "edge.wasm"),
  ],
  bindings = [
    (name = "BUNDLE", data = embed "bundle.bin"),
    (name = "PROFILES", data = embed "profiles.msgpack"),
  ],
  compatibilityDate = "2026-11-01",
);
"#
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("workerd.log")).unwrap();
    let child = Command::new(node_modules().join("@cloudflare/workerd-linux-64/bin/workerd"))
        .arg("serve")
        .arg(dir.join("config.capnp"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let process = Background(child);
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "workerd did not listen: {}",
            std::fs::read_to_string(dir.join("workerd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (process, format!("http://127.0.0.1:{port}"))
}

/// A response without what differs by design between two servers: request ids and the
/// stage times (workerd freezes the clock during a request).
fn comparable(mut response: Value) -> Value {
    if let Some(metadata) = response.get_mut("metadata").and_then(Value::as_object_mut) {
        for field in ["request_id", "latency_ms", "stage_ms"] {
            metadata.remove(field);
        }
    }
    numbers_as_f64(response)
}

fn timed(request: reqwest::blocking::RequestBuilder) -> (u16, Value, f64) {
    let started = Instant::now();
    let response = request.send().unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().unwrap();
    (status, body, started.elapsed().as_secs_f64() * 1000.0)
}

#[test]
fn workerd_answers_as_the_host_does() {
    let store = published_store();
    let dir = tempfile::tempdir().unwrap();
    let (_workerd, worker) = start_workerd(dir.path(), store.path());
    let manifest = store.path().join("manifests/production.json");
    let host = HostProcess::host(&["--manifest", manifest.to_str().unwrap()]);
    let http = client();
    // The first request instantiates the module and loads the bundle in the isolate.
    let started = Instant::now();
    let (status, health, _) = timed(http.get(format!("{worker}/health")));
    let first_ms = started.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["model_version"], fixture_model_version().as_str());

    let native =
        Recommender::from_bundle(&std::fs::read(&synthetic_bundle().bundle).unwrap()).unwrap();
    let bodies = varied_requests(native.catalog(), 150, true);
    let (mut worker_ms, mut host_ms) = (Vec::new(), Vec::new());
    let (mut same, mut refused) = (0, 0);
    for (index, body) in bodies.iter().enumerate() {
        let body = serde_json::to_value(body).unwrap();
        let (worker_status, worker_body, w) =
            timed(http.post(format!("{worker}/recommendations")).json(&body));
        let (host_status, host_body, h) = timed(
            http.post(format!("{}/recommendations", host.url))
                .json(&body),
        );
        assert_eq!(
            worker_status, host_status,
            "request {index}: {worker_body} vs {host_body}"
        );
        if worker_status == 200 {
            assert_eq!(
                comparable(worker_body),
                comparable(host_body),
                "request {index}"
            );
            worker_ms.push(w);
            host_ms.push(h);
            same += 1;
        } else {
            assert_eq!(worker_body, host_body, "request {index}");
            refused += 1;
        }
    }
    // GET for 50 viewers with stored profiles: the worker and the host fill the request from
    // the same profiles. Each takes its own clock's time, so a second can separate them:
    // compare again on a mismatch.
    for user in (0..600).step_by(12) {
        let get = |base: &str| timed(http.get(format!("{base}/recommendations/{user}?n=10")));
        let mut answers = (get(&worker), get(&host.url));
        if comparable(answers.0.1.clone()) != comparable(answers.1.1.clone()) {
            answers = (get(&worker), get(&host.url));
        }
        let ((ws, wb, _), (hs, hb, _)) = answers;
        assert_eq!((ws, hs), (200, 200), "user {user}: {wb} {hb}");
        assert_eq!(comparable(wb), comparable(hb), "user {user}");
        same += 1;
    }
    for bad in ["abc", "-1", "18446744073709551616"] {
        let (ws, wb, _) = timed(http.get(format!("{worker}/recommendations/{bad}")));
        assert_eq!(ws, 400, "{bad}: {wb}");
        assert_eq!(wb["code"], "invalid_request");
    }
    let (ws, wb, _) = timed(
        http.post(format!("{worker}/recommendations"))
            .body("not json"),
    );
    assert_eq!((ws, wb["code"].as_str()), (400, Some("invalid_request")));
    assert!(
        same >= 180 && refused > 0,
        "{same} equal answers, {refused} refusals"
    );

    worker_ms.sort_by(f64::total_cmp);
    host_ms.sort_by(f64::total_cmp);
    eprintln!(
        "POST /recommendations over loopback, {} requests: workerd median {:.2} ms, p99 {:.2} ms; host (wasmtime) median {:.2} ms, p99 {:.2} ms; workerd/host median ratio {:.2}; workerd's first request (instantiate + bundle load) {first_ms:.0} ms",
        worker_ms.len(),
        percentile(&worker_ms, 0.5),
        percentile(&worker_ms, 0.99),
        percentile(&host_ms, 0.5),
        percentile(&host_ms, 0.99),
        percentile(&worker_ms, 0.5) / percentile(&host_ms, 0.5),
    );
}
