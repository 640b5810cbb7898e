//! Which handler serves which listening socket, with the user's types erased.
//!
//! Sockets are matched by their `FileDescriptorName=`: a handler registered for that name
//! serves it; every other socket (unnamed, by hand, or named but not registered) goes to the
//! default HTTP service.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::rc::Rc;

use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use http::{Request, Response};
use http_body::Body;

use super::{Connection, RequestBody};
use crate::server::BoxError;

/// Response bodies of every service, boxed once. Not http-body-util's `UnsyncBoxBody`,
/// which still requires `Send`: a worker's bodies never leave its thread.
pub type ResponseBody = Pin<Box<dyn Body<Data = Bytes, Error = BoxError>>>;

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

/// Boxes any body of [`Bytes`] as a [`ResponseBody`].
pub fn boxed<B>(body: B) -> ResponseBody
where
    B: Body<Data = Bytes> + 'static,
    B::Error: Into<BoxError>,
{
    use http_body_util::BodyExt;
    Box::pin(body.map_err(Into::into))
}
