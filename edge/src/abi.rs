//! The raw ABI: the door for wasmtime, workerd and any runtime that can call a function
//! and read linear memory. The module imports nothing. Messages are MessagePack.
//!
//! | export | signature | what |
//! | --- | --- | --- |
//! | `__wasm_call_ctors` | `() -> ()` | call once after instantiating (the ONNX runtime registers its operators in constructors) |
//! | `alloc` | `(len: u32) -> u32` | a buffer of `len` bytes for the host to write into; 0 if memory is exhausted |
//! | `dealloc` | `(ptr: u32, len: u32) -> ()` | frees a buffer that no call took |
//! | `load_bundle` | `(ptr: u32, len: u32) -> i32` | takes the buffer, loads the bundle in it |
//! | `recommend` | `(ptr: u32, len: u32) -> i32` | takes the buffer, answers the request in it (every stage; stage times 0) |
//! | `recommend_start` | `(ptr: u32, len: u32) -> i32` | takes the buffer, checks the request: stages then run one per `recommend_step` |
//! | `recommend_step` | `() -> i32` | runs the next stage: 1 while stages remain, 0 after the last, -1 on an error |
//! | `recommend_finish` | `(ptr: u32, len: u32) -> i32` | takes a buffer holding the 5 stage times (MessagePack array of numbers, ms) and writes the response |
//! | `output_ptr`, `output_len` | `() -> u32` | where the last call's output is (valid until the next call) |
//!
//! Calls that return `i32` return 0 on success, with the answer (a response, or for
//! `load_bundle` the bundle's summary: model version, counts, experiment names) as output, and 1 on failure, with `{code, message}` as output.
//! `code` is one of `invalid_request`, `invalid_bundle`, `no_bundle`, `bad_buffer` (a
//! pointer that `alloc` did not return or a length beyond its buffer) or `internal`.
//! A call that takes a buffer frees it whatever the outcome. A failed `load_bundle`
//! keeps the bundle loaded before it.
//!
//! Hosts that time stages (the response carries each stage's milliseconds, and edge has
//! no clock) call `recommend_start`, then `recommend_step` until it returns 0, reading
//! their clock around each step, then `recommend_finish` with the times.

// The exports need unmangled names, which Rust counts as unsafe code; there is no
// `unsafe` block here. Buffers are keyed by address, so the host's pointers are
// checked, never dereferenced.
#![allow(unsafe_code)]

use std::collections::BTreeMap;

use serde::Serialize;

use crate::Error;
use crate::recommend::{Recommender, Request, Run, StageMs};

/// The state behind the exports: buffers lent to the host, the bundle, a run in progress
/// and the last output.
#[derive(Default)]
pub struct Door {
    buffers: BTreeMap<usize, Vec<u8>>,
    recommender: Option<Recommender>,
    run: Option<Run>,
    output: Vec<u8>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: String,
}

/// Status of a call that succeeded.
pub const OK: i32 = 0;
/// Status of a call that failed; the output holds `{code, message}`.
pub const FAILED: i32 = 1;

impl Door {
    /// A buffer of `len` bytes, by address; `None` if memory is exhausted.
    pub fn alloc(&mut self, len: usize) -> Option<usize> {
        let mut buffer = Vec::new();
        // A zero-length Vec has a dangling address shared by all of them: give every
        // buffer at least one byte so each address is its own.
        buffer.try_reserve_exact(len.max(1)).ok()?;
        buffer.resize(len.max(1), 0);
        let address = buffer.as_ptr() as usize;
        self.buffers.insert(address, buffer);
        Some(address)
    }

    /// The buffer at `address`, so the host side of a native test can fill it.
    pub fn buffer_mut(&mut self, address: usize) -> Option<&mut [u8]> {
        self.buffers.get_mut(&address).map(Vec::as_mut_slice)
    }

    /// Frees the buffer at `address` (nothing if there is none).
    pub fn dealloc(&mut self, address: usize) {
        self.buffers.remove(&address);
    }

    /// The last call's output.
    pub fn output(&self) -> &[u8] {
        &self.output
    }

    fn take(&mut self, address: usize, len: usize) -> Result<Vec<u8>, (&'static str, String)> {
        let Some(mut buffer) = self.buffers.remove(&address) else {
            return Err((
                "bad_buffer",
                format!("{address:#x} is not a buffer that alloc returned (or it was taken)"),
            ));
        };
        if len > buffer.len() {
            return Err((
                "bad_buffer",
                format!("length {len} is beyond the buffer's {} bytes", buffer.len()),
            ));
        }
        buffer.truncate(len);
        Ok(buffer)
    }

    fn fail(&mut self, code: &str, message: String) -> i32 {
        self.output = rmp_serde::to_vec_named(&ErrorBody { code, message })
            .expect("an error body always serializes");
        FAILED
    }

    fn fail_with(&mut self, error: &Error) -> i32 {
        self.fail(error.code(), error.to_string())
    }

    /// `load_bundle`.
    pub fn load_bundle(&mut self, address: usize, len: usize) -> i32 {
        self.output.clear();
        let bytes = match self.take(address, len) {
            Ok(bytes) => bytes,
            Err((code, message)) => return self.fail(code, message),
        };
        match Recommender::from_shared_bundle(bytes.into()) {
            Ok(recommender) => {
                self.output = rmp_serde::to_vec_named(&recommender.summary())
                    .expect("a summary always serializes");
                self.recommender = Some(recommender);
                // A run belongs to the bundle that started it.
                self.run = None;
                OK
            }
            Err(error) => self.fail_with(&error),
        }
    }

    /// `recommend_start`.
    pub fn recommend_start(&mut self, address: usize, len: usize) -> i32 {
        self.output.clear();
        self.run = None;
        let bytes = match self.take(address, len) {
            Ok(bytes) => bytes,
            Err((code, message)) => return self.fail(code, message),
        };
        let Some(recommender) = &self.recommender else {
            return self.fail_with(&Error::NoBundle);
        };
        match Request::from_msgpack(&bytes).and_then(|request| recommender.start(request)) {
            Ok(run) => {
                self.run = Some(run);
                OK
            }
            Err(error) => self.fail_with(&error),
        }
    }

    /// `recommend_step`: 1 while stages remain, 0 after the last, -1 on an error (the
    /// output then holds it, and the run is over).
    pub fn recommend_step(&mut self) -> i32 {
        self.output.clear();
        let (Some(recommender), Some(run)) = (&self.recommender, &mut self.run) else {
            self.fail("invalid_request", "no request is in progress".into());
            return -1;
        };
        match run.run_stage(recommender) {
            Ok(()) => i32::from(run.next_stage().is_some()),
            Err(error) => {
                self.run = None;
                self.fail_with(&error);
                -1
            }
        }
    }

    /// `recommend_finish`, with the stage times in `[address, address + len)`.
    pub fn recommend_finish(&mut self, address: usize, len: usize) -> i32 {
        self.output.clear();
        let bytes = match self.take(address, len) {
            Ok(bytes) => bytes,
            Err((code, message)) => return self.fail(code, message),
        };
        let times = match rmp_serde::from_slice::<[f64; 5]>(&bytes) {
            Ok(times) => times,
            Err(e) => {
                return self.fail(
                    "invalid_request",
                    format!("stage times must be an array of 5 numbers: {e}"),
                );
            }
        };
        let (Some(recommender), Some(run)) = (&self.recommender, self.run.take()) else {
            return self.fail("invalid_request", "no request is in progress".into());
        };
        self.output = run
            .finish(recommender, StageMs::from_array(times))
            .to_msgpack();
        OK
    }

    /// `recommend`: every stage in one call, stage times 0.
    pub fn recommend(&mut self, address: usize, len: usize) -> i32 {
        let status = self.recommend_start(address, len);
        if status != OK {
            return status;
        }
        loop {
            match self.recommend_step() {
                1 => continue,
                0 => break,
                _ => return FAILED,
            }
        }
        let (Some(recommender), Some(run)) = (&self.recommender, self.run.take()) else {
            return self.fail("internal", "the run vanished".into());
        };
        self.output = run.finish(recommender, StageMs::default()).to_msgpack();
        OK
    }
}

// The browser build exports the wasm-bindgen class instead (`web`).
#[cfg(all(target_arch = "wasm32", not(feature = "browser")))]
mod exports {
    use super::Door;
    use std::cell::RefCell;

    thread_local! {
        static DOOR: RefCell<Door> = RefCell::new(Door::default());
    }

    fn with<T>(f: impl FnOnce(&mut Door) -> T) -> T {
        DOOR.with(|door| f(&mut door.borrow_mut()))
    }

    #[unsafe(no_mangle)]
    extern "C" fn alloc(len: u32) -> u32 {
        with(|door| door.alloc(len as usize).map_or(0, |a| a as u32))
    }

    #[unsafe(no_mangle)]
    extern "C" fn dealloc(ptr: u32, _len: u32) {
        with(|door| door.dealloc(ptr as usize))
    }

    #[unsafe(no_mangle)]
    extern "C" fn load_bundle(ptr: u32, len: u32) -> i32 {
        with(|door| door.load_bundle(ptr as usize, len as usize))
    }

    #[unsafe(no_mangle)]
    extern "C" fn recommend(ptr: u32, len: u32) -> i32 {
        with(|door| door.recommend(ptr as usize, len as usize))
    }

    #[unsafe(no_mangle)]
    extern "C" fn recommend_start(ptr: u32, len: u32) -> i32 {
        with(|door| door.recommend_start(ptr as usize, len as usize))
    }

    #[unsafe(no_mangle)]
    extern "C" fn recommend_step() -> i32 {
        with(|door| door.recommend_step())
    }

    #[unsafe(no_mangle)]
    extern "C" fn recommend_finish(ptr: u32, len: u32) -> i32 {
        with(|door| door.recommend_finish(ptr as usize, len as usize))
    }

    #[unsafe(no_mangle)]
    extern "C" fn output_ptr() -> u32 {
        with(|door| door.output().as_ptr() as u32)
    }

    #[unsafe(no_mangle)]
    extern "C" fn output_len() -> u32 {
        with(|door| door.output().len() as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Body {
        code: String,
        message: String,
    }

    fn error(door: &Door) -> Body {
        rmp_serde::from_slice(door.output()).expect("an error body")
    }

    fn filled(door: &mut Door, bytes: &[u8]) -> usize {
        let address = door.alloc(bytes.len()).unwrap();
        door.buffer_mut(address).unwrap()[..bytes.len()].copy_from_slice(bytes);
        address
    }

    #[test]
    fn buffers_are_distinct_and_checked() {
        let mut door = Door::default();
        let a = door.alloc(0).unwrap();
        let b = door.alloc(0).unwrap();
        assert_ne!(a, b, "even empty buffers have their own address");
        assert_eq!(door.load_bundle(a + 1, 0), FAILED);
        let body = error(&door);
        assert_eq!(body.code, "bad_buffer", "{}", body.message);
        assert_eq!(door.load_bundle(b, 2), FAILED);
        assert_eq!(
            error(&door).code,
            "bad_buffer",
            "a length beyond the buffer"
        );
        door.dealloc(a);
        assert_eq!(door.load_bundle(a, 0), FAILED, "freed");
        assert_eq!(
            door.alloc(usize::MAX),
            None,
            "exhaustion is a 0, not an abort"
        );
    }

    #[test]
    fn calls_out_of_order_are_refused() {
        let mut door = Door::default();
        let request = rmp_serde::to_vec_named(&Request::new(5, 0)).unwrap();
        let address = filled(&mut door, &request);
        assert_eq!(door.recommend(address, request.len()), FAILED);
        assert_eq!(error(&door).code, "no_bundle");
        assert_eq!(door.recommend_step(), -1);
        assert_eq!(error(&door).code, "invalid_request");
        let times = rmp_serde::to_vec(&[0.0f64; 5]).unwrap();
        let address = filled(&mut door, &times);
        assert_eq!(door.recommend_finish(address, times.len()), FAILED);
        assert_eq!(error(&door).code, "invalid_request");
        let address = filled(&mut door, b"edgerec? no");
        assert_eq!(door.load_bundle(address, 11), FAILED);
        assert_eq!(error(&door).code, "invalid_bundle");
        assert!(door.buffers.is_empty(), "every call took its buffer");
    }
}
