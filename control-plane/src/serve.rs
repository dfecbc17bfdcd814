//! `control-plane serve`: opens the registry and the store, settles the API token, binds
//! and serves [`crate::server::router`] until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use crate::object_store::{ObjectStore, S3Options};
use crate::registry::Registry;
use crate::server::{ControlPlane, Settings, manifest_path, router};

/// How to run the service.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Folder of the registry database (and the generated token).
    pub state: PathBuf,
    /// The object store: a folder, `file:///folder` or `s3://bucket/prefix`.
    pub store: String,
    /// S3 options.
    pub s3: S3Options,
    /// The API token; `None` reads or creates `STATE/api-token`.
    pub token: Option<String>,
    /// Largest bundle or profiles upload, bytes.
    pub max_artifact_bytes: usize,
    /// Largest JSON or ingest body, bytes.
    pub max_body_bytes: usize,
    /// The browser demo's folder (`www/` with the browser build in `pkg/`), served at
    /// `/demo/`.
    pub www: Option<PathBuf>,
}

/// The token in `path`, or a new random one written there (readable by the owner only).
pub fn token_from_file(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    use rand::TryRngCore;
    let mut secret = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut secret)
        .context("the OS random source failed")?;
    let token: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    if let Some(folder) = path.parent() {
        std::fs::create_dir_all(folder)
            .with_context(|| format!("creating {}", folder.display()))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut file, format!("{token}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(token)
}

/// Runs the service until Ctrl-C or SIGTERM.
pub async fn serve(options: ServeOptions) -> anyhow::Result<()> {
    let database = Registry::path_in(&options.state);
    let registry = Registry::open(&database)
        .with_context(|| format!("opening the registry {}", database.display()))?;
    let store = ObjectStore::open(&options.store, &options.s3).await?;
    let (token, token_source) = match options.token {
        Some(token) if !token.trim().is_empty() => {
            (token.trim().to_owned(), "the given token".to_owned())
        }
        Some(_) => anyhow::bail!("the API token is empty"),
        None => {
            let path = options.state.join("api-token");
            (
                token_from_file(&path)?,
                format!("the token in {}", path.display()),
            )
        }
    };
    let store_name = store.describe();
    let pipeline = crate::pipeline::PipelineContext {
        exe: std::env::current_exe().context("finding this program")?,
        state: options.state.clone(),
        store: options.store.clone(),
        s3: options.s3.clone(),
        echo: true,
    };
    let control_plane = Arc::new(ControlPlane::new(
        registry,
        store,
        pipeline,
        Settings {
            token,
            max_artifact_bytes: options.max_artifact_bytes,
            max_body_bytes: options.max_body_bytes,
            www: options.www.clone(),
        },
    ));
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("binding {}", options.listen))?;
    let address = listener.local_addr()?;
    println!("edgerec control plane listening on http://{address}");
    println!(
        "  registry {}; store {store_name} (public reads at http://{address}{}); writes need {token_source} as a bearer token",
        database.display(),
        manifest_path("<channel>")
    );
    if let Some(www) = &options.www {
        println!(
            "  browser demo at http://{address}/demo/ (from {})",
            www.display()
        );
    }
    axum::serve(listener, router(control_plane))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving")
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_token_is_kept_and_private() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("state").join("api-token");
        let first = token_from_file(&path).unwrap();
        assert_eq!(first.len(), 64);
        assert_eq!(token_from_file(&path).unwrap(), first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
