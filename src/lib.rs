//! rmos-runs: the persistent, tamper-evident record of CNC manufacturing runs.
//!
//! Three layers, kept apart (see `DESIGN.md`): [`domain`] (pure rules), [`store`] (object
//! storage with conditional puts) and [`transport`] (NATS). The binary only wires them.

pub mod config;
pub mod domain;
pub mod store;
pub mod supervisor;
pub mod transport;
