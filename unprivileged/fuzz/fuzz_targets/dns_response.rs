//! The stub resolver's response parser (answers from the tunnel's DNS
//! server, which may be anyone's): addresses or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let id = data.first().map_or(0, |b| u16::from(*b) << 8 | u16::from(*b));
    let _ = warren::dns::parse_response(data, id);
    if data.len() >= 2 {
        let _ = warren::dns::parse_response(data, u16::from_be_bytes([data[0], data[1]]));
    }
});
