//! Distributed tracing: spans for every request, call and storage
//! transaction, exported over OTLP.
//!
//! (The standard, the example and the "how the chassis does it" sections
//! are written with the span side; see `span.rs`.)

mod config;
mod export;

pub use config::{Sampler, TraceSettings};
pub use export::{ResourceInfo, Tracing};
#[allow(unused_imports, reason = "the span side's hooks call them")]
pub(crate) use export::{enabled, record};
