//! `FrameDecoder` over arbitrary bytes cut into arbitrary chunks: frames come out or an
//! error does, the buffer stays bounded, nothing panics. Also `decode_datagram`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tenure_gossip::frame::{self, FrameDecoder, FrameLimits};

fuzz_target!(|data: &[u8]| {
    let limits = FrameLimits {
        frame_bytes_max: 4_096,
        datagram_bytes_max: 1_024,
    };
    let _ = frame::decode_datagram(data, limits.datagram_bytes_max);
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(cut).max(1);
    let mut decoder = FrameDecoder::new(limits);
    for piece in rest.chunks(chunk) {
        let mut input = piece;
        loop {
            match decoder.decode(&mut input) {
                Ok(Some(body)) => assert!(body.len() <= limits.frame_bytes_max as usize),
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(decoder.capacity_bytes() <= 2 * limits.frame_bytes_max as usize + 64);
    }
});
