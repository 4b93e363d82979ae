//! The transport's wire format: requests, replies and UDP frames decode or
//! fail cleanly, and whatever decodes re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warren::transport::wire;

fuzz_target!(|data: &[u8]| {
    let _ = wire::parse_request(data);
    let _ = wire::parse_reply(data);
    let _ = wire::parse_udp_frame(data);
    if let Ok(Some((t, used))) = wire::get_target(data) {
        let mut again = Vec::new();
        wire::put_target(&mut again, &t);
        assert_eq!(&again[..], &data[..used], "a target re-encodes to its bytes");
    }
});
