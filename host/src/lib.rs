//! edgerec's host: runs the edge module (the only code that recommends) in wasmtime, as a
//! CDN edge worker would, and serves the seed's REST API from it.
#![warn(missing_docs)]

pub mod cache;
pub mod capture;
pub mod metrics;
pub mod module;
pub mod pool;
pub mod profiles;
pub mod service;
pub mod store;
pub mod updater;
