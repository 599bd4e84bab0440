//! The stack's floor for `make bench`: the same tokio, hyper server and pooled hyper client
//! data flow as the sidecar (read the request, send it upstream on a kept-alive connection,
//! read the answer whole, send it back), with none of the sidecar's own work.
//! Usage: `stack_floor LISTEN UPSTREAM_ADDR UPSTREAM_PATH`.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

struct Pool {
    upstream: String,
    path: Uri,
    idle: Mutex<Vec<http1::SendRequest<Full<Bytes>>>>,
}

impl Pool {
    async fn sender(&self, pooled: bool) -> std::io::Result<http1::SendRequest<Full<Bytes>>> {
        let idle = if pooled {
            self.idle.lock().map(|mut idle| idle.pop()).unwrap_or(None)
        } else {
            None
        };
        if let Some(sender) = idle {
            return Ok(sender);
        }
        let stream = TcpStream::connect(&self.upstream).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        Ok(sender)
    }

    async fn forward(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let failed = |why: String| {
            let mut response = Response::new(Full::new(Bytes::from(why)));
            *response.status_mut() = http::StatusCode::BAD_GATEWAY;
            response
        };
        let (mut parts, body) = req.into_parts();
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(err) => return failed(err.to_string()),
        };
        parts.uri = self.path.clone();
        let mut request = Request::from_parts(parts, Full::new(body));
        // Like the sidecar's pool: a request a pooled connection closed before sending is
        // replayed once on a new connection.
        let mut pooled = true;
        let (response, sender) = loop {
            let mut sender = match self.sender(pooled).await {
                Ok(sender) => sender,
                Err(err) => return failed(err.to_string()),
            };
            if sender.ready().await.is_err() && pooled {
                pooled = false;
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => break (response, sender),
                Err(mut err) => match err.take_message() {
                    Some(unsent) if pooled => {
                        request = unsent;
                        pooled = false;
                    }
                    _ => return failed(err.into_error().to_string()),
                },
            }
        };
        let (parts, body) = response.into_parts();
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(err) => return failed(err.to_string()),
        };
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(sender);
        }
        Response::from_parts(parts, Full::new(body))
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, upstream, path] = args.as_slice() else {
        eprintln!("usage: stack_floor LISTEN UPSTREAM_ADDR UPSTREAM_PATH");
        std::process::exit(64);
    };
    let pool = Arc::new(Pool {
        upstream: upstream.clone(),
        path: path.parse().map_err(std::io::Error::other)?,
        idle: Mutex::new(Vec::new()),
    });
    let listener = TcpListener::bind(listen).await?;
    println!("stack floor listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let pool = pool.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let pool = pool.clone();
                async move { Ok::<_, Infallible>(pool.forward(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
