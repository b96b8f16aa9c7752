//! [`CacheBody`]: the response body of the cache layer, the bounded collection of an upstream
//! body, and the tee that streams a body to its client while keeping a copy to store.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use super::stats::NotStoredReason;

/// The body of every response leaving an [`HttpCache`](super::HttpCache) service: a stored
/// body, a body read in full from upstream, or an upstream body streamed through (after the
/// frames already read while deciding whether to store it), possibly while the cache keeps a
/// copy of it to store once it ends.
///
/// Its data is [`Bytes`] and its error the upstream body's, so with axum it is an
/// `IntoResponse` body like axum's own.
pub struct CacheBody<B: Body> {
    kind: Kind<B>,
}

enum Kind<B: Body> {
    /// A complete body (none for HEAD and empty bodies).
    Full(Option<Bytes>),
    /// Frames read already, then the rest of the upstream body, or the error that ended it.
    Replay {
        frames: VecDeque<Frame<Bytes>>,
        rest: Option<Pin<Box<B>>>,
        error: Option<B::Error>,
    },
    /// Frames read already, then the rest of the upstream body, each frame copied for the
    /// fill on its way to the client.
    Tee {
        frames: VecDeque<Frame<Bytes>>,
        rest: Pin<Box<B>>,
        copy: Option<FillCopy>,
    },
}

/// Where a streamed body goes once it is known: the fill that waits for it. Exactly one of
/// the two methods is called, once.
pub(crate) trait FillSink: Send + Sync {
    /// The body ended, complete, within the limit and without trailers.
    fn complete(self: Box<Self>, body: Bytes);
    /// Nothing will be stored, for `reason`.
    fn abandon(self: Box<Self>, reason: NotStoredReason);
}

/// The copy a tee keeps of what it streamed, and the fill it goes to.
pub(crate) struct FillCopy {
    chunks: Vec<Bytes>,
    total: usize,
    max: usize,
    sink: Box<dyn FillSink>,
}

impl FillCopy {
    /// Copies one more frame; the fill is given up on past the limit or at trailers.
    fn push(&mut self, frame: &Frame<Bytes>) -> Result<(), NotStoredReason> {
        let Some(data) = frame.data_ref() else {
            return Err(NotStoredReason::Trailers);
        };
        self.total = self.total.saturating_add(data.len());
        if self.total > self.max {
            return Err(NotStoredReason::TooLarge);
        }
        if !data.is_empty() {
            // A reference count, not a copy of the bytes.
            self.chunks.push(data.clone());
        }
        Ok(())
    }

    fn complete(self) {
        let body = concat(self.chunks, self.total);
        self.sink.complete(body);
    }
}

/// The chunks as one `Bytes`, without a copy when there is one chunk.
fn concat(mut chunks: Vec<Bytes>, total: usize) -> Bytes {
    if chunks.len() <= 1 {
        return chunks.pop().unwrap_or_default();
    }
    let mut all = BytesMut::with_capacity(total);
    for chunk in chunks {
        all.extend_from_slice(&chunk);
    }
    all.freeze()
}

impl<B: Body> Drop for CacheBody<B> {
    fn drop(&mut self) {
        if let Kind::Tee { copy, .. } = &mut self.kind
            && let Some(copy) = copy.take()
        {
            // Dropped before its end: the client went away, and what was copied is not the
            // whole response.
            copy.sink.abandon(NotStoredReason::ClientGone);
        }
    }
}

// No field is ever pinned in place: the upstream body is boxed. So the body can move whatever
// `B::Error` is.
impl<B: Body> Unpin for CacheBody<B> {}

impl<B: Body> fmt::Debug for CacheBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Full(b) => f
                .debug_struct("CacheBody::Full")
                .field("len", &b.as_ref().map_or(0, Bytes::len))
                .finish(),
            Kind::Replay { frames, rest, .. } => f
                .debug_struct("CacheBody::Replay")
                .field("buffered_frames", &frames.len())
                .field("streaming", &rest.is_some())
                .finish(),
            Kind::Tee { frames, copy, .. } => f
                .debug_struct("CacheBody::Tee")
                .field("buffered_frames", &frames.len())
                .field("copied_bytes", &copy.as_ref().map(|c| c.total))
                .finish(),
        }
    }
}

impl<B: Body> CacheBody<B> {
    /// A complete body.
    pub(crate) fn full(bytes: Bytes) -> Self {
        CacheBody {
            kind: Kind::Full(Some(bytes).filter(|b| !b.is_empty())),
        }
    }

    /// No body (HEAD, a 504 for `only-if-cached`).
    pub(crate) fn empty() -> Self {
        CacheBody {
            kind: Kind::Full(None),
        }
    }

    /// The upstream body, untouched.
    pub(crate) fn stream(body: B) -> Self {
        CacheBody {
            kind: Kind::Replay {
                frames: VecDeque::new(),
                rest: Some(Box::pin(body)),
                error: None,
            },
        }
    }
}

impl<B: Body<Data = Bytes>> Body for CacheBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match &mut self.get_mut().kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Replay {
                frames,
                rest,
                error,
            } => {
                if let Some(frame) = frames.pop_front() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                if let Some(e) = error.take() {
                    return Poll::Ready(Some(Err(e)));
                }
                match rest {
                    Some(body) => body.as_mut().poll_frame(cx),
                    None => Poll::Ready(None),
                }
            }
            Kind::Tee { frames, rest, copy } => {
                if let Some(frame) = frames.pop_front() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                let polled = std::task::ready!(rest.as_mut().poll_frame(cx));
                if let Some(mut kept) = copy.take() {
                    match &polled {
                        Some(Ok(frame)) => match kept.push(frame) {
                            // The end may show without one more poll (a known length): the
                            // copy is complete as soon as it does, whatever the client does next.
                            Ok(()) if rest.is_end_stream() => kept.complete(),
                            Ok(()) => *copy = Some(kept),
                            Err(reason) => kept.sink.abandon(reason),
                        },
                        Some(Err(_)) => kept.sink.abandon(NotStoredReason::BodyError),
                        None => kept.complete(),
                    }
                }
                Poll::Ready(polled)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Replay {
                frames,
                rest,
                error,
            } => {
                frames.is_empty()
                    && error.is_none()
                    && rest.as_ref().is_none_or(|b| b.is_end_stream())
            }
            // Not while a copy waits for its end: the next poll completes it.
            Kind::Tee { frames, rest, copy } => {
                frames.is_empty() && copy.is_none() && rest.is_end_stream()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Replay { frames, rest, .. } => {
                let buffered = buffered_len(frames);
                match rest {
                    Some(body) => {
                        let inner = body.size_hint();
                        let mut hint = SizeHint::new();
                        hint.set_lower(inner.lower().saturating_add(buffered));
                        if let Some(upper) = inner.upper() {
                            hint.set_upper(upper.saturating_add(buffered));
                        }
                        hint
                    }
                    None => SizeHint::with_exact(buffered),
                }
            }
            Kind::Tee { frames, rest, .. } => {
                let inner = rest.size_hint();
                let buffered = buffered_len(frames);
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower().saturating_add(buffered));
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper.saturating_add(buffered));
                }
                hint
            }
        }
    }
}

fn buffered_len(frames: &VecDeque<Frame<Bytes>>) -> u64 {
    frames
        .iter()
        .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
        .sum()
}

/// An upstream body read up to a limit.
pub(crate) enum Collected<B: Body> {
    /// The whole body, within the limit and without trailers.
    Complete(Bytes),
    /// Not storable: the body to send on (the frames read, then the rest), and why.
    Partial(CacheBody<B>, NotStoredReason),
    /// Within the limit so far, but the rest has not arrived (only when not waiting for it):
    /// the frames read and the body, to stream to the client through [`CacheBody::tee`].
    Arriving(Prefix<B>),
}

/// The frames of a body read so far, and its unread rest.
pub(crate) struct Prefix<B: Body> {
    frames: VecDeque<Frame<Bytes>>,
    total: usize,
    rest: Pin<Box<B>>,
}

impl<B: Body> CacheBody<B> {
    /// Streams `prefix` then the rest of its body, copying every frame for `sink`: completed
    /// with the whole body if it ends within `max` bytes without trailers; abandoned past
    /// `max`, at trailers, at an error, or when this body is dropped before its end.
    pub(crate) fn tee(prefix: Prefix<B>, max: usize, sink: Box<dyn FillSink>) -> Self {
        let chunks = prefix
            .frames
            .iter()
            .filter_map(|f| f.data_ref().filter(|d| !d.is_empty()).cloned())
            .collect();
        CacheBody {
            kind: Kind::Tee {
                frames: prefix.frames,
                rest: prefix.rest,
                copy: Some(FillCopy {
                    chunks,
                    total: prefix.total,
                    max,
                    sink,
                }),
            },
        }
    }
}

/// Reads `body` while it stays within `max` bytes. Stops at the first frame past the limit,
/// at trailers, or at an error, and hands back everything read plus the unread rest, so the
/// client gets the body exactly as upstream sent it and a large body is never held whole.
///
/// With `wait` false, only the frames already there are read: a body still arriving is handed
/// back as [`Collected::Arriving`] rather than waited for, so its client is not kept from its
/// first bytes (a stream, a long poll) for as long as the body takes.
pub(crate) async fn collect<B>(body: B, max: usize, wait: bool) -> Collected<B>
where
    B: Body<Data = Bytes>,
{
    if body.size_hint().lower() > max as u64 {
        return Collected::Partial(CacheBody::stream(body), NotStoredReason::TooLarge);
    }
    let mut body = Box::pin(body);
    let mut frames: VecDeque<Frame<Bytes>> = VecDeque::new();
    let mut total = 0usize;
    let partial = |frames, rest, error, why| {
        Collected::Partial(
            CacheBody {
                kind: Kind::Replay {
                    frames,
                    rest,
                    error,
                },
            },
            why,
        )
    };
    loop {
        let next = if wait {
            body.frame().await
        } else {
            // One poll: registers this task's waker, which is harmless if the body wakes it
            // after the response left (a spurious wake-up of a finished future).
            match std::future::poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await {
                Poll::Ready(next) => next,
                Poll::Pending => {
                    return Collected::Arriving(Prefix {
                        frames,
                        total,
                        rest: body,
                    });
                }
            }
        };
        match next {
            None => break,
            Some(Ok(frame)) => {
                let over = match frame.data_ref() {
                    Some(data) => {
                        total = total.saturating_add(data.len());
                        (total > max).then_some(NotStoredReason::TooLarge)
                    }
                    None => Some(NotStoredReason::Trailers),
                };
                frames.push_back(frame);
                if let Some(why) = over {
                    return partial(frames, Some(body), None, why);
                }
                if body.is_end_stream() {
                    break;
                }
            }
            Some(Err(e)) => return partial(frames, None, Some(e), NotStoredReason::BodyError),
        }
    }
    let chunks = frames
        .into_iter()
        .filter_map(|f| f.into_data().ok())
        .collect();
    Collected::Complete(concat(chunks, total))
}
