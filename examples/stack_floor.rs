//! The stack's floor for `make bench`: the sidecar's own server loop and upstream pool (tokio,
//! hyper server on one worker thread per core, pooled hyper client) doing only the data flow: read the request, send it
//! upstream on a kept-alive connection, read the answer whole, send it back. None of the
//! sidecar's routing, parsing, pricing, headers or metrics.
//! Usage: `stack_floor LISTEN UPSTREAM_ADDR UPSTREAM_PATH`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use llm_sidecar::body::{full, ProxyBody};
use llm_sidecar::proxy::server;
use llm_sidecar::upstream::Upstream;
use tokio::net::TcpListener;

// The sidecar binary's allocator: the floor differs from it only by the work it leaves out.
#[path = "../src/allocator.rs"]
mod allocator;

#[global_allocator]
static ALLOCATOR: allocator::Mimalloc = allocator::Mimalloc;

struct Floor {
    upstream: Arc<Upstream>,
    uri: Uri,
    host: HeaderValue,
}

impl Floor {
    async fn forward(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let failed = |why: String| {
            let mut response = Response::new(full(why));
            *response.status_mut() = StatusCode::BAD_GATEWAY;
            response
        };
        let (mut parts, body) = req.into_parts();
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(err) => return failed(err.to_string()),
        };
        parts.uri = self.uri.clone();
        parts.headers.insert(header::HOST, self.host.clone());
        let request = Request::from_parts(parts, Full::new(body));
        let (response, lease) = match self.upstream.send(request).await {
            Ok(pair) => pair,
            Err(err) => return failed(err.to_string()),
        };
        let (parts, body) = response.into_parts();
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(err) => return failed(err.to_string()),
        };
        if let Some(lease) = lease {
            lease.release();
        }
        Response::from_parts(parts, full(body))
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, upstream, path] = args.as_slice() else {
        eprintln!("usage: stack_floor LISTEN UPSTREAM_ADDR UPSTREAM_PATH");
        std::process::exit(64);
    };
    // The sidecar's default: one data-port worker per core, each with its own pools.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let floor = Arc::new(Floor {
        upstream: Upstream::for_workers(Duration::from_secs(5), None, workers)?,
        uri: format!("http://{upstream}{path}")
            .parse()
            .map_err(std::io::Error::other)?,
        host: HeaderValue::from_str(upstream).map_err(std::io::Error::other)?,
    });
    let listener = TcpListener::bind(listen).await?;
    println!("stack floor listening on {}", listener.local_addr()?);
    // Never shut down: the bench kills the process.
    let (_keep, shutdown) = tokio::sync::watch::channel(false);
    let handler = move |req, _peer| {
        let floor = floor.clone();
        async move { Ok::<_, Infallible>(floor.forward(req).await) }
    };
    server::serve_on_workers(
        listener,
        // The sidecar's default header-read timeout.
        server::builder(Duration::from_secs(10)),
        handler,
        shutdown,
        Duration::ZERO,
        workers,
    )
    .await;
    Ok(())
}
