//! A service that is not `Send`: plain `tower::service_fn` over `Rc<RefCell<…>>` state,
//! served by the library (each worker is one thread). Uses only the public API.

use std::cell::RefCell;
use std::convert::Infallible;
use std::rc::Rc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;

fn main() -> std::process::ExitCode {
    app::Server::new()
        .http(|w: app::Worker<app::NoSettings>| async move {
            let seen: Rc<RefCell<Vec<String>>> = Rc::new(RefCell::new(Vec::new()));
            let id = w.id;
            Ok::<_, Infallible>(tower::service_fn(move |req: Request<app::RequestBody>| {
                let seen = seen.clone();
                async move {
                    seen.borrow_mut().push(req.uri().path().to_string());
                    let body = format!("worker {id} saw {} request(s)\n", seen.borrow().len());
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                }
            }))
        })
        .main()
}
