//! `load_bundle` on arbitrary bytes (the corpus starts from a real bundle, which the
//! mutations truncate, flip and splice): a clear error or a loaded bundle, never a panic.
#![no_main]

use edge::abi::{Door, FAILED, OK};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let mut door = Door::default();
    let Some(address) = door.alloc(bytes.len()) else {
        return;
    };
    // A zero-length alloc still gets a byte of its own (see `Door::alloc`).
    door.buffer_mut(address).expect("a buffer alloc returned")[..bytes.len()]
        .copy_from_slice(bytes);
    let status = door.load_bundle(address, bytes.len());
    assert!(status == OK || status == FAILED, "status {status}");
    assert!(!door.output().is_empty(), "every call leaves an output");
});
