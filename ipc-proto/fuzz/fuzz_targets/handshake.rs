//! Feeds arbitrary 8-byte prefixes to the handshake decoders.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warren_ipc::handshake::{ClientHello, ServerHello};

fuzz_target!(|data: &[u8]| {
    if let Some(b) = data.first_chunk::<8>() {
        if let Ok(h) = ClientHello::decode(b) {
            let _ = h.negotiate();
        }
        if let Ok(s) = ServerHello::decode(b) {
            let _ = s.accept(ClientHello::CURRENT);
        }
    }
});
