//! The wasmtime host that will serve the REST API from the edge module (issue 7).
//! Until it exists, it says so and fails rather than pretending to serve.

fn main() -> std::process::ExitCode {
    eprintln!("edgerec host: not built yet (see issue 7, the wasmtime host); nothing is served");
    std::process::ExitCode::FAILURE
}
