//! [`ResponseFuture`]: the cache's work for one request.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;

use super::body::CacheBody;

type Work<B, E> = Pin<Box<dyn Future<Output = Result<Response<CacheBody<B>>, E>> + Send>>;

/// The response future of an [`HttpCache`](super::HttpCache) service.
///
/// One boxed future: a request may take several store calls, wait for a coalesced upstream
/// call, call the inner service, read the body and write the entry, and a hand-written state
/// machine for all of that would be long and fragile for the cost of one allocation.
pub struct ResponseFuture<B: http_body::Body, E> {
    work: Work<B, E>,
}

impl<B: http_body::Body, E> ResponseFuture<B, E> {
    pub(crate) fn new(work: Work<B, E>) -> Self {
        ResponseFuture { work }
    }
}

impl<B: http_body::Body, E> fmt::Debug for ResponseFuture<B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<B: http_body::Body, E> Future for ResponseFuture<B, E> {
    type Output = Result<Response<CacheBody<B>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.work.as_mut().poll(cx)
    }
}
