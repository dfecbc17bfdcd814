//! edgerec's host: runs the edge module (the only code that recommends) in wasmtime, as a
//! CDN edge worker would. The REST service on top is issue 7's work.
#![warn(missing_docs)]

pub mod module;
