//! Shared vocabulary for every weir crate: the error type with its domain and retry hint,
//! the retry helper that honours that hint, and secret redaction.
//!
//! Errors carry *who is at fault* ([`Domain`]) instead of being matched on strings: the
//! orchestrator retries external failures, never user mistakes, and internal errors say
//! they are bugs.

pub mod error;
pub mod memory;
pub mod redact;
pub mod retry;
pub mod task;

pub use error::{Domain, Error, Result};
pub use redact::{redact, register_secret};
pub use retry::{retry, RetryPolicy};
pub use task::blocking;
