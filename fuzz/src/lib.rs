//! Shared properties of the fuzz targets (see `props.rs`, also used by `tests/fuzz_props.rs`).

#[path = "props.rs"]
pub mod props;
