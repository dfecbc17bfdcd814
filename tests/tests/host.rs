//! The host binary serving the seed's REST API from the edge module: answers equal the
//! native pipeline's, bad input gets a clear error and never a crash, interactions change
//! the next answer, and published bundles are swapped in under load without a failure.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edge::bundle::sha256_hex;
use edge::recommend::{Recommender, StageMs};
use edgerec_e2e::http::{client, get, post};
use edgerec_e2e::requests::varied_requests;
use edgerec_e2e::{
    Background, HostProcess, control_plane, free_port, stdout_of, synthetic_bundle,
    wait_for_version,
};
use serde_json::{Value, json};

/// A response without what differs between runs: timings and the request id.
fn comparable(mut response: Value) -> Value {
    let metadata = response["metadata"].as_object_mut().unwrap();
    metadata.remove("latency_ms");
    metadata.remove("stage_ms");
    metadata.remove("request_id");
    response
}

/// Publishes `bundle` (and, with `profiles_from`, that data set's profiles) to the
/// store's `production` channel.
fn publish(store: &Path, bundle: &Path, profiles_from: Option<&Path>) {
    let mut args = vec![
        "publish".to_owned(),
        "--bundle".to_owned(),
        bundle.to_str().unwrap().to_owned(),
        "--store".to_owned(),
        store.to_str().unwrap().to_owned(),
    ];
    if let Some(data) = profiles_from {
        args.extend([
            "--profiles-from".to_owned(),
            data.to_str().unwrap().to_owned(),
        ]);
    }
    stdout_of(&control_plane(&args));
}

/// Starts `command` (listening on loopback `port`) and waits until it accepts.
fn serve_on(port: u16, command: &mut std::process::Command) -> Background {
    let process = Background(
        command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{command:?}: {e}")),
    );
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{command:?} did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    process
}

#[test]
fn serves_the_seed_api_with_the_native_pipelines_answers() {
    let fixture = synthetic_bundle();
    let bundle = std::fs::read(&fixture.bundle).unwrap();
    let host = HostProcess::host(&[
        "--bundle",
        fixture.bundle.to_str().unwrap(),
        "--max-body-bytes",
        "65536",
    ]);
    let http = client();
    let url = |path: &str| format!("{}{path}", host.url);

    let (status, health) = get(&http, &url("/health"));
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["model_version"], "fixture-1");
    assert_eq!(health["bundle_sha256"], sha256_hex(&bundle));

    // POST answers equal the native pipeline's, field for field.
    let native = Recommender::from_bundle(&bundle).unwrap();
    for (index, request) in varied_requests(native.catalog(), 60, false)
        .into_iter()
        .enumerate()
    {
        let expected = native
            .start(request.clone())
            .map(|run| run.finish(&native, StageMs::default()))
            .unwrap();
        let body = serde_json::to_vec(&request).unwrap();
        let (status, got) = post(&http, &url("/recommendations"), body);
        assert_eq!(status, 200, "request {index}: {got}");
        assert!(got["metadata"]["request_id"].is_string());
        assert_eq!(
            comparable(got),
            comparable(serde_json::to_value(&expected).unwrap()),
            "request {index}"
        );
    }

    // GET for a viewer the host has no profile for: cached on the second call.
    let first = http.get(url("/recommendations/42?n=7")).send().unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-cache"], "miss");
    let first: Value = first.json().unwrap();
    assert_eq!(first["recommendations"].as_array().unwrap().len(), 7);
    assert_eq!(first["user_id"], 42);
    let second = http.get(url("/recommendations/42?n=7")).send().unwrap();
    assert_eq!(second.headers()["x-cache"], "hit");
    let second: Value = second.json().unwrap();
    assert_ne!(
        second["metadata"]["request_id"], first["metadata"]["request_id"],
        "a cached answer shown again is a new impression with its own request id"
    );
    assert_eq!(comparable(second), comparable(first.clone()));
    let (status, cached) = get(&http, &url("/cached/42"));
    assert_eq!((status, &cached), (200, &first));

    // An interaction changes the next answer: the clicked video is now watched (left
    // out by the bundle's rules) and the cache no longer answers.
    let clicked = first["recommendations"][0]["video_id"].as_u64().unwrap();
    let (status, body) = post(
        &http,
        &url("/interactions"),
        json!({"user_id": 42, "video_id": clicked, "type": "click",
               "request_id": first["metadata"]["request_id"], "position": 0})
        .to_string(),
    );
    assert_eq!((status, &body), (202, &json!({"accepted": 1})));
    let after = http.get(url("/recommendations/42?n=7")).send().unwrap();
    assert_eq!(after.headers()["x-cache"], "miss");
    let after: Value = after.json().unwrap();
    let ids: Vec<u64> = after["recommendations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["video_id"].as_u64().unwrap())
        .collect();
    assert!(!ids.contains(&clicked), "{clicked} in {ids:?}");

    // Bad input: a clear JSON error with the right status, and the host keeps serving.
    let too_big = vec![b' '; 100_000];
    let bad: Vec<(u16, &str, (u16, Value))> = vec![
        (
            400,
            "invalid_request",
            post(&http, &url("/recommendations"), "{not json"),
        ),
        (
            400,
            "invalid_request",
            post(&http, &url("/recommendations"), "[1, 2]"),
        ),
        (
            400,
            "invalid_request",
            post(
                &http,
                &url("/recommendations"),
                r#"{"n": 5, "colour": "red"}"#,
            ),
        ),
        (
            400,
            "invalid_request",
            post(&http, &url("/recommendations"), r#"{"n": 0}"#),
        ),
        (
            400,
            "invalid_request",
            post(
                &http,
                &url("/recommendations"),
                r#"{"user_features": {"age": -3}}"#,
            ),
        ),
        (
            413,
            "payload_too_large",
            post(&http, &url("/recommendations"), too_big),
        ),
        (
            400,
            "invalid_request",
            get(&http, &url("/recommendations/abc")),
        ),
        (
            400,
            "invalid_request",
            get(&http, &url("/recommendations/1?n=lots")),
        ),
        (
            400,
            "invalid_request",
            get(&http, &url("/recommendations/1?colour=red")),
        ),
        (
            400,
            "invalid_request",
            get(&http, &url("/recommendations/1?n=100000")),
        ),
        (
            400,
            "invalid_request",
            post(
                &http,
                &url("/interactions"),
                r#"{"user_id": 1, "video_id": 2, "type": "stare"}"#,
            ),
        ),
        (
            400,
            "invalid_request",
            post(
                &http,
                &url("/interactions"),
                r#"{"user_id": 1, "video_id": 2, "type": "watch", "watch_seconds": -1}"#,
            ),
        ),
        (404, "not_cached", get(&http, &url("/cached/999999"))),
        (404, "not_found", get(&http, &url("/no/such/route"))),
    ];
    for (index, (status, code, (got_status, body))) in bad.into_iter().enumerate() {
        assert_eq!(
            (got_status, body["code"].as_str()),
            (status, Some(code)),
            "bad request {index}: {body}"
        );
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "bad request {index}: {body}"
        );
    }
    let (status, body) = post(
        &http,
        &url("/recommendations"),
        r#"{"n": 5, "colour": "red"}"#,
    );
    assert!(
        body["message"].as_str().unwrap().contains("colour"),
        "{status} {body}"
    );
    let wrong_method = http.delete(url("/health")).send().unwrap();
    assert_eq!(wrong_method.status(), 405);
    let (status, _) = get(&http, &url("/health"));
    assert_eq!(status, 200, "still serving after bad input");

    let metrics = http.get(url("/metrics")).send().unwrap().text().unwrap();
    for expected in [
        "edgerec_host_requests_total{route=\"post_recommendations\",status=\"200\"} 60".to_owned(),
        "edgerec_host_cache_lookups_total{result=\"hit\"} 1".to_owned(),
        format!(
            "edgerec_host_bundle_info{{sha256=\"{}\",model_version=\"fixture-1\"}} 1",
            sha256_hex(&bundle)
        ),
        "edgerec_host_stage_duration_seconds_count{stage=\"ranking\"}".to_owned(),
        "edgerec_host_interactions_total{kind=\"click\"} 1".to_owned(),
    ] {
        assert!(
            metrics.contains(&expected),
            "{expected} missing from\n{metrics}"
        );
    }
}

#[test]
fn known_viewers_are_personalized_from_published_profiles() {
    let fixture = synthetic_bundle();
    let store = tempfile::tempdir().unwrap();
    publish(store.path(), &fixture.bundle, Some(&fixture.data()));
    let manifest = store.path().join("manifests/production.json");
    let host = HostProcess::host(&["--manifest", manifest.to_str().unwrap()]);
    let http = client();
    let (status, health) = get(&http, &format!("{}/health", host.url));
    assert_eq!(status, 200, "{health}\n{}", host.log_text());
    assert_eq!(
        health["profiles"], 600,
        "every synthetic viewer has a profile"
    );

    // A viewer with a history is answered from it: the request the host builds carries
    // it, so the answer differs from an anonymous viewer's and leaves the history out.
    let (status, known) = get(&http, &format!("{}/recommendations/7?n=10", host.url));
    assert_eq!(status, 200, "{known}");
    assert_eq!(known["metadata"]["cold_start"], false);
    let (_, anonymous) = post(
        &http,
        &format!("{}/recommendations", host.url),
        r#"{"n": 10}"#,
    );
    assert_eq!(anonymous["metadata"]["cold_start"], true);
    assert_ne!(known["recommendations"], anonymous["recommendations"]);
}

#[test]
fn published_bundles_swap_in_under_load_without_a_failed_request() {
    let fixture = synthetic_bundle();
    let store = tempfile::tempdir().unwrap();
    publish(store.path(), &fixture.bundle, None);
    let manifest = store.path().join("manifests/production.json");
    let host = HostProcess::host(&[
        "--manifest",
        manifest.to_str().unwrap(),
        "--poll-interval",
        "1",
    ]);
    let second = fixture.rebuilt_as("fixture-2");

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let versions = Arc::new(Mutex::new(Vec::new()));
    let answered = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..4)
        .map(|worker| {
            let (stop, failures, versions, answered) = (
                stop.clone(),
                failures.clone(),
                versions.clone(),
                answered.clone(),
            );
            let url = format!("{}/recommendations", host.url);
            std::thread::spawn(move || {
                let http = client();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let body = json!({"user_id": worker * 1000 + n, "n": 10,
                                      "watch_history": [n % 400, (n * 7) % 400]});
                    let (status, response) = post(&http, &url, body.to_string());
                    if status == 200 {
                        let version = response["metadata"]["model_version"]
                            .as_str()
                            .unwrap()
                            .to_owned();
                        let mut versions = versions.lock().unwrap();
                        if versions.last() != Some(&version) {
                            versions.push(version);
                        }
                        answered.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failures.lock().unwrap().push((status, response));
                    }
                }
            })
        })
        .collect();

    std::thread::sleep(Duration::from_millis(500));
    publish(store.path(), &second, None);
    wait_for_version(&host, "fixture-2");

    // A manifest naming a corrupt bundle: refused, and the last good bundle keeps serving.
    let mut text: Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    let key = text["bundle"]["key"].as_str().unwrap().to_owned();
    let mut corrupt = std::fs::read(store.path().join(&key)).unwrap();
    let middle = corrupt.len() / 2;
    corrupt[middle] ^= 0xff;
    let sha = sha256_hex(&corrupt);
    std::fs::write(store.path().join(format!("bundles/{sha}.bundle")), &corrupt).unwrap();
    // Claims the right hash of corrupt bytes: the download verifies, the module refuses.
    text["bundle"] = json!({"key": format!("bundles/{sha}.bundle"), "sha256": sha,
                            "size": corrupt.len()});
    text["model_version"] = json!("corrupt");
    std::fs::write(&manifest, serde_json::to_vec(&text).unwrap()).unwrap();
    let started = Instant::now();
    let mut refused = false;
    while started.elapsed() < Duration::from_secs(30) && !refused {
        std::thread::sleep(Duration::from_millis(200));
        let metrics = client()
            .get(format!("{}/metrics", host.url))
            .send()
            .unwrap()
            .text()
            .unwrap();
        refused = metrics.lines().any(|l| {
            l.starts_with("edgerec_host_bundle_swap_failures_total ") && !l.ends_with(" 0")
        });
    }
    assert!(
        refused,
        "the corrupt bundle was not refused\n{}",
        host.log_text()
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.join().unwrap();
    }

    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    let versions = versions.lock().unwrap();
    assert!(answered.load(Ordering::Relaxed) > 20);
    assert_eq!(
        versions.first().map(String::as_str),
        Some("fixture-1"),
        "{versions:?}"
    );
    assert_eq!(
        versions.last().map(String::as_str),
        Some("fixture-2"),
        "{versions:?}"
    );
    let (_, health) = get(&client(), &format!("{}/health", host.url));
    assert_eq!(health["model_version"], "fixture-2");
}

/// A `redis-server` on a free loopback port, stopped when dropped.
struct RedisServer {
    _process: Background,
    port: u16,
}

impl RedisServer {
    fn start() -> Self {
        let server = std::env::var_os("EDGEREC_REDIS_SERVER").expect(
            "EDGEREC_REDIS_SERVER is not set: run `cargo xtask test`, which installs redis-server",
        );
        let port = free_port();
        let process = serve_on(
            port,
            std::process::Command::new(server)
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--save", "", "--appendonly", "no"]),
        );
        Self {
            _process: process,
            port,
        }
    }
}

#[test]
fn the_redis_cache_outlives_a_host_and_forgets_on_interactions() {
    let fixture = synthetic_bundle();
    let redis = RedisServer::start();
    let port = redis.port.to_string();
    let args = [
        "--bundle",
        fixture.bundle.to_str().unwrap(),
        "--use-redis",
        "--redis-host",
        "127.0.0.1",
        "--redis-port",
        &port,
    ];
    let http = client();
    let ask = |host: &HostProcess| {
        let response = http
            .get(format!("{}/recommendations/42?n=5", host.url))
            .send()
            .unwrap();
        assert_eq!(response.status(), 200);
        let cache = response.headers()["x-cache"].to_str().unwrap().to_owned();
        (cache, comparable(response.json::<Value>().unwrap()))
    };

    let first_host = HostProcess::host(&args);
    let (cache, answer) = ask(&first_host);
    assert_eq!(cache, "miss");
    assert_eq!(ask(&first_host), ("hit".to_owned(), answer.clone()));
    drop(first_host);

    // A new process finds the answer in Redis.
    let host = HostProcess::host(&args);
    assert_eq!(ask(&host), ("hit".to_owned(), answer.clone()));
    let (status, cached) = get(&http, &format!("{}/cached/42", host.url));
    assert_eq!((status, comparable(cached)), (200, answer.clone()));

    let video = answer["recommendations"][0]["video_id"].as_u64().unwrap();
    let (status, _) = post(
        &http,
        &format!("{}/interactions", host.url),
        json!({"user_id": 42, "video_id": video, "type": "like"}).to_string(),
    );
    assert_eq!(status, 202);
    assert_eq!(ask(&host).0, "miss");

    // Asked for Redis where there is none: the host says so and does not start.
    drop(redis);
    let output = std::process::Command::new(edgerec_e2e::binary("host"))
        .arg("--module")
        .arg(std::env::var_os("EDGEREC_EDGE_WASM").unwrap())
        .arg("--artifacts")
        .arg(edgerec_e2e::host_artifacts())
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("Redis at redis://127.0.0.1:"), "{stderr}");
}

/// A plain static HTTP server over a folder (Python's `http.server`), standing where a
/// CDN would: the host reads the store over HTTP as it would in production.
struct StaticHttp {
    _process: Background,
    url: String,
}

impl StaticHttp {
    fn serve(folder: &Path) -> Self {
        let port = free_port();
        let process = serve_on(
            port,
            std::process::Command::new("python3")
                .args(["-m", "http.server", "--bind", "127.0.0.1", "--directory"])
                .arg(folder)
                .arg(port.to_string()),
        );
        Self {
            _process: process,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

#[test]
fn follows_a_channel_over_http() {
    let fixture = synthetic_bundle();
    let store = tempfile::tempdir().unwrap();
    publish(store.path(), &fixture.bundle, Some(&fixture.data()));
    let cdn = StaticHttp::serve(store.path());
    let manifest = format!("{}/manifests/production.json", cdn.url);
    let host = HostProcess::host(&["--manifest", &manifest, "--poll-interval", "1"]);
    let http = client();
    let (status, health) = get(&http, &format!("{}/health", host.url));
    assert_eq!(status, 200, "{health}\n{}", host.log_text());
    assert_eq!(
        (&health["model_version"], &health["profiles"]),
        (&json!("fixture-1"), &json!(600))
    );

    let second = fixture.rebuilt_as("fixture-http-2");
    publish(store.path(), &second, Some(&fixture.data()));
    wait_for_version(&host, "fixture-http-2");
    let (status, answer) = get(&http, &format!("{}/recommendations/7?n=5", host.url));
    assert_eq!(status, 200);
    assert_eq!(answer["metadata"]["model_version"], "fixture-http-2");

    // The CDN goes away: the host keeps serving what it has.
    drop(cdn);
    std::thread::sleep(Duration::from_millis(1500));
    let (status, answer) = get(&http, &format!("{}/recommendations/8?n=5", host.url));
    assert_eq!(
        (status, &answer["metadata"]["model_version"]),
        (200, &json!("fixture-http-2"))
    );
}
