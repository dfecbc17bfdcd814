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
  demo       fetch data; generate, import, split, fit preprocessing, train the two-tower model; print a summary
  test       fetch test data, build the binaries, run every test (args go to cargo test)
  fixtures   fetch MovieLens-100k into the cache folder and print its path

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

fn main() -> std::process::ExitCode {
    let mut args = std::env::args_os().skip(1);
    let task = args.next().and_then(|t| t.into_string().ok());
    let rest: Vec<OsString> = args.collect();
    let result = match task.as_deref() {
        Some("demo") => demo(),
        Some("test") => test(&rest),
        Some("fixtures") => movielens().map(|dir| println!("{}", dir.display())),
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
    Path::new(env!("CARGO_MANIFEST_DIR"))
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

fn ml100k_complete(dir: &Path) -> bool {
    ML100K_FILES
        .iter()
        .all(|(name, sha)| sha256_hex(&dir.join(name)).is_ok_and(|found| found == *sha))
}

/// MovieLens-100k in RecBole's atomic layout, from the `recbole` wheel on PyPI (the
/// project's data files are not committed). Checked by sha256; fetched only when missing.
fn movielens() -> Result<PathBuf> {
    let dir = cache_dir()?.join("ml-100k");
    if ml100k_complete(&dir) {
        return Ok(dir);
    }
    eprintln!(
        "xtask: fetching MovieLens-100k from the {RECBOLE} wheel into {}",
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
            RECBOLE,
            "-d",
        ])
        .arg(&download))
    .context("pip download of the recbole wheel (needs python3 with pip and access to PyPI)")?;
    let wheel = std::fs::read_dir(&download)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| {
            path.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("recbole-1.2.1"))
        })
        .context("pip reported success but left no recbole wheel")?;
    // Python's zipfile module extracts just the three members; no unzip tool needed.
    let staging = cache_dir()?.join("ml-100k.partial");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    let script = "import sys, zipfile, pathlib\n\
        z = zipfile.ZipFile(sys.argv[1])\n\
        out = pathlib.Path(sys.argv[2])\n\
        for name in sys.argv[3:]:\n\
        \x20   (out / name).write_bytes(z.read('recbole/dataset_example/ml-100k/' + name))\n";
    let mut extract = Command::new("python3");
    extract.arg("-c").arg(script).arg(&wheel).arg(&staging);
    extract.args(ML100K_FILES.iter().map(|(name, _)| name));
    run(&mut extract).context("extracting MovieLens-100k from the wheel")?;
    ensure!(
        ml100k_complete(&staging),
        "the files extracted from {} do not have the expected sha256",
        wheel.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&staging, &dir)?;
    Ok(dir)
}

/// Python packages the tests use as outside referees (never the product): the official
/// ONNX checker and onnxruntime. Installed once into a virtualenv in the cache folder.
const REFEREE_PACKAGES: [&str; 3] = ["onnx==1.23.2", "onnxruntime==1.31.1", "numpy"];

/// The referee virtualenv's python, created and filled when missing.
fn referee_python() -> Result<PathBuf> {
    let venv = cache_dir()?.join("referee-venv");
    let python = venv.join("bin").join("python");
    let ready = |python: &Path| {
        Command::new(python)
            .args(["-c", "import onnx, onnxruntime, numpy"])
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
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(REFEREE_PACKAGES))
    .context("pip install of the referee packages")?;
    ensure!(
        ready(&python),
        "the referee packages do not import after installation"
    );
    Ok(python)
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

fn test(args: &[OsString]) -> Result<()> {
    let ml100k = movielens()?;
    let referee = referee_python()?;
    // End-to-end tests start the real binaries, so build them first. All targets at once
    // unify features as `cargo test` will, so the test run reuses this build.
    run(cargo().args(["build", "--workspace", "--all-targets"]))?;
    run(cargo()
        .args(["test", "--workspace"])
        .args(args)
        .env("EDGEREC_ML100K", &ml100k)
        .env("EDGEREC_REFEREE_PYTHON", &referee)
        // candle's CPU barrier pool busy-waits; on a shared 2-core machine one thread is
        // faster (see shared/NOTES.md).
        .env("CANDLE_NUM_THREADS", "1")
        .env("EDGEREC_BIN_DIR", target_dir().join("debug")))
}

fn demo() -> Result<()> {
    let ml100k = movielens()?;
    run(cargo().args(["build", "--release", "--package", "control-plane"]))?;
    let control_plane = target_dir().join("release").join("control-plane");
    let out = root().join(".edgerec").join("demo");
    let synthetic = out.join("synthetic");
    let movielens = out.join("ml-100k");
    let step = |args: &[&dyn AsRef<std::ffi::OsStr>]| {
        let mut command = Command::new(&control_plane);
        command.env("CANDLE_NUM_THREADS", "1");
        for arg in args {
            command.arg(arg);
        }
        run(&mut command)
    };
    println!("== synthetic data (the seed's defaults)");
    step(&[&"generate", &"--out", &synthetic])?;
    step(&[&"split", &"--data", &synthetic])?;
    step(&[&"preprocess", &"--data", &synthetic])?;
    println!("== MovieLens-100k");
    step(&[&"import", &"movielens", &ml100k, &"--out", &movielens])?;
    step(&[&"split", &"--data", &movielens])?;
    step(&[&"preprocess", &"--data", &movielens])?;
    println!("== two-tower retrieval on MovieLens-100k (about 5 minutes)");
    step(&[&"train", &"two-tower", &"--data", &movielens])?;
    println!(
        "\ndemo data in {}\n(the ONNX export, the shard, the ranker, bundles, the host and the browser demo are not built yet: see the open issues)",
        out.display()
    );
    Ok(())
}
