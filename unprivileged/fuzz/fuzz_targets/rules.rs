//! Compiles arbitrary rule text and looks up names derived from the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warren::rules::{Host, RuleSet};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = RuleSet::parse(text) {
        for w in text.split_whitespace().take(64) {
            let _ = r.decide(Host::Name(w));
        }
        let _ = r.decide(Host::Ip("::ffff:10.0.0.1".parse().expect("literal")));
    }
});
