//! What a TUN read with IFF_VNET_HDR returns (virtio-net header + packet),
//! as the engine's TSO path splits it: segments or a typed error, never a
//! panic or an out-of-bounds write.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warren::wg::offload::{VnetHdr, segment};

fuzz_target!(|data: &[u8]| {
    let _ = VnetHdr::parse(data);
    let mut read = data.to_vec();
    let mut seg = vec![0u8; 65_536 + 128];
    let mut n = 0usize;
    let _ = segment(&mut read, &mut seg, |p| n += p.len());
});
