//! The table the HTTP routers are built from: each entry is one method on one path with its
//! handler. The routers are folded from it, and [`super::served_routes`] lists it, so the
//! OpenAPI document can be checked against exactly what is served (tests/http_openapi.rs):
//! a route added here without its description fails that test.

use axum::Router;
use axum::handler::Handler;
use axum::http::Method;
use axum::routing::MethodRouter;

/// One method on one path, with its handler.
pub struct Route<S> {
    /// The method (`GET` also answers `HEAD`, as axum does).
    pub method: Method,
    /// The path, in axum's syntax (`/api/rmos/runs/{run_id}`), which is also OpenAPI's.
    pub path: &'static str,
    handler: MethodRouter<S>,
}

macro_rules! constructor {
    ($name:ident, $method:ident) => {
        #[doc = concat!("`", stringify!($method), " path` answered by `handler`.")]
        pub fn $name<H, T>(path: &'static str, handler: H) -> Self
        where
            H: Handler<T, S>,
            T: 'static,
        {
            Self {
                method: Method::$method,
                path,
                handler: axum::routing::$name(handler),
            }
        }
    };
}

impl<S: Clone + Send + Sync + 'static> Route<S> {
    constructor!(get, GET);
    constructor!(post, POST);
    constructor!(patch, PATCH);
    constructor!(delete, DELETE);
}

/// A router serving `routes` (methods on one path are merged into one route).
pub fn build<S: Clone + Send + Sync + 'static>(routes: Vec<Route<S>>) -> Router<S> {
    routes
        .into_iter()
        .fold(Router::new(), |r, route| r.route(route.path, route.handler))
}

/// `(method, path)` of each entry.
pub fn listed<S>(routes: &[Route<S>]) -> Vec<(Method, &'static str)> {
    routes.iter().map(|r| (r.method.clone(), r.path)).collect()
}
