//! Helpers shared by the end-to-end tests: they start edgerec's real binaries.

use std::path::PathBuf;
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
