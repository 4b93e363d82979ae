//! Feeds arbitrary bytes to both frame decoders; any panic is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warren_ipc::frame::decode_frame;
use warren_ipc::{ClientFrame, ServerFrame};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    // Decode frame after frame, as the stream reader does.
    while let Ok(Some((_, _, used))) = decode_frame::<ClientFrame>(rest) {
        rest = &rest[used..];
    }
    let _ = decode_frame::<ServerFrame>(data);
});
