//! Sessions as tower middleware: [`SessionLayer`] puts a lazy [`Session`] handle in every
//! request, and answers with cookies and the store-down policy.

mod client_ip;
mod cookie;
#[cfg(feature = "axum")]
mod extract;
mod future;
mod handle;
mod layer;
mod service;

pub use client_ip::ClientIp;
pub use cookie::{CookieConfig, CookieConfigBuilder, SameSite};
#[cfg(feature = "axum")]
pub use extract::AuthenticatedSession;
pub use future::ResponseFuture;
pub use handle::Session;
pub use layer::SessionLayer;
pub use service::SessionService;
