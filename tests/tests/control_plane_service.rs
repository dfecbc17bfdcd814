//! The control plane's REST API and publishing with real parts: an S3-compatible server
//! (s3s-fs, SigV4-checked, anonymous reads only) on loopback, the `control-plane serve`
//! process with its SQLite registry, and a host that follows the channel over plain HTTP.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use edge::bundle::sha256_hex;
use edge::recommend::Recommender;
use edgerec_e2e::HostProcess;
use edgerec_e2e::http::{Client, client, get, post};
use edgerec_e2e::{Service, binary, stdout_of, synthetic_bundle, wait_for_version};
use serde_json::{Value, json};

const ACCESS_KEY: &str = "edgerec-test-key";
const SECRET_KEY: &str = "edgerec-test-secret";
const TOKEN: &str = "test-token-4f1c2a";

/// An S3-compatible server over a fresh folder with the bucket `edgerec`.
fn start_s3(root: &Path) -> Service {
    let mut command = Command::new(binary("s3-server"));
    command.arg(root).args([ACCESS_KEY, SECRET_KEY, "edgerec"]);
    Service::start(command, "s3 listening on ")
}

/// The standard AWS environment pointing at the test's server and nothing else.
fn aws_environment(command: &mut Command, endpoint: &str) {
    command
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/nonexistent/edgerec-test")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/edgerec-test")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .env("EDGEREC_S3_ENDPOINT", endpoint)
        .env("EDGEREC_S3_PATH_STYLE", "true");
}

fn start_control_plane(state: &Path, store: &str, s3: Option<&str>, extra: &[&str]) -> Service {
    start_control_plane_on("127.0.0.1:0", state, store, s3, extra)
}

fn start_control_plane_on(
    listen: &str,
    state: &Path,
    store: &str,
    s3: Option<&str>,
    extra: &[&str],
) -> Service {
    let mut command = Command::new(binary("control-plane"));
    command
        .args([
            "serve",
            "--listen",
            listen,
            "--log-level",
            "info",
            "--state",
        ])
        .arg(state)
        .args(["--store", store])
        .args(extra)
        .env("EDGEREC_API_TOKEN", TOKEN);
    if let Some(endpoint) = s3 {
        aws_environment(&mut command, endpoint);
    }
    Service::start(command, "edgerec control plane listening on ")
}

/// A request with the API token: status and JSON body.
fn authed(
    http: &Client,
    method: reqwest::Method,
    url: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, Value) {
    let response = http
        .request(method, url)
        .bearer_auth(TOKEN)
        .header("content-type", content_type)
        .body(body)
        .send()
        .expect("the control plane answers");
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(Value::Null))
}

fn authed_get(http: &Client, url: &str) -> (u16, Value) {
    authed(
        http,
        reqwest::Method::GET,
        url,
        "application/json",
        Vec::new(),
    )
}

fn authed_post(http: &Client, url: &str, body: &Value) -> (u16, Value) {
    authed(
        http,
        reqwest::Method::POST,
        url,
        "application/json",
        body.to_string().into_bytes(),
    )
}

/// An answer's status and error code.
fn code((status, body): (u16, Value)) -> (u16, String) {
    (status, body["code"].as_str().unwrap_or("").to_owned())
}

/// GET over plain HTTP, no credentials: status, `Cache-Control` and body.
fn plain_get(http: &Client, url: &str) -> (u16, String, Vec<u8>) {
    let response = http.get(url).send().expect("the store answers");
    let status = response.status().as_u16();
    let cache = response
        .headers()
        .get("cache-control")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, cache, response.bytes().unwrap().to_vec())
}

/// The manifest of `production` and the bundle it names, fetched anonymously over HTTP
/// with the bundle's sha256 checked against the manifest's.
fn fetch_published(http: &Client, store_url: &str) -> Value {
    let (status, cache, body) = plain_get(http, &format!("{store_url}/manifests/production.json"));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        cache, "public, max-age=60",
        "manifests are short-lived in caches"
    );
    let manifest: Value = serde_json::from_slice(&body).unwrap();
    let key = manifest["bundle"]["key"].as_str().unwrap();
    let (status, cache, bundle) = plain_get(http, &format!("{store_url}/{key}"));
    assert_eq!(status, 200);
    assert_eq!(cache, "public, max-age=31536000, immutable");
    assert_eq!(json!(sha256_hex(&bundle)), manifest["bundle"]["sha256"]);
    assert_eq!(json!(bundle.len()), manifest["bundle"]["size"]);
    manifest
}

#[test]
fn publishes_to_s3_and_a_host_follows_publish_and_rollback() {
    let fixture = synthetic_bundle();
    let first_bytes = std::fs::read(&fixture.bundle).unwrap();
    let first_sha = sha256_hex(&first_bytes);
    let s3_root = tempfile::tempdir().unwrap();
    let s3 = start_s3(s3_root.path());
    let state = tempfile::tempdir().unwrap();
    let store = "s3://edgerec/cdn";
    let store_url = format!("{}/edgerec/cdn", s3.url);
    let http = client();

    // The command line publishes the first bundle and its profiles and registers them.
    let mut publish = Command::new(binary("control-plane"));
    publish
        .arg("publish")
        .arg("--bundle")
        .arg(&fixture.bundle)
        .args(["--store", store, "--state"])
        .arg(state.path())
        .arg("--profiles-from")
        .arg(fixture.data());
    aws_environment(&mut publish, &s3.url);
    stdout_of(&publish.output().unwrap());
    let manifest = fetch_published(&http, &store_url);
    assert_eq!(manifest["bundle"]["sha256"], json!(first_sha));
    assert_eq!(manifest["model_version"], "fixture-1");
    // Reads are public, writes are not.
    let refused = http
        .put(format!("{store_url}/manifests/production.json"))
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(refused.status().as_u16(), 403);

    // A host follows the channel from the S3 server over HTTP and personalizes.
    let manifest_url = format!("{store_url}/manifests/production.json");
    let host = HostProcess::host(&["--manifest", &manifest_url, "--poll-interval", "1"]);
    let (status, health) = get(&http, &format!("{}/health", host.url));
    assert_eq!(status, 200, "{health}\n{}", host.log_text());
    assert_eq!(
        (&health["model_version"], &health["profiles"]),
        (&json!("fixture-1"), &json!(600))
    );
    let native = Recommender::from_bundle(&first_bytes).unwrap();
    let mut by_category: std::collections::BTreeMap<&str, Vec<u64>> = Default::default();
    for video in native.catalog().iter() {
        by_category
            .entry(video.category())
            .or_default()
            .push(video.video_id());
    }
    let (category, videos) = by_category
        .iter()
        .max_by_key(|(_, videos)| videos.len())
        .unwrap();
    let catalog_share = videos.len() as f64 / native.catalog().len() as f64;
    let history: Vec<u64> = videos.iter().take(8).copied().collect();
    let (status, answer) = post(
        &http,
        &format!("{}/recommendations", host.url),
        json!({"user_id": 900_001, "n": 10, "watch_history": history}).to_string(),
    );
    assert_eq!(status, 200, "{answer}");
    let items = answer["recommendations"].as_array().unwrap();
    let same = items
        .iter()
        .filter(|item| item["category"] == **category)
        .count();
    let share = same as f64 / items.len() as f64;
    eprintln!(
        "a viewer of only {category}: {same} of {} recommendations in it (catalogue share {catalog_share:.2})",
        items.len()
    );
    assert!(
        share >= 0.5 && share >= 2.0 * catalog_share,
        "{same} of {} in {category} (catalogue share {catalog_share:.2}): {answer}",
        items.len()
    );
    // An interaction changes the next answer of a known viewer.
    let (_, before) = get(&http, &format!("{}/recommendations/7?n=10", host.url));
    let watched = before["recommendations"][0]["video_id"].as_u64().unwrap();
    let (status, _) = post(
        &http,
        &format!("{}/interactions", host.url),
        json!({"user_id": 7, "video_id": watched, "interaction_type": "like"}).to_string(),
    );
    assert_eq!(status, 202);
    let (_, after) = get(&http, &format!("{}/recommendations/7?n=10", host.url));
    assert_ne!(before["recommendations"], after["recommendations"]);

    // The service sees what the command line registered.
    let control = start_control_plane(state.path(), store, Some(&s3.url), &[]);
    let (status, channel) = authed_get(&http, &format!("{}/channels/production", control.url));
    assert_eq!(status, 200, "{channel}\n{}", control.log_text());
    assert_eq!(channel["current"]["bundle"]["sha256"], json!(first_sha));
    let profiles_sha = channel["current"]["profiles"]["sha256"].clone();
    assert!(profiles_sha.is_string());

    // A second bundle: uploaded (twice: the second is a no-op), published, served.
    let second_bytes = std::fs::read(fixture.rebuilt_as("fixture-s3-2")).unwrap();
    let upload = |bytes: &[u8]| {
        authed(
            &http,
            reqwest::Method::POST,
            &format!("{}/bundles", control.url),
            "application/octet-stream",
            bytes.to_vec(),
        )
    };
    let (status, record) = upload(&second_bytes);
    assert_eq!(status, 201, "{record}\n{}", control.log_text());
    assert_eq!(record["model_version"], "fixture-s3-2");
    let second_sha = record["sha256"].as_str().unwrap().to_owned();
    assert_eq!(second_sha, sha256_hex(&second_bytes));
    assert_eq!(upload(&second_bytes).0, 200);
    let (status, written) = authed_post(
        &http,
        &format!("{}/channels/production/publish", control.url),
        &json!({"bundle": second_sha, "profiles": profiles_sha}),
    );
    assert_eq!(status, 200, "{written}");
    assert_eq!(
        fetch_published(&http, &store_url)["bundle"]["sha256"],
        json!(second_sha)
    );
    wait_for_version(&host, "fixture-s3-2");

    // Rollback: the manifest points at the first bundle again and the host follows.
    let (status, rolled) = authed_post(
        &http,
        &format!("{}/channels/production/rollback", control.url),
        &json!({}),
    );
    assert_eq!(status, 200, "{rolled}");
    assert_eq!(rolled["action"], "rollback");
    let manifest = fetch_published(&http, &store_url);
    assert_eq!(manifest["bundle"]["sha256"], json!(first_sha));
    assert_eq!(manifest["profiles"]["sha256"], profiles_sha);
    wait_for_version(&host, "fixture-1");
    let (status, refused) = authed_post(
        &http,
        &format!("{}/channels/production/rollback", control.url),
        &json!({}),
    );
    assert_eq!(
        (status, &refused["code"]),
        (409, &json!("nothing_to_roll_back"))
    );
    let (_, channel) = authed_get(&http, &format!("{}/channels/production", control.url));
    let actions: Vec<&Value> = channel["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|event| &event["action"])
        .collect();
    assert_eq!(
        actions,
        [&json!("rollback"), &json!("publish"), &json!("publish")]
    );
    let (status, bundles) = authed_get(&http, &format!("{}/bundles", control.url));
    assert_eq!((status, bundles.as_array().unwrap().len()), (200, 2));

    // An experiment whose arms are the two bundles: the manifest carries the split and
    // the salt, the host loads both, and each viewer lands in the arm the module's own
    // assignment gives.
    let experiments = format!("{}/experiments", control.url);
    let start = json!({
        "name": "model-ab", "channel": "production", "salt": "ab-1",
        "variants": [
            {"name": "control", "bundle": first_sha, "weight": 1},
            {"name": "candidate", "bundle": second_sha, "weight": 1},
        ],
    });
    let mut unknown = start.clone();
    unknown["name"] = json!("other");
    unknown["variants"][1]["bundle"] = json!("e".repeat(64));
    let (status, refused) = authed_post(&http, &experiments, &unknown);
    assert_eq!((status, &refused["code"]), (404, &json!("unknown_bundle")));
    let (status, started) = authed_post(&http, &experiments, &start);
    assert_eq!(status, 201, "{started}");
    let (status, refused) = authed_post(&http, &experiments, &start);
    assert_eq!(
        (status, &refused["code"]),
        (409, &json!("experiment_exists"))
    );
    let manifest = fetch_published(&http, &store_url);
    assert_eq!(manifest["experiment"]["salt"], "ab-1");
    assert_eq!(
        manifest["experiment"]["variants"][1]["bundle"]["sha256"],
        json!(second_sha)
    );
    let started_at = Instant::now();
    loop {
        let (_, health) = get(&http, &format!("{}/health", host.url));
        if health["manifest_experiment"]["arms"]
            .as_array()
            .is_some_and(|arms| arms.len() == 2)
        {
            break;
        }
        assert!(
            started_at.elapsed() < Duration::from_secs(60),
            "{health}\n{}",
            host.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let reference = edge::rules::Experiment {
        name: "model-ab".into(),
        salt: "ab-1".into(),
        variants: ["control", "candidate"]
            .map(|name| edge::rules::Variant {
                name: name.into(),
                weight: 1,
                rules: None,
            })
            .to_vec(),
    };
    let mut per_arm = std::collections::BTreeMap::<String, usize>::new();
    for user in 1..=60_u64 {
        let (status, answer) = get(&http, &format!("{}/recommendations/{user}?n=5", host.url));
        assert_eq!(status, 200, "{answer}");
        let metadata = &answer["metadata"];
        let expected = &reference.assign(&user.to_string()).name;
        assert_eq!(metadata["experiment"], "model-ab");
        assert_eq!(&metadata["variant"], expected, "user {user}");
        let version = if expected == "control" {
            "fixture-1"
        } else {
            "fixture-s3-2"
        };
        assert_eq!(metadata["model_version"], version, "user {user}");
        assert_eq!(
            metadata["rules_experiment"], "channel-cap",
            "the bundle's own experiment"
        );
        *per_arm.entry(expected.clone()).or_default() += 1;
    }
    assert!(per_arm.values().all(|&n| n >= 15), "{per_arm:?}");
    // Stopping with a winner: its bundle serves everyone.
    let (status, stopped) = authed_post(
        &http,
        &format!("{experiments}/model-ab/stop"),
        &json!({"winner": "candidate"}),
    );
    assert_eq!(status, 200, "{stopped}");
    assert!(fetch_published(&http, &store_url)["experiment"].is_null());
    wait_for_version(&host, "fixture-s3-2");
    let (_, health) = get(&http, &format!("{}/health", host.url));
    assert!(health["manifest_experiment"].is_null(), "{health}");
    let (status, refused) = authed_post(&http, &format!("{experiments}/model-ab/stop"), &json!({}));
    assert_eq!((status, &refused["code"]), (409, &json!("not_running")));
    let (_, listed) = authed_get(&http, &experiments);
    assert_eq!(
        (
            &listed[0]["name"],
            &listed[0]["running"],
            &listed[0]["winner"]
        ),
        (&json!("model-ab"), &json!(false), &json!("candidate"))
    );

    // Past 16 MiB the upload goes to S3 in parts; what comes back is every byte.
    let mut noise = edgerec_e2e::requests::Stream(11);
    let big_section: Vec<u8> = (0..(20 << 20) / 8)
        .flat_map(|_| noise.next_u64().to_le_bytes())
        .collect();
    let big = edge::bundle::BundleBuilder::new("big-multipart", 1)
        .section(edge::bundle::SectionKind::Shard, big_section)
        .to_bytes()
        .unwrap();
    let (status, record) = upload(&big);
    assert_eq!(status, 201, "{record}\n{}", control.log_text());
    let key = record["key"].as_str().unwrap();
    let (status, cache, fetched) = plain_get(&http, &format!("{store_url}/{key}"));
    assert_eq!(
        (status, cache.as_str()),
        (200, "public, max-age=31536000, immutable")
    );
    assert_eq!(fetched.len(), big.len());
    assert_eq!(sha256_hex(&fetched), sha256_hex(&big));
}

/// Sends only the head of a POST that announces `length` bytes and waits for the server
/// to agree (`Expect: 100-continue`), as curl does for big uploads; returns the final
/// answer's status and JSON body.
fn declare_upload(base: &str, path: &str, content_type: &str, length: usize) -> (u16, Value) {
    use std::io::{Read, Write};
    let address = base.strip_prefix("http://").unwrap();
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: {content_type}\r\nContent-Length: {length}\r\n\
         Expect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(
        !text.contains("100 Continue"),
        "the server asked for the body: {text}"
    );
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[test]
fn refuses_bad_requests_with_clear_errors() {
    let fixture = synthetic_bundle();
    let state = tempfile::tempdir().unwrap();
    let store = state.path().join("store");
    let control = start_control_plane(
        state.path(),
        store.to_str().unwrap(),
        None,
        &["--max-artifact-mb", "8", "--max-body-mb", "1"],
    );
    let http = client();
    let url = |path: &str| format!("{}{path}", control.url);

    // Public: health and the store layout; everything else needs the token.
    assert_eq!(get(&http, &url("/health")).0, 200);
    for (method, path) in [
        (reqwest::Method::GET, "/channels"),
        (reqwest::Method::POST, "/bundles"),
        (reqwest::Method::POST, "/channels/production/publish"),
        (reqwest::Method::POST, "/ingest/interactions"),
        (reqwest::Method::GET, "/ingest/inferences"),
    ] {
        let response = http.request(method.clone(), url(path)).send().unwrap();
        assert_eq!(
            response.status().as_u16(),
            401,
            "{method} {path} without a token"
        );
        let wrong = http
            .request(method.clone(), url(path))
            .bearer_auth("not-the-token")
            .send()
            .unwrap();
        assert_eq!(
            wrong.status().as_u16(),
            401,
            "{method} {path} with a wrong token"
        );
    }

    // Bodies over the limits are refused from their declared length, before the upload.
    for (path, content_type, length) in [
        ("/bundles", "application/octet-stream", 9 << 20),
        ("/profiles", "application/msgpack", 9 << 20),
        ("/ingest/interactions", "application/x-ndjson", 2 << 20),
        ("/channels/production/publish", "application/json", 2 << 20),
    ] {
        let (status, body) = declare_upload(&control.url, path, content_type, length);
        assert_eq!(status, 413, "{path}: {body}");
        assert_eq!(body["code"], "payload_too_large", "{path}: {body}");
    }

    // Not bundles: garbage and a truncated real one, the error naming what is wrong.
    let post_bundle = |bytes: Vec<u8>| {
        authed(
            &http,
            reqwest::Method::POST,
            &url("/bundles"),
            "application/octet-stream",
            bytes,
        )
    };
    assert_eq!(
        code(post_bundle(b"not a bundle".to_vec())),
        (400, "invalid_bundle".to_owned())
    );
    let mut truncated = std::fs::read(&fixture.bundle).unwrap();
    truncated.truncate(truncated.len() - 1000);
    let (status, body) = post_bundle(truncated);
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("section"),
        "{body}"
    );
    assert!(
        !store.join("bundles").exists()
            || std::fs::read_dir(store.join("bundles")).unwrap().count() == 0
    );

    // Publishing what was never registered, or a malformed id.
    let unknown = "0".repeat(64);
    assert_eq!(
        code(authed_post(
            &http,
            &url("/channels/production/publish"),
            &json!({"bundle": unknown})
        )),
        (404, "unknown_bundle".to_owned())
    );
    assert_eq!(
        code(authed_post(
            &http,
            &url("/channels/production/publish"),
            &json!({"bundle": "../../etc"})
        )),
        (400, "invalid_request".to_owned())
    );
    assert_eq!(
        code(authed_post(
            &http,
            &url("/channels/production/publish"),
            &json!({"bundel": unknown})
        ))
        .0,
        422
    );
    assert_eq!(
        code(authed_post(
            &http,
            &url("/channels/production/rollback"),
            &json!({})
        )),
        (409, "nothing_to_roll_back".to_owned())
    );

    // Path traversal through channel names and store keys goes nowhere.
    for path in [
        "/channels/..%2F..%2Fescape/publish",
        "/channels/Production/publish",
        "/channels/a.json/publish",
    ] {
        let (status, body) = authed_post(&http, &url(path), &json!({"bundle": unknown}));
        assert_eq!(status, 400, "{path}: {body}");
    }
    for path in [
        "/store/manifests%2F..%2F..%2Fregistry.sqlite",
        "/store/manifests/..%2F..%2Fregistry.sqlite",
        "/store/bundles/..%2F..%2Fapi-token",
        "/store/registry.sqlite",
        "/store/manifests/production.json",
    ] {
        let (status, _, body) = plain_get(&http, &url(path));
        assert_eq!(status, 404, "{path}: {}", String::from_utf8_lossy(&body));
    }
    let escaped: Vec<_> = std::fs::read_dir(state.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.contains("escape"))
        .collect();
    assert!(escaped.is_empty(), "{escaped:?}");

    // Ingest: unknown encodings and malformed events are refused whole.
    let (status, body) = authed(
        &http,
        reqwest::Method::POST,
        &url("/ingest/interactions"),
        "text/plain",
        b"hello".to_vec(),
    );
    assert_eq!(
        (status, body["code"].as_str()),
        (415, Some("unsupported_media_type"))
    );
    let good = json!({"event_id": "e1", "user_id": 1, "video_id": 2, "interaction_type": "watch", "timestamp": 3});
    let (status, body) = authed(
        &http,
        reqwest::Method::POST,
        &url("/ingest/interactions"),
        "application/x-ndjson",
        format!("{good}\n{{\"event_id\": \"e2\"}}\n").into_bytes(),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("event 2"),
        "{body}"
    );
    let (_, listed) = authed_get(&http, &url("/ingest/interactions"));
    assert_eq!(listed["total"], 0, "a refused batch stores nothing");

    // The OpenAPI document is public and describes every route, each protected one with
    // the bearer scheme; its error schema is the one errors have.
    let (status, document) = get(&http, &url("/openapi.json"));
    assert_eq!(status, 200);
    assert!(
        document["openapi"].as_str().unwrap().starts_with("3."),
        "{document}"
    );
    let routes = [
        ("get", "/health", false),
        ("get", "/openapi.json", false),
        ("get", "/store/{key}", false),
        ("get", "/bundles", true),
        ("post", "/bundles", true),
        ("get", "/bundles/{sha256}", true),
        ("post", "/profiles", true),
        ("get", "/channels", true),
        ("get", "/channels/{name}", true),
        ("post", "/channels/{name}/publish", true),
        ("post", "/channels/{name}/rollback", true),
        ("post", "/ingest/inferences", true),
        ("get", "/ingest/inferences", true),
        ("post", "/ingest/interactions", true),
        ("get", "/ingest/interactions", true),
        ("post", "/runs", true),
        ("get", "/runs", true),
        ("get", "/runs/{id}", true),
        ("get", "/runs/{id}/log", true),
        ("get", "/data-versions", true),
        ("get", "/experiments", true),
        ("post", "/experiments", true),
        ("post", "/experiments/{name}/stop", true),
        ("get", "/experiments/{name}/analysis", true),
        ("get", "/online-metrics", true),
        ("post", "/feedback/merge", true),
        ("get", "/drift", true),
    ];
    let documented: usize = document["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| item.as_object().unwrap().len())
        .sum();
    assert_eq!(documented, routes.len(), "{document}");
    for (method, path, protected) in routes {
        let operation = &document["paths"][path][method];
        assert!(operation.is_object(), "{method} {path} is not documented");
        assert_eq!(
            operation["security"].is_array(),
            protected,
            "{method} {path}: security {}",
            operation["security"]
        );
    }
    assert_eq!(
        document["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let error_schema = &document["components"]["schemas"]["ErrorBody"]["properties"];
    assert!(error_schema["code"].is_object() && error_schema["message"].is_object());

    // Unknown routes and methods get the same error shape.
    assert_eq!(
        code(get(&http, &url("/nope"))),
        (404, "not_found".to_owned())
    );
    let response = http.delete(url("/health")).send().unwrap();
    assert_eq!(response.status().as_u16(), 405);
}

fn interaction_batch(batch: usize) -> (Vec<String>, Vec<u8>) {
    let ids: Vec<String> = (0..50)
        .map(|i| format!("interaction-{batch}-{i}"))
        .collect();
    let body = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            json!({
                "event_id": id, "request_id": format!("request-{batch}"), "user_id": i,
                "video_id": 1000 + i, "interaction_type": "click", "timestamp": 1_795_000_000 + i as i64,
            })
            .to_string()
                + "\n"
        })
        .collect::<String>();
    (ids, body.into_bytes())
}

fn inference_batch(batch: usize) -> (Vec<String>, Vec<u8>) {
    let ids: Vec<String> = (0..50).map(|i| format!("request-{batch}-{i}")).collect();
    let events: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            json!({
                "event_id": id, "request_id": id, "user_id": i, "served_at_ms": 1_795_000_000_000_i64,
                "model_version": "v1", "experiment": null, "variant": null,
                "items": [{"video_id": 1000 + i, "position": 1, "score": 0.5, "source": "personalized"}],
            })
        })
        .collect();
    (ids, rmp_serde::to_vec_named(&events).unwrap())
}

fn stored_ids(http: &Client, control: &Service, kind: &str) -> BTreeSet<String> {
    let (status, listed) = authed_get(http, &format!("{}/ingest/{kind}?limit=10000", control.url));
    assert_eq!(status, 200, "{listed}");
    listed["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|stored| stored["event"]["event_id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn acknowledged_ingest_survives_a_kill() {
    let state = tempfile::tempdir().unwrap();
    let store = state.path().join("store");
    let store = store.to_str().unwrap();
    let mut control = start_control_plane(state.path(), store, None, &[]);
    let http = client();
    let mut interactions = BTreeSet::new();
    let mut inferences = BTreeSet::new();
    let mut last_batch = Vec::new();
    for batch in 0..20 {
        let (ids, body) = inference_batch(batch);
        let (status, answer) = authed(
            &http,
            reqwest::Method::POST,
            &format!("{}/ingest/inferences", control.url),
            "application/msgpack",
            body,
        );
        assert_eq!((status, &answer["accepted"]), (200, &json!(50)), "{answer}");
        inferences.extend(ids);
        let (ids, body) = interaction_batch(batch);
        let (status, answer) = authed(
            &http,
            reqwest::Method::POST,
            &format!("{}/ingest/interactions", control.url),
            "application/x-ndjson",
            body.clone(),
        );
        assert_eq!((status, &answer["accepted"]), (200, &json!(50)), "{answer}");
        interactions.extend(ids);
        last_batch = body;
    }
    // SIGKILL right after the last acknowledgement: no shutdown code runs.
    control.kill();

    let control = start_control_plane(state.path(), store, None, &[]);
    assert_eq!(stored_ids(&http, &control, "inferences"), inferences);
    assert_eq!(stored_ids(&http, &control, "interactions"), interactions);
    // A sender that never saw the acknowledgement retries: nothing is stored twice.
    let (status, answer) = authed(
        &http,
        reqwest::Method::POST,
        &format!("{}/ingest/interactions", control.url),
        "application/x-ndjson",
        last_batch,
    );
    assert_eq!(
        (status, &answer["accepted"], &answer["duplicates"]),
        (200, &json!(0), &json!(50))
    );
}

/// Polls until `kind` holds at least `count` events; returns them.
fn wait_for_events(http: &Client, control: &Service, kind: &str, count: usize) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let (status, listed) =
            authed_get(http, &format!("{}/ingest/{kind}?limit=10000", control.url));
        assert_eq!(status, 200, "{listed}");
        let events: Vec<Value> = listed["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|stored| stored["event"].clone())
            .collect();
        if events.len() >= count {
            return events;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{} of {count} {kind} arrived",
            events.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_host_ships_what_it_serves_and_keeps_it_through_an_outage() {
    let fixture = synthetic_bundle();
    let state = tempfile::tempdir().unwrap();
    let store = state.path().join("store");
    let store = store.to_str().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut control = start_control_plane_on(&listen, state.path(), store, None, &[]);
    let publish = Command::new(binary("control-plane"))
        .arg("publish")
        .arg("--bundle")
        .arg(&fixture.bundle)
        .args(["--store", store, "--state"])
        .arg(state.path())
        .arg("--profiles-from")
        .arg(fixture.data())
        .output()
        .unwrap();
    stdout_of(&publish);
    let spool = tempfile::tempdir().unwrap();
    let manifest = format!("{}/store/manifests/production.json", control.url);
    let host = HostProcess::host(&[
        "--manifest",
        &manifest,
        "--ingest-url",
        &control.url,
        "--ingest-token",
        TOKEN,
        "--spool",
        spool.path().to_str().unwrap(),
        "--capture-interval-ms",
        "200",
    ]);
    let http = client();

    // Responses and an interaction without a request id, which the host joins.
    let mut answers = Vec::new();
    for user in 1..=5 {
        let (status, answer) = get(&http, &format!("{}/recommendations/{user}?n=6", host.url));
        assert_eq!(status, 200, "{answer}\n{}", host.log_text());
        answers.push(answer);
    }
    let clicked = answers[0]["recommendations"][2]["video_id"]
        .as_u64()
        .unwrap();
    let (status, _) = post(
        &http,
        &format!("{}/interactions", host.url),
        json!({"user_id": 1, "video_id": clicked, "type": "click"}).to_string(),
    );
    assert_eq!(status, 202);
    let inferences = wait_for_events(&http, &control, "inferences", 5);
    for (event, answer) in inferences.iter().zip(&answers) {
        assert_eq!(event["request_id"], answer["metadata"]["request_id"]);
        assert_eq!(event["model_version"], "fixture-1");
        let shown: Vec<&Value> = answer["recommendations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| &item["video_id"])
            .collect();
        let logged: Vec<&Value> = event["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| &item["video_id"])
            .collect();
        assert_eq!(shown, logged);
    }
    let interactions = wait_for_events(&http, &control, "interactions", 1);
    assert_eq!(
        (&interactions[0]["request_id"], &interactions[0]["position"]),
        (&answers[0]["metadata"]["request_id"], &json!(2)),
        "joined to the response that showed the video"
    );

    // The control plane goes down; the host keeps serving and spools.
    control.kill();
    for user in 6..=15 {
        let (status, _) = get(&http, &format!("{}/recommendations/{user}?n=6", host.url));
        assert_eq!(status, 200);
    }
    std::thread::sleep(Duration::from_millis(800));
    let spooled = std::fs::read_dir(spool.path().join("inferences"))
        .unwrap()
        .count();
    assert!(
        spooled > 0,
        "nothing spooled while the control plane was down"
    );
    let control = start_control_plane_on(&listen, state.path(), store, None, &[]);
    let inferences = wait_for_events(&http, &control, "inferences", 15);
    let ids: BTreeSet<&str> = inferences
        .iter()
        .map(|event| event["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 15, "every response once");
    let (_, _, metrics) = plain_get(&http, &format!("{}/metrics", host.url));
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics.contains(
            r#"edgerec_host_capture_events_total{stream="inferences",outcome="shipped"} 15"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains("edgerec_host_capture_ship_failures_total"));

    // An A/B readout from what was served: viewers in one arm click the top item of every
    // answer, the control's viewers one answer in four.
    let mut clicks = 0;
    for user in 100..400_u64 {
        let (status, answer) = get(&http, &format!("{}/recommendations/{user}?n=6", host.url));
        assert_eq!(status, 200);
        let variant = answer["metadata"]["variant"].as_str().unwrap().to_owned();
        if variant == "one-per-channel" || user % 4 == 0 {
            let video = answer["recommendations"][0]["video_id"].as_u64().unwrap();
            let (status, _) = post(
                &http,
                &format!("{}/interactions", host.url),
                json!({"user_id": user, "video_id": video, "type": "click"}).to_string(),
            );
            assert_eq!(status, 202);
            clicks += 1;
        }
    }
    wait_for_events(&http, &control, "interactions", 1 + clicks);
    wait_for_events(&http, &control, "inferences", 15 + 300);
    let (status, analysis) = authed_get(
        &http,
        &format!("{}/experiments/channel-cap/analysis", control.url),
    );
    assert_eq!(status, 200, "{analysis}");
    assert_eq!(analysis["control"], "control");
    let arms = analysis["arms"].as_array().unwrap();
    assert_eq!(arms.len(), 2, "{analysis}");
    assert_eq!(arms[1]["arm"], "one-per-channel");
    let ctr = &arms[1]["versus_control"][0];
    assert_eq!(ctr["metric"], "ctr");
    assert!(
        ctr["treatment"].as_f64() > ctr["control"].as_f64()
            && ctr["p_value"].as_f64().unwrap() < 0.001,
        "{analysis}"
    );
    let impressions: u64 = arms
        .iter()
        .map(|arm| arm["impressions"].as_u64().unwrap())
        .sum();
    assert_eq!(
        impressions,
        6 * 315,
        "every item of every captured response"
    );
    assert!(
        analysis["warnings"][0]
            .as_str()
            .unwrap()
            .contains("below the minimum sample"),
        "{analysis}"
    );
    // The command line reads the same registry and gives the same verdict.
    let table = stdout_of(
        &Command::new(binary("control-plane"))
            .args(["experiments", "analyze", "channel-cap", "--state"])
            .arg(state.path())
            .output()
            .unwrap(),
    );
    let treatment = table
        .lines()
        .find(|line| line.starts_with("one-per-channel"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        treatment.contains(&format!("{:.4}", ctr["p_value"].as_f64().unwrap())),
        "{table}"
    );
    assert!(table.contains("warning: arm"), "{table}");
    let (_, online) = authed_get(&http, &format!("{}/online-metrics", control.url));
    assert_eq!(online[0]["model_version"], "fixture-1");
    assert_eq!(online[0]["impressions"], 6 * 315);

    // Drift: the served viewers look like the training data until requests from elsewhere
    // arrive.
    let drift_of = |report: &Value, feature: &str| -> (f64, bool) {
        let entry = report["features"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["feature"] == feature)
            .unwrap_or_else(|| panic!("{report}"));
        (
            entry["psi"].as_f64().unwrap(),
            entry["alert"].as_bool().unwrap(),
        )
    };
    let (status, before) = authed_get(&http, &format!("{}/drift", control.url));
    assert_eq!(status, 200, "{before}");
    assert_eq!(before["serving_requests"], 315, "{before}");
    assert_eq!(before["model_version"], "fixture-1");
    eprintln!(
        "drift before: {:?}",
        ["country", "language", "age", "device"].map(|f| drift_of(&before, f))
    );
    for user in 0..200 {
        let (status, _) = post(
            &http,
            &format!("{}/recommendations", host.url),
            json!({"user_id": 5000 + user, "n": 3, "user_features": {"country": "ZZ", "language": "zz", "age": 90, "device": "fridge"}}).to_string(),
        );
        assert_eq!(status, 200);
    }
    wait_for_events(&http, &control, "inferences", 315 + 200);
    let (_, after) = authed_get(&http, &format!("{}/drift", control.url));
    eprintln!(
        "drift after: {:?}",
        ["country", "language", "age", "device"].map(|f| drift_of(&after, f))
    );
    for feature in ["country", "language", "age", "device"] {
        let (psi_before, alert_before) = drift_of(&before, feature);
        let (psi_after, alert_after) = drift_of(&after, feature);
        assert!(!alert_before && psi_before < 0.1, "{feature}: {before}");
        assert!(alert_after && psi_after > 0.25, "{feature}: {after}");
    }
    assert_eq!(after["alerts"].as_array().unwrap().len(), 4);

    // The loop closes: the events become labeled data in a new data version, and the
    // same pipeline retrains on it.
    let merged = spool.path().join("merged");
    let (status, report) = authed_post(
        &http,
        &format!("{}/feedback/merge", control.url),
        &json!({"base": fixture.data(), "out": merged}),
    );
    assert_eq!(status, 201, "{report}");
    assert_eq!(report["inferences"], 315 + 200);
    assert_eq!(report["labeled"], 6 * 315);
    assert_eq!(
        report["engaged"],
        1 + clicks,
        "every click joined to the item it was on"
    );
    assert_eq!(report["rows_added"], 6 * 315 + 1 + clicks);
    assert_eq!(
        report["skipped"], 200,
        "responses to viewers the data set does not know"
    );
    let labels = std::fs::read_to_string(merged.join("feedback_labels.csv")).unwrap();
    let header: Vec<&str> = labels.lines().next().unwrap().split(',').collect();
    let label_column = header.iter().position(|c| *c == "label").unwrap();
    let positives = labels
        .lines()
        .skip(1)
        .filter(|line| line.split(',').nth(label_column) == Some("1"))
        .count();
    assert_eq!(positives, 1 + clicks);
    let (status, again) = authed_post(
        &http,
        &format!("{}/feedback/merge", control.url),
        &json!({"base": fixture.data(), "out": merged}),
    );
    assert_eq!((status, &again["code"]), (409, &json!("exists")));
    let (status, queued) = authed_post(
        &http,
        &format!("{}/runs", control.url),
        &json!({"data": merged, "config": edgerec_e2e::FIXTURE_CONFIG}),
    );
    assert_eq!(status, 202, "{queued}");
    let run = wait_for_run(
        &http,
        &control,
        queued["id"].as_str().unwrap(),
        Duration::from_secs(900),
    );
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["data_version"], report["data_version"]["sha256"]);
    assert_eq!(
        run["stages"][8]["status"], "skipped",
        "no channel to publish to"
    );
}

/// Polls a run until it is no longer queued or running.
fn wait_for_run(http: &Client, control: &Service, id: &str, limit: Duration) -> Value {
    let started = Instant::now();
    loop {
        let (status, run) = authed_get(http, &format!("{}/runs/{id}", control.url));
        assert_eq!(status, 200, "{run}");
        if run["status"] != "queued" && run["status"] != "running" {
            return run;
        }
        assert!(
            started.elapsed() < limit,
            "run {id} still {} after {limit:?}: {run}",
            run["status"]
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn the_pipeline_runs_on_movielens_and_publishes_to_s3() {
    let fixture = synthetic_bundle();
    let s3_root = tempfile::tempdir().unwrap();
    let s3 = start_s3(s3_root.path());
    let state = tempfile::tempdir().unwrap();
    let store_url = format!("{}/edgerec/runs", s3.url);
    let control = start_control_plane(state.path(), "s3://edgerec/runs", Some(&s3.url), &[]);
    let http = client();
    let runs = format!("{}/runs", control.url);

    // Requests that cannot start a run.
    let work = tempfile::tempdir().unwrap();
    for refused in [
        json!({"data": "/nonexistent"}),
        json!({"data": fixture.data(), "config": "[two_tower]\nepochs = -1\n"}),
        json!({"data": fixture.data(), "publish": "../prod"}),
    ] {
        assert_eq!(
            code(authed_post(&http, &runs, &refused)),
            (400, "invalid_request".to_owned()),
            "{refused}"
        );
    }

    // A data set that breaks in the first stage: the run fails, says why, publishes nothing.
    let broken = work.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    for entry in std::fs::read_dir(fixture.data()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, broken.join(path.file_name().unwrap())).unwrap();
        }
    }
    let interactions = broken.join("interactions.parquet");
    let bytes = std::fs::read(&interactions).unwrap();
    std::fs::write(&interactions, &bytes[..bytes.len() / 2]).unwrap();
    let (status, queued) = authed_post(
        &http,
        &runs,
        &json!({"data": broken, "publish": "production"}),
    );
    assert_eq!(status, 202, "{queued}");
    let failed = wait_for_run(
        &http,
        &control,
        queued["id"].as_str().unwrap(),
        Duration::from_secs(120),
    );
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["stages"][0]["status"], "failed");
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.starts_with("stage preprocess:") && error.contains("interactions.parquet"),
        "{error}"
    );
    assert_eq!(
        authed_get(&http, &format!("{}/channels/production", control.url)).0,
        404,
        "a failed run publishes nothing"
    );

    // MovieLens-100k through every stage, published to production in S3.
    let source = std::env::var_os("EDGEREC_ML100K")
        .expect("EDGEREC_ML100K is not set: run `cargo xtask test`");
    let movielens = work.path().join("ml-100k");
    stdout_of(
        &Command::new(binary("control-plane"))
            .args(["import", "movielens"])
            .arg(&source)
            .arg("--out")
            .arg(&movielens)
            .output()
            .unwrap(),
    );
    let config = "[two_tower]\nepochs = 2\n\n[ranker]\niterations = 100\n";
    let started = Instant::now();
    let (status, queued) = authed_post(
        &http,
        &runs,
        &json!({"data": movielens, "config": config, "publish": "production"}),
    );
    assert_eq!(status, 202, "{queued}");
    let id = queued["id"].as_str().unwrap().to_owned();
    let (status, busy) = authed_post(&http, &runs, &json!({"data": movielens}));
    assert_eq!((status, &busy["code"]), (409, &json!("run_in_progress")));
    let run = wait_for_run(&http, &control, &id, Duration::from_secs(1800));
    let wall = started.elapsed();
    assert_eq!(run["status"], "succeeded", "{run}");
    let stages: Vec<(&str, &str)> = run["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        stages,
        [
            ("preprocess", "done"),
            ("features", "done"),
            ("two_tower", "done"),
            ("embeddings", "done"),
            ("shard", "done"),
            ("ranker", "done"),
            ("evaluation", "done"),
            ("registration", "done"),
            ("publish", "done"),
        ]
    );
    eprintln!(
        "pipeline on MovieLens-100k (epochs 2, 100 trees): {:.0} s wall; stages {}",
        wall.as_secs_f64(),
        run["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| format!(
                "{} {:.1}s",
                s["name"].as_str().unwrap(),
                s["seconds"].as_f64().unwrap_or(0.0)
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert!(run["metrics"]["retrieval"].is_object(), "{run}");
    assert!(run["metrics"]["ranking"].is_object(), "{run}");
    let bundle_sha = run["bundle"].as_str().unwrap().to_owned();
    let manifest = fetch_published(&http, &store_url);
    assert_eq!(manifest["bundle"]["sha256"], json!(bundle_sha));
    assert_eq!(manifest["model_version"], json!(id));
    assert!(manifest["profiles"]["sha256"].is_string());
    let (_, bundle) = authed_get(&http, &format!("{}/bundles/{bundle_sha}", control.url));
    assert_eq!(bundle["lineage"]["run"], json!(id));
    let (_, versions) = authed_get(&http, &format!("{}/data-versions", control.url));
    let trained_on = versions
        .as_array()
        .unwrap()
        .iter()
        .find(|version| version["sha256"] == bundle["lineage"]["data_version"])
        .unwrap_or_else(|| panic!("{versions}\n{bundle}"));
    assert_eq!(trained_on["interactions"], 100_000);
    assert_eq!(trained_on["source"], "movielens-100k");
    let (status, log) = {
        let response = http
            .get(format!("{}/runs/{id}/log", control.url))
            .bearer_auth(TOKEN)
            .send()
            .unwrap();
        (response.status().as_u16(), response.text().unwrap())
    };
    assert_eq!(status, 200);
    assert!(log.contains("== 9/9 publish"), "{log}");

    // A second publish, then a rollback: back to the pipeline's bundle.
    let (status, record) = authed(
        &http,
        reqwest::Method::POST,
        &format!("{}/bundles", control.url),
        "application/octet-stream",
        std::fs::read(&fixture.bundle).unwrap(),
    );
    assert_eq!(status, 201, "{record}");
    let (status, _) = authed_post(
        &http,
        &format!("{}/channels/production/publish", control.url),
        &json!({"bundle": record["sha256"]}),
    );
    assert_eq!(status, 200);
    assert_eq!(
        fetch_published(&http, &store_url)["bundle"]["sha256"],
        record["sha256"]
    );
    let (status, _) = authed_post(
        &http,
        &format!("{}/channels/production/rollback", control.url),
        &json!({}),
    );
    assert_eq!(status, 200);
    assert_eq!(
        fetch_published(&http, &store_url)["bundle"]["sha256"],
        json!(bundle_sha)
    );
}
