//! `cargo xtask bench`: the edge module against its budgets, on the bundle named by
//! `EDGEREC_BENCH_BUNDLE` (the xtask builds a 100,000-video one), with the native build of
//! the same code measured in the same run, request by request, as the baseline.
//!
//! Prints: the bundle's size by section; the module's compile and cached-load time;
//! instantiate + `load_bundle` (an edge worker's cold start); `recommend` end to end and
//! per stage, median and p99, in wasmtime and natively, and their ratio.

use std::time::{Duration, Instant};

use edge::bundle::BundleView;
use edge::recommend::{Recommender, Response, Stage};
use edgerec_e2e::edge_wasm;
use edgerec_e2e::requests::varied_requests;
use host::module::{EdgeModule, Limits};

/// Median and p99 (nearest rank) of `samples`, in milliseconds.
fn summary(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
        samples[rank - 1]
    };
    (at(0.5), at(0.99))
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Where native loading spends its time, part by part (the same steps as
/// `Recommender::from_shared_bundle`, median of 5; the remainder is the recommender's
/// indexes over shard and catalogue).
fn load_breakdown(bundle: &[u8]) -> anyhow::Result<()> {
    use edge::bundle::SectionKind;
    use edge::catalog::Catalog;
    use edge::preprocess::Preprocessor;
    use edge::ranker::RankerModel;
    use edge::shard::Shard;
    use edge::tower::{TowerTables, UserTower, UserTowerSpec};

    let shared = bytes::Bytes::copy_from_slice(bundle);
    let view = BundleView::parse(&shared)?;
    let spec = UserTowerSpec::from_bytes(view.require(SectionKind::TowerSpec)?)?;
    let time = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
        let mut samples = Vec::new();
        for _ in 0..5 {
            let started = Instant::now();
            f()?;
            samples.push(ms(started.elapsed()));
        }
        Ok(summary(samples).0)
    };
    let parts = [
        (
            "parse + xxh3 of every section",
            time(&mut || Ok(BundleView::parse(bundle).map(drop)?))?,
        ),
        (
            "user tower (tract: parse, optimise)",
            time(&mut || {
                let tables = view
                    .section(SectionKind::TowerTables)
                    .map(|section| TowerTables::from_section(shared.slice_ref(section)))
                    .transpose()?;
                let tower = view.require(SectionKind::UserTower)?;
                Ok(UserTower::load_with_tables(tower, tables, spec.clone()).map(drop)?)
            })?,
        ),
        (
            "shard (validate, in place)",
            time(&mut || {
                let section = shared.slice_ref(view.require(SectionKind::Shard)?);
                Ok(Shard::open_verified(section).map(drop)?)
            })?,
        ),
        (
            "catalogue (MessagePack)",
            time(&mut || Ok(Catalog::from_bytes(view.require(SectionKind::Videos)?).map(drop)?))?,
        ),
        (
            "preprocessor",
            time(&mut || {
                Ok(Preprocessor::from_bytes(view.require(SectionKind::Preprocessor)?).map(drop)?)
            })?,
        ),
        (
            "ranker",
            time(&mut || {
                Ok(
                    RankerModel::from_bundle_section(view.require(SectionKind::Ranker)?)
                        .map(drop)?,
                )
            })?,
        ),
    ];
    let whole = time(&mut || Ok(Recommender::from_shared_bundle(shared.clone()).map(drop)?))?;
    println!("native load by part (median of 5), ms:");
    let mut parts_sum = 0.0;
    for (part, median) in parts {
        println!("  {part:<38} {median:>8.1}");
        parts_sum += median;
    }
    println!(
        "  {:<38} {:>8.1}",
        "the rest (indexes, rules, experiments)",
        whole - parts_sum
    );
    println!("  {:<38} {whole:>8.1}", "from_shared_bundle, whole");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let Some(bundle_path) = std::env::var_os("EDGEREC_BENCH_BUNDLE") else {
        anyhow::bail!("EDGEREC_BENCH_BUNDLE is not set: run `cargo xtask bench`");
    };
    let requests = env_number("EDGEREC_BENCH_REQUESTS", 2000);
    let loads = env_number("EDGEREC_BENCH_LOADS", 20);
    let bundle = std::fs::read(&bundle_path)?;
    let wasm = edge_wasm();

    let view = BundleView::parse(&bundle)?;
    println!(
        "bundle: {:.1} MB ({} sections)",
        bundle.len() as f64 / 1e6,
        view.header.sections.len()
    );
    for section in &view.header.sections {
        println!(
            "  {:<13} {:>9.2} MB",
            section.kind.name(),
            section.length as f64 / 1e6
        );
    }
    println!("module: {:.2} MB", wasm.len() as f64 / 1e6);

    let cache = tempfile::tempdir()?;
    let compiled = EdgeModule::load(&wasm, Some(cache.path()), false)?;
    let cold_compile = compiled.compile_time;
    drop(compiled);
    let module = EdgeModule::load(&wasm, Some(cache.path()), false)?;
    let guarded = EdgeModule::load(&wasm, Some(cache.path()), true)?;
    println!(
        "compile with Cranelift: {:.0} ms; load the cached compilation: {:.1} ms",
        ms(cold_compile),
        ms(module.compile_time)
    );

    // Cold start: a fresh instance, its constructors, the bundle copied in and loaded.
    let mut wasm_loads = Vec::new();
    let mut native_loads = Vec::new();
    let mut instance = None;
    for _ in 0..loads {
        let started = Instant::now();
        let mut fresh = module.instantiate(Limits::default())?;
        fresh.load_bundle(&bundle)?;
        wasm_loads.push(ms(started.elapsed()));
        instance = Some(fresh);
        // Like the host's copy of the bundle into the instance's memory.
        let started = Instant::now();
        let native = Recommender::from_shared_bundle(bytes::Bytes::copy_from_slice(&bundle))?;
        native_loads.push(ms(started.elapsed()));
        drop(native);
    }
    let mut instance = instance.expect("at least one load");
    load_breakdown(&bundle)?;
    let mut guarded = guarded.instantiate(Limits::default())?;
    guarded.load_bundle(&bundle)?;
    let native = Recommender::from_bundle(&bundle)?;
    let (wasm_median, wasm_p99) = summary(wasm_loads);
    let (native_median, native_p99) = summary(native_loads);
    println!(
        "instantiate + load_bundle ({loads} times): wasmtime median {wasm_median:.1} ms, p99 {wasm_p99:.1} ms; native median {native_median:.1} ms, p99 {native_p99:.1} ms; ratio {:.2}",
        wasm_median / native_median
    );

    // Requests alternate between the two builds, so both see the same machine noise.
    let batch = varied_requests(native.catalog(), requests, false);
    let mut guarded_total = Vec::new();
    let mut wasm_total = Vec::new();
    let mut native_total = Vec::new();
    let mut wasm_stages: [Vec<f64>; 5] = Default::default();
    let mut native_stages: [Vec<f64>; 5] = Default::default();
    let mut candidates = Vec::new();
    for request in &batch {
        let bytes = rmp_serde::to_vec_named(request)?;
        let started = Instant::now();
        let answer = instance.recommend(&bytes)?;
        wasm_total.push(ms(started.elapsed()));
        for (slot, value) in wasm_stages.iter_mut().zip(answer.stage_ms) {
            slot.push(value);
        }

        let started = Instant::now();
        guarded.recommend(&bytes)?;
        guarded_total.push(ms(started.elapsed()));

        let origin = Instant::now();
        let mut clock = || ms(origin.elapsed());
        let started = Instant::now();
        let response: Response = native.recommend(request.clone(), &mut clock)?;
        native_total.push(ms(started.elapsed()));
        let stage = response.metadata.stage_ms;
        for (slot, value) in native_stages.iter_mut().zip([
            stage.tower,
            stage.retrieval,
            stage.filtering,
            stage.ranking,
            stage.ordering,
        ]) {
            slot.push(value);
        }
        candidates.push(f64::from(response.metadata.candidates_after_filtering));
    }
    let (candidates_median, _) = summary(candidates);
    println!(
        "recommend, {requests} varied requests (median {candidates_median:.0} candidates ranked), ms:"
    );
    println!(
        "  {:<10} {:>13} {:>11} {:>13} {:>11} {:>14}",
        "stage", "wasm median", "wasm p99", "native median", "native p99", "ratio (median)"
    );
    let row = |name: &str, wasm: Vec<f64>, native: Vec<f64>| {
        let (wm, wp) = summary(wasm);
        let (nm, np) = summary(native);
        println!(
            "  {name:<10} {wm:>13.3} {wp:>11.3} {nm:>13.3} {np:>11.3} {:>14.2}",
            wm / nm.max(1e-6)
        );
    };
    for (index, stage) in Stage::ALL.iter().enumerate() {
        row(
            stage.name(),
            std::mem::take(&mut wasm_stages[index]),
            std::mem::take(&mut native_stages[index]),
        );
    }
    row("total", wasm_total, native_total.clone());
    row("deadlines", guarded_total, native_total);
    println!(
        "  (wasm: no deadline checks; `deadlines`: the same module compiled with epoch interruption, end to end)"
    );
    Ok(())
}
