//! `recommend` on arbitrary request bytes against a real bundle (`EDGEREC_FUZZ_BUNDLE`,
//! which `cargo xtask fuzz` builds): a response or `{code, message}`, never a panic.
#![no_main]

use std::sync::{Mutex, OnceLock};

use edge::abi::{Door, FAILED, OK};
use libfuzzer_sys::fuzz_target;

fn loaded() -> &'static Mutex<Door> {
    static DOOR: OnceLock<Mutex<Door>> = OnceLock::new();
    DOOR.get_or_init(|| {
        let path = std::env::var_os("EDGEREC_FUZZ_BUNDLE")
            .expect("EDGEREC_FUZZ_BUNDLE names the bundle to serve (run `cargo xtask fuzz`)");
        let bundle = std::fs::read(&path).expect("the fuzz bundle is readable");
        let mut door = Door::default();
        let address = door.alloc(bundle.len()).expect("room for the bundle");
        door.buffer_mut(address)
            .expect("a buffer alloc returned")
            .copy_from_slice(&bundle);
        assert_eq!(
            door.load_bundle(address, bundle.len()),
            OK,
            "the fuzz bundle loads"
        );
        Mutex::new(door)
    })
}

fuzz_target!(|bytes: &[u8]| {
    let mut door = loaded()
        .lock()
        .expect("no earlier run panicked while holding it");
    let Some(address) = door.alloc(bytes.len()) else {
        return;
    };
    // A zero-length alloc still gets a byte of its own (see `Door::alloc`).
    door.buffer_mut(address).expect("a buffer alloc returned")[..bytes.len()]
        .copy_from_slice(bytes);
    let status = door.recommend(address, bytes.len());
    assert!(status == OK || status == FAILED, "status {status}");
});
