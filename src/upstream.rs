//! Upstream connections: a small pool of HTTP/1.1 connections per origin, each checked back in
//! when its response body has been read to the end, and one multiplexed HTTP/2 connection per
//! origin where TLS negotiates h2. A connection task is spawned once per connection, never per
//! request; a request that a pooled connection closed before sending is replayed on a new one.
//! Each data-port worker thread has pools of its own ([`as_worker`]), so a connection's task and
//! the requests sent on it run on one thread.

use std::cell::Cell;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tower_service::Service;

pub type RequestBody = Full<Bytes>;

/// Why an upstream exchange failed before response headers arrived.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made (refused, DNS, TLS, connect timeout).
    #[error("connect failed: {0}")]
    Connect(String),
    /// The connection failed while the request was sent or before the response headers came.
    #[error("{0}")]
    Exchange(String),
}

/// Where a pooled connection goes. Compared and hashed by the authority's text as written:
/// `Authority`'s own `Hash` feeds the hasher a byte at a time (lowercasing each), several
/// hundred instructions for every checkout and release; the URIs here come from the config,
/// whose spelling of a host does not vary from one request to the next.
#[derive(Clone, Debug)]
struct Origin {
    https: bool,
    authority: Authority,
}

impl PartialEq for Origin {
    fn eq(&self, other: &Origin) -> bool {
        self.https == other.https && self.authority.as_str() == other.authority.as_str()
    }
}

impl Eq for Origin {}

impl std::hash::Hash for Origin {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.https.hash(state);
        self.authority.as_str().hash(state);
    }
}

impl Origin {
    fn of(uri: &Uri) -> Result<Origin, UpstreamError> {
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| UpstreamError::Connect(format!("`{uri}` has no host")))?;
        Ok(Origin {
            https: uri.scheme() == Some(&Scheme::HTTPS),
            authority,
        })
    }
}

/// Idle HTTP/1.1 connections kept per origin and worker while traffic flows: enough for the
/// requests a busy pod has in flight at once to find a connection again, not the thousand a
/// burst of streams opened.
const MAX_IDLE_PER_ORIGIN: usize = 64;
/// Once traffic quietens, idle connections beyond this many per origin and worker are closed
/// after [`SURPLUS_IDLE`]: a quiet pod keeps a few warm (no new TLS handshake for its next
/// request), and what a burst opened (each connection's buffers, task and request channel,
/// some 30 KB, and the allocator pages they pin) goes back.
const WARM_PER_ORIGIN: usize = 4;
const SURPLUS_IDLE: Duration = Duration::from_secs(5);
/// An idle connection older than this is not used again but closed (providers close theirs
/// after a minute or two of quiet; a request on a connection they are closing would fail).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How often idle connections are looked at without traffic (see [`Upstream::sweep`]).
const SWEEP_EVERY: Duration = Duration::from_secs(2);

#[derive(Default)]
struct OriginPool {
    /// Oldest first: checkout takes the newest, so the front is what has waited longest.
    idle: Vec<(http1::SendRequest<RequestBody>, Instant)>,
    h2: Option<http2::SendRequest<RequestBody>>,
}

impl OriginPool {
    /// Closes the oldest idle connections, at most `at_most` of them, that have been idle for
    /// `idle` or longer.
    fn close_idle_for(&mut self, now: Instant, idle: Duration, at_most: usize) {
        let candidates = &self.idle[..at_most.min(self.idle.len())];
        let due = |(_, since): &(_, Instant)| now.saturating_duration_since(*since) >= idle;
        // Oldest first: when the oldest is not due, none is (the usual case on a release).
        if !candidates.first().is_some_and(due) {
            return;
        }
        let close = candidates.partition_point(due);
        self.idle.drain(..close);
    }

    /// Closes the idle connections past `timeout`.
    fn close_expired(&mut self, now: Instant, timeout: Duration) {
        self.close_idle_for(now, timeout, usize::MAX);
    }

    /// Closes the expired connections, then, beyond `keep`, those idle for `surplus`.
    fn trim(&mut self, now: Instant, timeout: Duration, keep: usize, surplus: Duration) {
        self.close_expired(now, timeout);
        let over = self.idle.len().saturating_sub(keep);
        self.close_idle_for(now, surplus, over);
    }
}

type Pools = HashMap<Origin, OriginPool, foldhash::fast::RandomState>;

enum Conn {
    H1(http1::SendRequest<RequestBody>),
    H2(http2::SendRequest<RequestBody>),
}

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Makes this thread data-port worker `index`: it uses pool set `index + 1` of every
/// [`Upstream`] (modulo their number). The connections a worker opens have their tasks on its
/// runtime, and it gets them back from the pool. Other threads share set 0.
pub fn as_worker(index: usize) {
    use_shard(index + 1);
}

fn use_shard(shard: usize) {
    SHARD.with(|s| s.set(shard));
}

pub struct Upstream {
    connector: HttpsConnector<HttpConnector>,
    /// One set of pools per shard. Searched twice per request (checkout, release): a fast
    /// seeded hash.
    pools: Box<[Mutex<Pools>]>,
    max_idle_per_origin: usize,
    idle_timeout: Duration,
}

/// An HTTP/1.1 connection lent to one exchange. [`Lease::release`] returns it to the pool once
/// the response body has ended; dropping it instead closes the connection.
pub struct Lease {
    upstream: Arc<Upstream>,
    shard: usize,
    origin: Origin,
    sender: http1::SendRequest<RequestBody>,
}

impl Lease {
    /// Returns the connection to its pool. Connections idle past the timeout are closed here,
    /// and one over the cap is closed instead of kept: after a burst (a thousand streams, a
    /// connection each) the pool shrinks back, and with it the buffers and task each holds.
    pub fn release(self) {
        if self.sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut pools = self.upstream.lock(self.shard);
        let pool = pools.entry(self.origin).or_default();
        pool.close_expired(now, self.upstream.idle_timeout);
        if pool.idle.len() < self.upstream.max_idle_per_origin {
            pool.idle.push((self.sender, now));
        }
    }
}

/// The bundled web PKI roots, plus every certificate of `extra_ca` (a PEM bundle, e.g. the
/// private CA of an in-cluster relay).
fn tls_config(extra_ca: Option<&Path>) -> std::io::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        let invalid = |why: String| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("extra CA file {}: {why}", path.display()),
            )
        };
        let mut added = 0;
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| invalid(e.to_string()))? {
            let cert = cert.map_err(|e| invalid(e.to_string()))?;
            roots.add(cert).map_err(|e| invalid(e.to_string()))?;
            added += 1;
        }
        if added == 0 {
            return Err(invalid("no PEM certificate found".into()));
        }
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map(|builder| builder.with_root_certificates(roots).with_no_client_auth())
        .map_err(std::io::Error::other)
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").finish_non_exhaustive()
    }
}

impl Upstream {
    pub fn new(
        connect_timeout: Duration,
        extra_ca: Option<&Path>,
    ) -> std::io::Result<Arc<Upstream>> {
        Upstream::for_workers(connect_timeout, extra_ca, 0)
    }

    /// With a set of pools for each of `workers` data-port workers ([`as_worker`]) and one for
    /// other threads.
    pub fn for_workers(
        connect_timeout: Duration,
        extra_ca: Option<&Path>,
        workers: usize,
    ) -> std::io::Result<Arc<Upstream>> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(extra_ca)?)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let upstream = Arc::new(Upstream {
            connector,
            pools: (0..=workers)
                .map(|_| Mutex::new(Pools::default()))
                .collect(),
            max_idle_per_origin: MAX_IDLE_PER_ORIGIN,
            idle_timeout: IDLE_TIMEOUT,
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&upstream);
            runtime.spawn(async move {
                let mut every = tokio::time::interval(SWEEP_EVERY);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    let Some(upstream) = weak.upgrade() else {
                        return;
                    };
                    upstream.sweep(Instant::now());
                }
            });
        }
        Ok(upstream)
    }

    /// Trims every pool as traffic would not: connections past the idle timeout are closed,
    /// and beyond [`WARM_PER_ORIGIN`] those idle for [`SURPLUS_IDLE`]. Run every
    /// [`SWEEP_EVERY`] on the runtime that made this `Upstream`; dropping a connection's
    /// sender ends its task on its own worker.
    fn sweep(&self, now: Instant) {
        for shard in 0..self.pools.len() {
            let mut pools = self.lock(shard);
            pools.retain(|_, pool| {
                pool.trim(now, self.idle_timeout, WARM_PER_ORIGIN, SURPLUS_IDLE);
                !pool.idle.is_empty() || pool.h2.is_some()
            });
        }
    }

    /// This thread's shard.
    fn shard(&self) -> usize {
        SHARD.with(Cell::get) % self.pools.len()
    }

    fn lock(&self, shard: usize) -> std::sync::MutexGuard<'_, Pools> {
        self.pools[shard]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends `req` (absolute URI, `Host` set by the caller) and returns the response headers with
    /// the lease to release once the body has been read.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Option<Lease>), UpstreamError> {
        let origin = Origin::of(req.uri())?;
        let absolute = req.uri().clone();
        let shard = self.shard();
        // A pooled connection may have been closed by the server just as it was picked; such a
        // request was never sent and is replayed once on a new connection.
        for fresh in [false, true] {
            let conn = match if fresh {
                None
            } else {
                self.checkout(shard, &origin)
            } {
                Some(conn) => conn,
                // Connecting (TCP, TLS, h2 handshake) is a large state machine and rare with a
                // warm pool: boxed, it does not bloat every request's future.
                None => Box::pin(self.connect(shard, &origin, &absolute)).await?,
            };
            match conn {
                Conn::H2(mut sender) => {
                    *req.uri_mut() = absolute;
                    let response = sender
                        .send_request(req)
                        .await
                        .map_err(|e| UpstreamError::Exchange(describe(&e)))?;
                    return Ok((response, None));
                }
                Conn::H1(mut sender) => {
                    if sender.ready().await.is_err() {
                        continue;
                    }
                    if let Some(path) = absolute.path_and_query() {
                        *req.uri_mut() = Uri::from(path.clone());
                    }
                    match sender.try_send_request(req).await {
                        Ok(response) => {
                            let lease = Lease {
                                upstream: self.clone(),
                                shard,
                                origin,
                                sender,
                            };
                            return Ok((response, Some(lease)));
                        }
                        Err(mut err) => match err.take_message() {
                            Some(unsent) if !fresh => req = unsent,
                            _ => return Err(UpstreamError::Exchange(describe(err.error()))),
                        },
                    }
                }
            }
        }
        Err(UpstreamError::Exchange(
            "the connection closed before the request could be sent".into(),
        ))
    }

    fn checkout(&self, shard: usize, origin: &Origin) -> Option<Conn> {
        let mut pools = self.lock(shard);
        let pool = pools.get_mut(origin)?;
        if let Some(h2) = &pool.h2 {
            if !h2.is_closed() {
                return Some(Conn::H2(h2.clone()));
            }
            pool.h2 = None;
        }
        while let Some((sender, since)) = pool.idle.pop() {
            if !sender.is_closed() && since.elapsed() < self.idle_timeout {
                return Some(Conn::H1(sender));
            }
        }
        None
    }

    async fn connect(
        &self,
        shard: usize,
        origin: &Origin,
        uri: &Uri,
    ) -> Result<Conn, UpstreamError> {
        let mut connector = self.connector.clone();
        let io = connector
            .call(uri.clone())
            .await
            .map_err(|e| UpstreamError::Connect(describe(e.as_ref())))?;
        if io.connected().is_negotiated_h2() {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(30))
                .handshake(io)
                .await
                .map_err(|e| UpstreamError::Connect(describe(&e)))?;
            tokio::spawn(async move {
                if let Err(err) = conn.await {
                    tracing::debug!(error = %err, "upstream h2 connection ended");
                }
            });
            self.lock(shard).entry(origin.clone()).or_default().h2 = Some(sender.clone());
            Ok(Conn::H2(sender))
        } else {
            let (sender, conn) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(|e| UpstreamError::Connect(describe(&e)))?;
            tokio::spawn(async move {
                if let Err(err) = conn.await {
                    tracing::debug!(error = %err, "upstream connection ended");
                }
            });
            Ok(Conn::H1(sender))
        }
    }
}

/// A readable description of an error with its causes; never contains request headers.
pub fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A minimal HTTP/1.1 server that counts connections and, when `close_after_one` is set,
    /// closes each connection right after its first response.
    async fn server(close_after_one: bool) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let (addr, accepted, _closed) = server_seeing_closes(close_after_one).await;
        (addr, accepted)
    }

    /// [`server`], also telling each connection the client closed.
    async fn server_seeing_closes(
        close_after_one: bool,
    ) -> (
        std::net::SocketAddr,
        Arc<AtomicUsize>,
        tokio::sync::mpsc::UnboundedReceiver<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let (closed_tx, closed) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let closed_tx = closed_tx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    loop {
                        let Ok(n) = stream.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            let _ = closed_tx.send(());
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        // Requests here have no body: a blank line ends each one.
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if stream.write_all(reply).await.is_err() || close_after_one {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted, closed)
    }

    fn get(addr: std::net::SocketAddr) -> Request<RequestBody> {
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.uri_mut() = format!("http://{addr}/v1/models").parse().unwrap();
        req.headers_mut()
            .insert(http::header::HOST, addr.to_string().parse().unwrap());
        req
    }

    async fn exchange(upstream: &Arc<Upstream>, addr: std::net::SocketAddr, release: bool) {
        let (response, lease) = upstream.send(get(addr)).await.unwrap();
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
        if release {
            lease.unwrap().release();
        }
    }

    #[tokio::test]
    async fn released_connections_are_reused() {
        let (addr, accepted) = server(false).await;
        let upstream = Upstream::new(Duration::from_secs(1), None).unwrap();
        for _ in 0..5 {
            exchange(&upstream, addr, true).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn each_worker_keeps_its_own_connections() {
        let (addr, accepted) = server(false).await;
        let upstream = Upstream::for_workers(Duration::from_secs(1), None, 2).unwrap();
        as_worker(0);
        exchange(&upstream, addr, true).await;
        as_worker(1);
        exchange(&upstream, addr, true).await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "worker 1 opened its own"
        );
        as_worker(0);
        exchange(&upstream, addr, true).await;
        as_worker(1);
        exchange(&upstream, addr, true).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "each got its own back");
        use_shard(0);
    }

    fn idle(upstream: &Upstream, addr: std::net::SocketAddr) -> usize {
        let origin = Origin::of(&format!("http://{addr}/").parse().unwrap()).unwrap();
        let shard = upstream.shard();
        upstream
            .lock(shard)
            .get(&origin)
            .map_or(0, |p| p.idle.len())
    }

    /// Sends `n` requests at once and keeps their connections leased, bodies read.
    async fn leased(upstream: &Arc<Upstream>, addr: std::net::SocketAddr, n: usize) -> Vec<Lease> {
        let sends = (0..n).map(|_| async {
            let (response, lease) = upstream.send(get(addr)).await.unwrap();
            response.into_body().collect().await.unwrap();
            lease.unwrap()
        });
        futures_util::future::join_all(sends).await
    }

    #[tokio::test]
    async fn after_a_burst_only_the_capped_number_of_connections_stays_open() {
        let (addr, accepted, mut closed) = server_seeing_closes(false).await;
        let upstream = Upstream::new(Duration::from_secs(1), None).unwrap();
        let burst = MAX_IDLE_PER_ORIGIN + 6;
        let leases = leased(&upstream, addr, burst).await;
        assert_eq!(accepted.load(Ordering::SeqCst), burst);
        for lease in leases {
            lease.release();
        }
        assert_eq!(idle(&upstream, addr), MAX_IDLE_PER_ORIGIN);
        for _ in 0..6 {
            closed
                .recv()
                .await
                .expect("a connection over the cap is closed");
        }
        // The ones kept serve the next requests without new connections.
        for _ in 0..3 {
            exchange(&upstream, addr, true).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), burst);
    }

    #[test]
    fn connections_idle_past_the_timeout_are_closed_when_another_comes_back() {
        // Made outside a runtime, so no sweeper holds it and its timeout can be set.
        let mut upstream = Upstream::new(Duration::from_secs(1), None).unwrap();
        Arc::get_mut(&mut upstream).unwrap().idle_timeout = Duration::ZERO;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (addr, accepted, mut closed) = server_seeing_closes(false).await;
            let mut leases = leased(&upstream, addr, 3).await;
            assert_eq!(accepted.load(Ordering::SeqCst), 3);
            leases.pop().unwrap().release();
            assert_eq!(idle(&upstream, addr), 1);
            // Each release finds the one before it expired and closes it.
            for lease in leases.into_iter().rev() {
                lease.release();
                assert_eq!(idle(&upstream, addr), 1);
                closed
                    .recv()
                    .await
                    .expect("the expired connection is closed");
            }
        });
    }

    #[tokio::test]
    async fn once_quiet_the_pool_keeps_a_few_warm_and_closes_the_rest() {
        let (addr, accepted, mut closed) = server_seeing_closes(false).await;
        let upstream = Upstream::new(Duration::from_secs(1), None).unwrap();
        let burst = WARM_PER_ORIGIN + 5;
        for lease in leased(&upstream, addr, burst).await {
            lease.release();
        }
        let released = Instant::now();
        upstream.sweep(released + SURPLUS_IDLE / 2);
        assert_eq!(idle(&upstream, addr), burst, "not idle long enough yet");
        upstream.sweep(released + SURPLUS_IDLE);
        assert_eq!(idle(&upstream, addr), WARM_PER_ORIGIN);
        for _ in 0..5 {
            closed.recv().await.expect("a surplus connection is closed");
        }
        // The warm ones serve the next request; past the idle timeout they go too.
        exchange(&upstream, addr, true).await;
        assert_eq!(accepted.load(Ordering::SeqCst), burst);
        upstream.sweep(Instant::now() + IDLE_TIMEOUT);
        assert_eq!(idle(&upstream, addr), 0);
        for _ in 0..WARM_PER_ORIGIN {
            closed
                .recv()
                .await
                .expect("an expired connection is closed");
        }
    }

    #[tokio::test]
    async fn connections_whose_body_was_abandoned_are_not_reused() {
        let (addr, accepted) = server(false).await;
        let upstream = Upstream::new(Duration::from_secs(1), None).unwrap();
        for _ in 0..3 {
            exchange(&upstream, addr, false).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_replaced_transparently() {
        let (addr, accepted) = server(true).await;
        let upstream = Upstream::new(Duration::from_secs(1), None).unwrap();
        for _ in 0..3 {
            exchange(&upstream, addr, true).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn refused_connections_are_connect_errors() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let upstream = Upstream::new(Duration::from_secs(1), None).unwrap();
        match upstream.send(get(addr)).await {
            Err(UpstreamError::Connect(reason)) => assert!(!reason.is_empty()),
            other => panic!(
                "expected a connect error, got {:?}",
                other.map(|(r, _)| r.status())
            ),
        }
    }
}
