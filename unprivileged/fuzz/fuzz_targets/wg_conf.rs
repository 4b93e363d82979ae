//! Parses arbitrary text as a wg-quick file: every input is a config or a
//! typed error with a line number, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = warren::wg::conf::parse(std::path::Path::new("fuzz.conf"), text);
});
