//! [`CacheBody`]: the response body of the cache layer, and the bounded collection of an
//! upstream body.

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
/// frames already read while deciding whether to store it).
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
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Replay { frames, rest, .. } => {
                let buffered: u64 = frames
                    .iter()
                    .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
                    .sum();
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
        }
    }
}

/// An upstream body read up to a limit.
pub(crate) enum Collected<B: Body> {
    /// The whole body, within the limit and without trailers.
    Complete(Bytes),
    /// Not storable: the body to send on (the frames read, then the rest), and why.
    Partial(CacheBody<B>, NotStoredReason),
}

/// Reads `body` while it stays within `max` bytes. Stops at the first frame past the limit,
/// at trailers, or at an error, and hands back everything read plus the unread rest, so the
/// client gets the body exactly as upstream sent it and a large body is never held whole.
pub(crate) async fn collect<B>(body: B, max: usize) -> Collected<B>
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
        match body.frame().await {
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
            }
            Some(Err(e)) => return partial(frames, None, Some(e), NotStoredReason::BodyError),
        }
    }
    let bytes = if frames.len() == 1 {
        frames
            .pop_front()
            .and_then(|f| f.into_data().ok())
            .unwrap_or_default()
    } else {
        let mut all = BytesMut::with_capacity(total);
        for frame in frames {
            if let Ok(data) = frame.into_data() {
                all.extend_from_slice(&data);
            }
        }
        all.freeze()
    };
    Collected::Complete(bytes)
}
