//! Feeds arbitrary bytes to the HTTP proxy request-head parser and
//! rebuilds the upstream head of whatever it accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warren::proxy::http;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((req, used))) = http::parse(data) {
        assert!(used <= data.len());
        let _ = req.upstream_head();
        let _ = req.header("content-length");
    }
});
