//! The pure domain core: artifact types, ids, hashing and redaction, and one decision function
//! per command. Nothing here performs I/O or knows about NATS or object storage.

pub mod artifact;
pub mod canonical;
pub mod command;
pub mod diff;
pub mod error;
pub mod hashing;
pub mod ids;
pub mod verify;

#[cfg(test)]
mod idempotency_tests;
