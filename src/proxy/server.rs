//! Accept loop shared by the data and admin ports: HTTP/1.1 and h2c on one socket, a header-read
//! timeout, and graceful shutdown that lets in-flight requests and streams finish up to a deadline.
//! The data port runs on worker threads, one single-threaded runtime each: a connection, its
//! requests and the provider connections they use stay on one thread (see [`serve_on_workers`]).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::body::ProxyBody;

pub fn builder(header_read_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        // A request head larger than this is answered 431 before the sidecar reads it.
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .max_concurrent_streams(MAX_H2_STREAMS)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    builder
}

/// Header limits: an OpenAI SDK request has a dozen headers in about a kilobyte.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
pub const MAX_HEADERS: usize = 100;
/// Streams of one HTTP/2 connection at a time (the concurrency cap still counts each).
const MAX_H2_STREAMS: u32 = 256;

/// Connections the kernel queues for `accept` on a listener. An app that opens many at once
/// (a worker pool starting, a burst of streams) overflows a queue of 128, the default here;
/// the kernel then drops the handshakes it has no room for and the client retries only after
/// a second (`make bench-cold` shows 1 000 new streams at once losing a second at p99).
pub const LISTEN_BACKLOG: u32 = 1024;

/// A listener on `addr` with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, as a plain bind has).
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The next connection. A failed accept (out of file descriptors and the like) is logged and
/// retried after a short pause instead of spinning. Cancel-safe, for use in `select!`.
pub async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(pair) => return pair,
            Err(err) => {
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// What serves a request on the data or admin port: an async function of the request and the
/// client's address.
pub trait Handler: Clone + Send + Sync + 'static {
    type Future: Future<Output = Result<Response<ProxyBody>, Infallible>> + Send + 'static;
    fn call(&self, req: Request<Incoming>, peer: SocketAddr) -> Self::Future;
}

impl<F, Fut> Handler for F
where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<ProxyBody>, Infallible>> + Send + 'static,
{
    type Future = Fut;
    fn call(&self, req: Request<Incoming>, peer: SocketAddr) -> Fut {
        self(req, peer)
    }
}

/// Serves until `shutdown` flips to true, then stops accepting and waits up to `grace` for open
/// connections to finish. Returns true when everything drained in time.
pub async fn serve<F: Handler>(
    listener: TcpListener,
    builder: auto::Builder<TokioExecutor>,
    handler: F,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) -> bool {
    let graceful = GracefulShutdown::new();
    while let Some((stream, peer)) =
        unless_shutdown(&mut shutdown, async { Some(accept(&listener).await) }).await
    {
        let _ = stream.set_nodelay(true);
        spawn_connection(&builder, &graceful, stream, peer, handler.clone());
    }
    drop(listener);
    drain(graceful, grace).await
}

/// `next`, unless the shutdown flag is (or becomes) true first, or its sender is gone: then
/// None. `next` must be cancel-safe.
async fn unless_shutdown<T>(
    shutdown: &mut watch::Receiver<bool>,
    next: impl Future<Output = Option<T>>,
) -> Option<T> {
    tokio::pin!(next);
    loop {
        if *shutdown.borrow_and_update() {
            return None;
        }
        tokio::select! {
            next = &mut next => return next,
            changed = shutdown.changed() => {
                // A dropped sender means the owner is gone: stop as for a shutdown.
                if changed.is_err() {
                    return None;
                }
            }
        }
    }
}

/// Serves one connection on the current runtime, watched by `graceful`.
fn spawn_connection<F: Handler>(
    builder: &auto::Builder<TokioExecutor>,
    graceful: &GracefulShutdown,
    stream: TcpStream,
    peer: SocketAddr,
    handler: F,
) {
    let service = service_fn(move |req| handler.call(req, peer));
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .into_owned();
    let conn = graceful.watch(conn);
    tokio::spawn(async move {
        if let Err(err) = conn.await {
            tracing::debug!(error = %err, %peer, "connection ended with an error");
        }
    });
}

/// Waits up to `grace` for the connections `graceful` watches; true when all finished.
async fn drain(graceful: GracefulShutdown, grace: Duration) -> bool {
    tokio::select! {
        _ = graceful.shutdown() => true,
        _ = tokio::time::sleep(grace) => false,
    }
}

/// An accepted connection on its way from the accept loop to a worker.
type Handoff = (std::net::TcpStream, SocketAddr);

/// Like [`serve`], but the connections are served by `workers` threads, each running its own
/// single-threaded runtime, handed out in turn by an accept loop on the caller's runtime.
///
/// A request's tasks (the client connection, the provider connection it borrows from the pool,
/// their timers) then wake each other on one thread, in one cache, with no work stealing
/// between them: the way nginx runs a worker process per core. One connection's requests all
/// run on its worker; with keep-alive clients the turn-by-turn hand-out keeps workers even.
/// Returns true when every worker drained in time. With no worker thread to be had, serves on
/// the caller's runtime instead.
pub async fn serve_on_workers<F: Handler>(
    listener: TcpListener,
    builder: auto::Builder<TokioExecutor>,
    handler: F,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
    workers: usize,
) -> bool {
    let mut queues = Vec::with_capacity(workers);
    let mut finished = Vec::with_capacity(workers);
    for index in 0..workers {
        let (queue, arrivals) = mpsc::unbounded_channel();
        let (report, result) = oneshot::channel();
        let (builder, handler, shutdown) = (builder.clone(), handler.clone(), shutdown.clone());
        let started = std::thread::Builder::new()
            .name(format!("llm-sidecar-w{index}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        tracing::error!(error = %err, worker = index, "cannot start a worker runtime");
                        return;
                    }
                };
                crate::upstream::as_worker(index);
                let drained =
                    runtime.block_on(worker(arrivals, builder, handler, shutdown, grace));
                let _ = report.send(drained);
            });
        match started {
            Ok(_) => {
                queues.push(queue);
                finished.push(result);
            }
            Err(err) => {
                tracing::error!(error = %err, worker = index, "cannot start a worker thread")
            }
        }
    }
    if queues.is_empty() {
        tracing::warn!("no data-port worker could start: serving on the main runtime");
        return serve(listener, builder, handler, shutdown, grace).await;
    }
    let mut turn = 0;
    while let Some((stream, peer)) =
        unless_shutdown(&mut shutdown, async { Some(accept(&listener).await) }).await
    {
        let _ = stream.set_nodelay(true);
        // Moved to the worker's runtime as a plain socket, registered there.
        let handoff: Handoff = match stream.into_std() {
            Ok(stream) => (stream, peer),
            Err(err) => {
                tracing::debug!(error = %err, %peer, "accepted connection lost");
                continue;
            }
        };
        if !hand_out(&queues, &mut turn, handoff) {
            tracing::error!(%peer, "no data-port worker is running: connection closed");
        }
    }
    drop(listener);
    drop(queues);
    let mut drained = true;
    for result in finished {
        drained &= result.await.unwrap_or(false);
    }
    drained
}

/// Gives `handoff` to the worker after `turn`; a worker that has stopped hands it back and the
/// one after it gets it. False when none took it.
fn hand_out(
    queues: &[mpsc::UnboundedSender<Handoff>],
    turn: &mut usize,
    mut handoff: Handoff,
) -> bool {
    for _ in 0..queues.len() {
        *turn = (*turn + 1) % queues.len();
        match queues[*turn].send(handoff) {
            Ok(()) => return true,
            Err(mpsc::error::SendError(back)) => handoff = back,
        }
    }
    false
}

/// One worker: serves the connections it is handed until shutdown, then drains them.
async fn worker<F: Handler>(
    mut arrivals: mpsc::UnboundedReceiver<Handoff>,
    builder: auto::Builder<TokioExecutor>,
    handler: F,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) -> bool {
    let graceful = GracefulShutdown::new();
    let adopt = |(stream, peer): Handoff| match TcpStream::from_std(stream) {
        Ok(stream) => spawn_connection(&builder, &graceful, stream, peer, handler.clone()),
        Err(err) => tracing::warn!(error = %err, %peer, "cannot serve an accepted connection"),
    };
    // None from the queue: the accept loop has stopped.
    while let Some(handoff) = unless_shutdown(&mut shutdown, arrivals.recv()).await {
        adopt(handoff);
    }
    // Connections accepted before the shutdown are served like the others: graceful shutdown
    // lets a request already sent finish and closes the idle ones.
    arrivals.close();
    while let Ok(handoff) = arrivals.try_recv() {
        adopt(handoff);
    }
    drain(graceful, grace).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::full;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A burst of connections larger than the usual backlog of 128 completes its handshakes
    /// while nothing accepts yet; with a queue of 128 the rest would wait for a SYN retry.
    #[tokio::test]
    async fn a_burst_of_connections_waits_in_the_listen_queue() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let burst = 300;
        let connects = (0..burst).map(|_| tokio::net::TcpStream::connect(addr));
        let connected = tokio::time::timeout(
            Duration::from_secs(30),
            futures_util::future::join_all(connects),
        )
        .await
        .expect("every handshake completes without an accept");
        assert_eq!(connected.iter().filter(|c| c.is_ok()).count(), burst);
        drop(listener);
    }

    /// Sends one request on `stream` and returns the answer's body (the serving thread's name).
    async fn ask(stream: &mut tokio::net::TcpStream) -> String {
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
            .await
            .unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "connection closed early");
            seen.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&seen).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .unwrap()
                    .parse()
                    .unwrap();
                if body.len() == length {
                    return body.to_string();
                }
            }
        }
    }

    #[test]
    fn a_connection_skips_a_stopped_worker_and_is_refused_only_when_all_have_stopped() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let connection = || (std::net::TcpStream::connect(addr).unwrap(), addr);
        let (live, mut arrivals) = mpsc::unbounded_channel();
        let (stopped, gone) = mpsc::unbounded_channel();
        drop(gone);
        let queues = [stopped, live];
        let mut turn = 1; // the stopped worker is next
        assert!(hand_out(&queues, &mut turn, connection()));
        assert!(arrivals.try_recv().is_ok(), "the live worker got it");
        assert_eq!(turn, 1);
        drop(arrivals);
        assert!(!hand_out(&queues, &mut turn, connection()));
    }

    #[tokio::test]
    async fn workers_share_the_connections_each_keeps_its_own_and_all_drain() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, shutdown) = watch::channel(false);
        let handler = |_req, _peer| async {
            let name = std::thread::current().name().unwrap_or("").to_string();
            Ok::<_, Infallible>(Response::new(full(name)))
        };
        let served = tokio::spawn(serve_on_workers(
            listener,
            builder(Duration::from_secs(5)),
            handler,
            shutdown,
            Duration::from_secs(5),
            2,
        ));
        let mut connections = Vec::new();
        for _ in 0..4 {
            connections.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let mut names = Vec::new();
        for stream in &mut connections {
            let first = ask(stream).await;
            // Every request of a connection is served by the worker it was handed to.
            assert_eq!(ask(stream).await, first);
            names.push(first);
        }
        names.sort();
        names.dedup();
        assert_eq!(names, ["llm-sidecar-w0", "llm-sidecar-w1"]);

        stop.send(true).unwrap();
        assert!(served.await.unwrap(), "idle connections drain at once");
    }
}
