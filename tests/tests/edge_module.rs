//! The edge module (`cargo xtask dist`'s build) in wasmtime, through the raw ABI, against
//! the same code run natively: identical answers to the same requests, and bad input
//! answered with errors, never traps.

use edge::recommend::{Recommender, Request, Response, StageMs};
use edgerec_e2e::requests::varied_requests;
use edgerec_e2e::{edge_wasm, host_artifacts, synthetic_bundle};
use host::module::{CallError, EdgeInstance, EdgeModule, Limits};

const NOW: i64 = 1_795_000_000;

/// Compiled once per build of the module (Cranelift takes seconds on it), cached where
/// the hosts that tests start find it too.
fn module() -> &'static EdgeModule {
    static MODULE: std::sync::OnceLock<EdgeModule> = std::sync::OnceLock::new();
    MODULE.get_or_init(|| {
        let cache = host_artifacts().join("compiled");
        EdgeModule::load(&edge_wasm(), Some(&cache), true).unwrap()
    })
}

fn instance(module: &EdgeModule, bundle: &[u8]) -> EdgeInstance {
    let mut instance = module.instantiate(Limits::default()).unwrap();
    instance.load_bundle(bundle).unwrap();
    instance
}

/// A response without the host clock's stage times (native runs record none).
fn untimed(mut response: Response) -> Response {
    response.metadata.stage_ms = StageMs::default();
    response.metadata.latency_ms = 0.0;
    response
}

#[test]
fn a_thousand_requests_answer_identically_in_wasmtime_and_natively() {
    let bundle = std::fs::read(&synthetic_bundle().bundle).unwrap();
    let native = Recommender::from_bundle(&bundle).unwrap();
    let mut wasm = instance(module(), &bundle);
    let mut answered = 0;
    let mut refused = 0;
    for (index, request) in varied_requests(native.catalog(), 1000, true)
        .into_iter()
        .enumerate()
    {
        let bytes = rmp_serde::to_vec_named(&request).unwrap();
        let expected = native
            .start(request.clone())
            .map(|run| run.finish(&native, StageMs::default()));
        match (expected, wasm.recommend(&bytes)) {
            (Ok(expected), Ok(answer)) => {
                let got: Response = rmp_serde::from_slice(&answer.response).unwrap();
                assert_eq!(untimed(got), expected, "request {index}: {request:?}");
                assert!(answer.stage_ms.iter().all(|ms| *ms >= 0.0));
                answered += 1;
            }
            (Err(expected), Err(CallError::Refused { code, message })) => {
                assert_eq!(
                    (code.as_str(), message),
                    (expected.code(), expected.to_string()),
                    "request {index}"
                );
                refused += 1;
            }
            (expected, got) => panic!("request {index}: native {expected:?}, wasm {got:?}"),
        }
    }
    assert!(
        answered > 900 && refused > 0,
        "{answered} answered, {refused} refused"
    );
}

#[test]
fn bad_input_gets_errors_and_the_instance_keeps_serving() {
    let bundle = std::fs::read(&synthetic_bundle().bundle).unwrap();
    let mut wasm = module().instantiate(Limits::default()).unwrap();
    let request = rmp_serde::to_vec_named(&Request::new(10, NOW)).unwrap();

    let refusal = |result: Result<_, CallError>| match result {
        Err(CallError::Refused { code, message }) => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    };
    let (code, _) = refusal(wasm.recommend(&request).map(|_| ()));
    assert_eq!(code, "no_bundle", "recommend before any bundle");

    let (code, message) = refusal(wasm.load_bundle(&bundle[..bundle.len() / 3]).map(|_| ()));
    assert_eq!(code, "invalid_bundle", "{message}");
    assert!(message.contains("section"), "{message}");
    let (code, _) = refusal(wasm.load_bundle(b"not a bundle at all").map(|_| ()));
    assert_eq!(code, "invalid_bundle");

    let summary = wasm.load_bundle(&bundle).unwrap();
    let native = Recommender::from_bundle(&bundle).unwrap().summary();
    assert_eq!(
        (
            summary.model_version,
            summary.videos,
            summary.indexed_videos
        ),
        (native.model_version, native.videos, native.indexed_videos)
    );
    assert_eq!(
        (summary.trees, summary.experiments),
        (native.trees, native.experiments)
    );
    let good = wasm.recommend(&request).unwrap();

    let mut corrupt = bundle.clone();
    let at = corrupt.len() / 2;
    corrupt[at] ^= 1;
    let (code, _) = refusal(wasm.load_bundle(&corrupt).map(|_| ()));
    assert_eq!(code, "invalid_bundle");
    let (code, message) = refusal(wasm.recommend(b"\x92\xc1 not msgpack").map(|_| ()));
    assert_eq!(code, "invalid_request", "{message}");
    let (code, _) = refusal(wasm.recommend(b"").map(|_| ()));
    assert_eq!(code, "invalid_request");
    let mut huge = Request::new(1_000_000, NOW);
    huge.watch_history = (0..100_000).collect();
    let (code, message) = refusal(
        wasm.recommend(&rmp_serde::to_vec_named(&huge).unwrap())
            .map(|_| ()),
    );
    assert_eq!(code, "invalid_request", "{message}");
    let mut nan_age = Request::new(10, NOW);
    nan_age.user_features.age = Some(f64::NAN);
    let (code, message) = refusal(
        wasm.recommend(&rmp_serde::to_vec_named(&nan_age).unwrap())
            .map(|_| ()),
    );
    assert!(
        code == "invalid_request" && message.contains("age"),
        "{message}"
    );

    // After every refusal the last good bundle still serves, with the same answer.
    let again = wasm.recommend(&request).unwrap();
    assert_eq!(
        untimed(rmp_serde::from_slice(&again.response).unwrap()),
        untimed(rmp_serde::from_slice(&good.response).unwrap())
    );
}

#[test]
fn the_precompiled_module_is_cached_and_reused() {
    let cache = tempfile::tempdir().unwrap();
    let wasm = edge_wasm();
    let first = EdgeModule::load(&wasm, Some(cache.path()), true).unwrap();
    let path = first.cached_at.clone().unwrap();
    let written = std::fs::metadata(&path).unwrap().modified().unwrap();
    drop(first);
    let second = EdgeModule::load(&wasm, Some(cache.path()), true).unwrap();
    assert_eq!(second.cached_at.as_deref(), Some(path.as_path()));
    assert_eq!(
        std::fs::metadata(&path).unwrap().modified().unwrap(),
        written,
        "the second load reads the compilation, it does not redo it"
    );
    let bundle = std::fs::read(&synthetic_bundle().bundle).unwrap();
    let mut served = instance(&second, &bundle);
    served
        .recommend(&rmp_serde::to_vec_named(&Request::new(5, NOW)).unwrap())
        .unwrap();
}
