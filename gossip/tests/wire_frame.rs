//! Framing: a stream cut into pieces at any point yields the same frames; an oversized or
//! foreign header is refused before its body is buffered; a datagram is exactly one frame.

use tenure_gossip::frame::{
    decode_datagram, encode_datagram, encode_frame, encode_frame_with, FrameDecoder, FrameError,
    FrameLimits, FRAME_HEADER_BYTES, FRAME_VERSION,
};

const LIMIT_BYTES: u32 = 64;

fn limits() -> FrameLimits {
    FrameLimits {
        frame_bytes_max: LIMIT_BYTES,
        datagram_bytes_max: 16,
    }
}

fn bodies() -> Vec<Vec<u8>> {
    vec![
        b"first".to_vec(),
        Vec::new(),
        (0..LIMIT_BYTES as u8).collect(),
        vec![FRAME_VERSION; 7],
    ]
}

fn stream_of(bodies: &[Vec<u8>]) -> Vec<u8> {
    let mut stream = Vec::new();
    for body in bodies {
        encode_frame(body, LIMIT_BYTES, &mut stream).expect("within the limit");
    }
    stream
}

/// Feeds `pieces` one after the other and collects every frame yielded.
fn decode_pieces(decoder: &mut FrameDecoder, pieces: &[&[u8]]) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    for piece in pieces {
        let mut input = *piece;
        while let Some(body) = decoder.decode(&mut input).expect("a well-formed stream") {
            frames.push(body.to_vec());
        }
        assert!(
            input.is_empty(),
            "decode consumes its input until it needs more"
        );
    }
    frames
}

#[test]
fn a_stream_split_at_any_two_points_yields_the_same_frames() {
    let bodies = bodies();
    let stream = stream_of(&bodies);
    for i in 0..=stream.len() {
        for j in i..=stream.len() {
            let mut decoder = FrameDecoder::new(limits());
            let frames = decode_pieces(&mut decoder, &[&stream[..i], &stream[i..j], &stream[j..]]);
            assert_eq!(frames, bodies, "split at {i} and {j}");
            assert_eq!(
                decoder.buffered_bytes(),
                0,
                "nothing left over after the last frame"
            );
        }
    }
}

#[test]
fn a_stream_fed_one_byte_at_a_time_yields_the_same_frames() {
    let bodies = bodies();
    let stream = stream_of(&bodies);
    let pieces: Vec<&[u8]> = stream.chunks(1).collect();
    let mut decoder = FrameDecoder::new(limits());
    assert_eq!(decode_pieces(&mut decoder, &pieces), bodies);
}

#[test]
fn yielded_bodies_are_aligned_for_rkyv() {
    let stream = stream_of(&bodies());
    let mut decoder = FrameDecoder::new(limits());
    let mut input = &stream[1..];
    // Start one byte in, so the input itself is misaligned relative to frame boundaries.
    let mut first = vec![stream[0]];
    first.extend_from_slice(input);
    input = &first[..];
    while let Some(body) = decoder.decode(&mut input).expect("well-formed") {
        assert_eq!(body.as_ptr() as usize % 16, 0, "body is 16-byte aligned");
    }
}

#[test]
fn an_oversized_length_is_refused_from_the_header_without_buffering_the_body() {
    let mut stream = vec![FRAME_VERSION];
    stream.extend_from_slice(&(LIMIT_BYTES + 1).to_be_bytes());
    stream.extend_from_slice(&[0xAB; 1000]);
    let mut decoder = FrameDecoder::new(limits());
    let mut input = &stream[..];
    assert_eq!(
        decoder.decode(&mut input),
        Err(FrameError::Oversized {
            body_bytes: u64::from(LIMIT_BYTES) + 1,
            body_bytes_max: LIMIT_BYTES
        })
    );
    assert_eq!(input.len(), 1000, "no body byte was consumed");
    assert_eq!(decoder.buffered_bytes(), 0);
    assert_eq!(
        decoder.capacity_bytes(),
        0,
        "nothing was allocated for the body"
    );
    assert_eq!(
        decoder.decode(&mut input),
        Err(FrameError::DecoderFailed),
        "the stream stays failed"
    );
}

#[test]
fn a_huge_length_is_refused_as_soon_as_the_header_is_complete() {
    let mut decoder = FrameDecoder::new(FrameLimits::default());
    let header = [FRAME_VERSION, 0xFF, 0xFF, 0xFF, 0xFF];
    for (i, byte) in header.iter().enumerate() {
        let mut input = std::slice::from_ref(byte);
        let result = decoder.decode(&mut input);
        if i + 1 < FRAME_HEADER_BYTES {
            assert_eq!(result, Ok(None), "header byte {i}");
        } else {
            assert!(matches!(
                result,
                Err(FrameError::Oversized {
                    body_bytes: 0xFFFF_FFFF,
                    ..
                })
            ));
        }
    }
    assert_eq!(decoder.capacity_bytes(), 0);
}

#[test]
fn a_body_exactly_at_the_limit_is_accepted() {
    let body = vec![7u8; LIMIT_BYTES as usize];
    let stream = stream_of(std::slice::from_ref(&body));
    let mut decoder = FrameDecoder::new(limits());
    assert_eq!(decode_pieces(&mut decoder, &[&stream]), vec![body]);
}

#[test]
fn a_foreign_first_byte_is_refused() {
    let mut decoder = FrameDecoder::new(limits());
    let mut input: &[u8] = b"GET / HTTP/1.1\r\n";
    assert_eq!(
        decoder.decode(&mut input),
        Err(FrameError::BadVersion { found: b'G' })
    );
    assert_eq!(decoder.decode(&mut input), Err(FrameError::DecoderFailed));
}

#[test]
fn encoding_over_the_limit_fails_and_leaves_the_output_unchanged() {
    let mut out = b"kept".to_vec();
    let body = vec![0u8; LIMIT_BYTES as usize + 1];
    assert!(matches!(
        encode_frame(&body, LIMIT_BYTES, &mut out),
        Err(FrameError::Oversized { .. })
    ));
    let written: Result<(), FrameError> = encode_frame_with(&mut out, LIMIT_BYTES, |out| {
        out.extend_from_slice(&body);
        Ok(())
    });
    assert!(matches!(written, Err(FrameError::Oversized { .. })));
    assert_eq!(out, b"kept");
}

#[test]
fn encode_frame_with_writes_the_same_bytes_as_encode_frame() {
    let mut a = Vec::new();
    let mut b = Vec::new();
    encode_frame(b"body", LIMIT_BYTES, &mut a).expect("small");
    encode_frame_with::<FrameError, _>(&mut b, LIMIT_BYTES, |out| {
        out.extend_from_slice(b"body");
        Ok(())
    })
    .expect("small");
    assert_eq!(a, b);
}

#[test]
fn a_datagram_is_exactly_one_frame() {
    let mut datagram = Vec::new();
    encode_datagram(b"ping", 16, &mut datagram).expect("small");
    assert_eq!(decode_datagram(&datagram, 16), Ok(&b"ping"[..]));
    for cut in 0..datagram.len() {
        assert!(
            matches!(
                decode_datagram(&datagram[..cut], 16),
                Err(FrameError::Truncated { .. })
            ),
            "cut at {cut}"
        );
    }
    let mut longer = datagram.clone();
    longer.push(0);
    assert!(matches!(
        decode_datagram(&longer, 16),
        Err(FrameError::TrailingBytes { .. })
    ));
    assert!(matches!(
        decode_datagram(&datagram, 3),
        Err(FrameError::Oversized {
            body_bytes: 4,
            body_bytes_max: 3
        })
    ));
    assert!(matches!(
        encode_datagram(&[0; 17], 16, &mut Vec::new()),
        Err(FrameError::Oversized { .. })
    ));
}
