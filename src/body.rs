//! Response body types: a boxed body for everything the sidecar sends, and a wrapper that passes
//! upstream frames through one by one, lets a watcher see them, and tells it when the body ends
//! or is dropped.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Something to run exactly once when a response body is finished: `completed` is false when the
/// body failed or the client went away before the end. It may also look at each data frame as
/// it passes.
pub trait OnFinish: Send + 'static {
    fn finish(self: Box<Self>, completed: bool);

    fn data(&mut self, _data: &Bytes) {}
}

/// Passes the inner body through untouched, frame by frame, and calls the guard once at the end.
pub struct Observed<B> {
    inner: B,
    guard: Option<Box<dyn OnFinish>>,
}

impl<B> Observed<B> {
    pub fn new(inner: B, guard: Box<dyn OnFinish>) -> Self {
        Observed {
            inner,
            guard: Some(guard),
        }
    }

    fn finish(&mut self, completed: bool) {
        if let Some(guard) = self.guard.take() {
            guard.finish(completed);
        }
    }
}

impl<B> Body for Observed<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.finish(true),
            Poll::Ready(Some(Err(_))) => self.finish(false),
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(guard)) = (frame.data_ref(), self.guard.as_mut()) {
                    guard.data(data);
                }
                if self.inner.is_end_stream() {
                    self.finish(true);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Observed<B> {
    fn drop(&mut self) {
        self.finish(false);
    }
}

/// A response body fed frame by frame from a channel (a stream pumped by a spawned task).
pub struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
}

impl ChannelBody {
    pub fn new(rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>) -> Self {
        ChannelBody { rx }
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx)
    }
}
