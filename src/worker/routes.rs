//! Which handler serves which listening socket, with the user's types erased.
//!
//! Sockets are matched by their `FileDescriptorName=`: a handler registered for that name
//! serves it; every other socket (unnamed, by hand, or named but not registered) goes to the
//! default HTTP service.

use std::any::Any;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;

use super::{Connection, RequestBody};
use crate::server::BoxError;

/// Response bodies of every service, in one type: a `Full<Bytes>` (the common fixed
/// answer, and the worker's own 413/500/503) as it is, anything else boxed. Not
/// http-body-util's `UnsyncBoxBody`, which still requires `Send`: a worker's bodies never
/// leave its thread.
pub enum ResponseBody {
    Full(Full<Bytes>),
    Boxed(Pin<Box<dyn Body<Data = Bytes, Error = BoxError>>>),
}

impl ResponseBody {
    /// Erases any body of [`Bytes`]. A `Full<Bytes>` is kept as it is: a box (an allocation
    /// and a free per response) for the most common answer is measurable per request.
    pub fn new<B>(body: B) -> ResponseBody
    where
        B: Body<Data = Bytes> + 'static,
        B::Error: Into<BoxError>,
    {
        use http_body_util::BodyExt;
        let mut slot = Some(body);
        if let Some(full) = (&mut slot as &mut dyn Any).downcast_mut::<Option<Full<Bytes>>>() {
            return ResponseBody::Full(full.take().expect("set above"));
        }
        let body = slot.expect("not taken: not a Full");
        ResponseBody::Boxed(Box::pin(body.map_err(Into::into)))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseBody::Full(b) => Pin::new(b)
                .poll_frame(cx)
                .map_err(|never: Infallible| match never {}),
            ResponseBody::Boxed(b) => b.as_mut().poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Full(b) => b.is_end_stream(),
            ResponseBody::Boxed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full(b) => b.size_hint(),
            ResponseBody::Boxed(b) => b.size_hint(),
        }
    }
}

/// An HTTP service: one request in, one response (or an error) out.
pub type BoxHttp = Rc<
    dyn Fn(
        Request<RequestBody>,
    ) -> LocalBoxFuture<'static, Result<Response<ResponseBody>, BoxError>>,
>;

/// A raw connection handler: owns the connection until it returns.
pub type BoxTcp = Rc<dyn Fn(Connection) -> LocalBoxFuture<'static, Result<(), BoxError>>>;

#[derive(Clone)]
pub enum Handler {
    Http(BoxHttp),
    Tcp(BoxTcp),
}

/// What the user's factories built for this worker.
#[derive(Default)]
pub struct Routes {
    pub default: Option<Handler>,
    pub named: BTreeMap<String, Handler>,
}

impl Routes {
    /// The handler for each listening socket, in order; an error names a socket nobody
    /// serves.
    pub fn resolve(&self, names: &[String]) -> Result<Vec<Handler>, String> {
        names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                self.named
                    .get(name)
                    .or(self.default.as_ref())
                    .cloned()
                    .ok_or_else(|| {
                        format!(
                            "listening socket {} (fd {}, name {name:?}) has no handler",
                            i,
                            crate::listen::LISTEN_FDS_START as usize + i
                        )
                    })
            })
            .collect()
    }
}
