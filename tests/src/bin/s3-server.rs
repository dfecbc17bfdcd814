//! A real S3-compatible server on loopback for the end-to-end tests: s3s-fs (the s3s
//! project's S3 over a folder) with SigV4 authentication and a CDN-like policy: anyone
//! may read objects, only signed requests with the configured key may do anything else.
//!
//! `s3-server ROOT ACCESS_KEY SECRET_KEY [BUCKET...]` creates the buckets (folders under
//! ROOT), listens on a free loopback port and prints `s3 listening on http://ADDR`.

use std::io::Write;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use s3s::access::{S3Access, S3AccessContext};
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

struct PublicReads;

#[async_trait::async_trait]
impl S3Access for PublicReads {
    async fn check(&self, cx: &mut S3AccessContext<'_>) -> s3s::S3Result<()> {
        let read = matches!(cx.s3_op().name(), "GetObject" | "HeadObject");
        if read || cx.credentials().is_some() {
            Ok(())
        } else {
            Err(s3s::s3_error!(AccessDenied, "only reads are anonymous"))
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [root, access_key, secret_key, buckets @ ..] = args.as_slice() else {
        eprintln!("usage: s3-server ROOT ACCESS_KEY SECRET_KEY [BUCKET...]");
        std::process::exit(2);
    };
    for bucket in buckets {
        std::fs::create_dir_all(std::path::Path::new(root).join(bucket))
            .unwrap_or_else(|e| panic!("creating bucket {bucket}: {e}"));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let filesystem = s3s_fs::FileSystem::new(root).expect("the root folder is usable");
        let mut builder = S3ServiceBuilder::new(filesystem);
        builder.set_auth(SimpleAuth::from_single(
            access_key.clone(),
            secret_key.clone(),
        ));
        builder.set_access(PublicReads);
        let service = builder.build();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let address = listener.local_addr().expect("a bound address");
        println!("s3 listening on http://{address}");
        std::io::stdout().flush().expect("stdout");
        let connections = Builder::new(TokioExecutor::new());
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                continue;
            };
            let connection = connections
                .serve_connection(TokioIo::new(socket), service.clone())
                .into_owned();
            tokio::spawn(async move {
                let _ = connection.await;
            });
        }
    });
}
