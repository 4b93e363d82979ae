//! Feeds arbitrary bytes to every SOCKS5 decoder, chained the way the
//! server reads a connection; any panic is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warren::proxy::socks5;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    if let Ok(Some((methods, used))) = socks5::parse_greeting(rest) {
        let _ = socks5::choose_method(&methods, data.len() % 2 == 0);
        rest = &rest[used..];
    }
    if let Ok(Some((_, used))) = socks5::parse_user_pass(rest) {
        let _ = socks5::parse_request(&rest[used..]);
    }
    let _ = socks5::parse_request(rest);
    let _ = socks5::parse_addr(data);
    let _ = socks5::parse_udp(data);
});
