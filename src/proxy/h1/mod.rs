//! Surge's own HTTP/1.1 engine (`proxy.engine = "surge"`): shopper side and blade side,
//! parsing with `httparse`, framing, forwarding and buffers ours. What it is for:
//! an idle keep-alive connection holds no buffer (they come from the worker's pool when
//! bytes arrive), a request is parsed once and its forwarded head written by copying the
//! fields that travel on (no `HeaderMap`, no per-request `String`), and the steady
//! keep-alive path allocates nothing. Upgrades (WebSocket) are tunnelled.
//!
//! The decisions (admission, shedding, the waiting room, sticky carts, retries, surge's
//! own answers) are the hyper path's, shared through `forward` and
//! [`crate::proxy::headers::RequestView`]. HTTP/2 stays on hyper, and so does HTTP/1.1
//! towards h2c blades.

pub mod blades;
pub mod bridge;
pub mod buffers;
pub mod chunked;
mod conn;
pub mod deadline;
pub mod head;
mod send;

pub use conn::{serve, Engine};
