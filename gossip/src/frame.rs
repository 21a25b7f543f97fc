//! Length-prefixed frames: how sealed messages are cut out of a TCP byte stream, and how a
//! UDP datagram carries exactly one of them.
//!
//! A frame is a fixed [`FRAME_HEADER_BYTES`]-byte header followed by the body:
//!
//! ```text
//! offset 0  u8      FRAME_VERSION (a magic byte that also versions the whole wire format)
//! offset 1  u32 BE  body length in bytes
//! offset 5  body    (a sealed envelope, see `seal`)
//! ```
//!
//! The invariant this module holds: a frame whose stated length is over the limit is rejected
//! as soon as its header is read, before any of its body is buffered, so a peer cannot make a
//! node allocate more than `frame_bytes_max` per connection. A stream that has produced an
//! error cannot be resynchronised (the next header could be anywhere), so the decoder stays
//! failed and the connection should be closed.
//!
//! Received bodies are copied into a 16-byte aligned buffer, so a body that is a plain rkyv
//! archive (tests, trusted in-process transports) can be read zero-copy as it is.

use rkyv::util::AlignedVec;

/// The first byte of every frame. It doubles as the wire version: a peer speaking another
/// version is refused at the first byte instead of failing validation deeper down.
pub const FRAME_VERSION: u8 = 0xA3;

/// Bytes in a frame header: the version byte and the big-endian u32 body length.
pub const FRAME_HEADER_BYTES: usize = 5;

/// Default for [`FrameLimits::frame_bytes_max`]: 4 MiB, room for a flow batch of the
/// largest size `wire` accepts, while bounding what one connection can make a node buffer.
pub const FRAME_BYTES_MAX_DEFAULT: u32 = 4 * 1024 * 1024;

/// Default for [`FrameLimits::datagram_bytes_max`]: 8 KiB, above foca's packets (about 1.4
/// KB) plus sealing overhead, and well below the largest UDP payload (65,507 bytes).
pub const DATAGRAM_BYTES_MAX_DEFAULT: u32 = 8 * 1024;

/// Size limits on frame bodies, in bytes. Both are checked against the length in the
/// header, before the body is read.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FrameLimits {
    /// The largest body of a stream (TCP) frame, in bytes.
    pub frame_bytes_max: u32,
    /// The largest body of a datagram (UDP) frame, in bytes.
    pub datagram_bytes_max: u32,
}

impl Default for FrameLimits {
    fn default() -> Self {
        FrameLimits {
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
            datagram_bytes_max: DATAGRAM_BYTES_MAX_DEFAULT,
        }
    }
}

/// Why bytes could not be framed or unframed.
///
/// Encoding errors leave the output buffer as it was. A [`FrameDecoder`] that returned one
/// stays failed (it answers [`FrameError::DecoderFailed`] from then on) because a stream
/// cannot be resynchronised after a bad header.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum FrameError {
    /// The first byte is not [`FRAME_VERSION`]: another protocol, another wire version, or
    /// a stream out of step.
    #[error("frame starts with byte {found:#04x}, expected version byte {FRAME_VERSION:#04x}")]
    BadVersion {
        /// The byte found where the version byte should be.
        found: u8,
    },
    /// The body is longer than the limit. Rejected from the header alone: nothing of the body
    /// was buffered.
    #[error("frame body of {body_bytes} bytes exceeds the limit of {body_bytes_max} bytes")]
    Oversized {
        /// The body length stated in the header (or given to the encoder).
        body_bytes: u64,
        /// The limit it exceeded.
        body_bytes_max: u32,
    },
    /// A datagram shorter than its header says, or shorter than a header.
    #[error("datagram of {datagram_bytes} bytes is truncated: header says {expected_bytes}")]
    Truncated {
        /// The datagram's actual length.
        datagram_bytes: usize,
        /// The length it should have had.
        expected_bytes: u64,
    },
    /// A datagram longer than its header says: one datagram carries exactly one frame.
    #[error("datagram of {datagram_bytes} bytes has trailing bytes: header says {expected_bytes}")]
    TrailingBytes {
        /// The datagram's actual length.
        datagram_bytes: usize,
        /// The length it should have had.
        expected_bytes: u64,
    },
    /// The decoder returned an error before; the stream must be closed.
    #[error("frame decoder failed earlier; the stream cannot be resynchronised")]
    DecoderFailed,
}

/// Writes the header for a body of `body_bytes` bytes, checking it against `body_bytes_max`.
fn header(body_bytes: usize, body_bytes_max: u32) -> Result<[u8; FRAME_HEADER_BYTES], FrameError> {
    let len = u32::try_from(body_bytes)
        .ok()
        .filter(|&len| len <= body_bytes_max)
        .ok_or(FrameError::Oversized {
            body_bytes: body_bytes as u64,
            body_bytes_max,
        })?;
    let mut out = [0u8; FRAME_HEADER_BYTES];
    out[0] = FRAME_VERSION;
    out[1..].copy_from_slice(&len.to_be_bytes());
    Ok(out)
}

/// Reads a complete header: the body length, checked against `body_bytes_max`.
fn parse_header(bytes: &[u8; FRAME_HEADER_BYTES], body_bytes_max: u32) -> Result<u32, FrameError> {
    if bytes[0] != FRAME_VERSION {
        return Err(FrameError::BadVersion { found: bytes[0] });
    }
    let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    if len > body_bytes_max {
        return Err(FrameError::Oversized {
            body_bytes: u64::from(len),
            body_bytes_max,
        });
    }
    Ok(len)
}

/// Appends one stream frame holding `body` to `out`.
///
/// # Errors
/// [`FrameError::Oversized`] when `body` is over `frame_bytes_max`; `out` is unchanged.
pub fn encode_frame(
    body: &[u8],
    frame_bytes_max: u32,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let head = header(body.len(), frame_bytes_max)?;
    out.reserve(FRAME_HEADER_BYTES + body.len());
    out.extend_from_slice(&head);
    out.extend_from_slice(body);
    Ok(())
}

/// Appends one stream frame to `out`, letting `write_body` append the body in place (for
/// example `Sealer::seal`), so that the body is never copied. The header is patched once
/// the body's length is known.
///
/// # Errors
/// Whatever `write_body` returns, or [`FrameError::Oversized`] (converted into `E`) when the
/// body it wrote is over `frame_bytes_max`. On any error `out` is truncated back to its
/// length before the call.
pub fn encode_frame_with<E, F>(
    out: &mut Vec<u8>,
    frame_bytes_max: u32,
    write_body: F,
) -> Result<(), E>
where
    E: From<FrameError>,
    F: FnOnce(&mut Vec<u8>) -> Result<(), E>,
{
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_BYTES]);
    if let Err(e) = write_body(out) {
        out.truncate(start);
        return Err(e);
    }
    let body_bytes = out.len() - start - FRAME_HEADER_BYTES;
    match header(body_bytes, frame_bytes_max) {
        Ok(head) => {
            out[start..start + FRAME_HEADER_BYTES].copy_from_slice(&head);
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(e.into())
        }
    }
}

/// Appends one datagram frame holding `body` to `out`: the same layout as a stream frame,
/// under the smaller `datagram_bytes_max`.
///
/// # Errors
/// [`FrameError::Oversized`] when `body` is over `datagram_bytes_max`; `out` is unchanged.
pub fn encode_datagram(
    body: &[u8],
    datagram_bytes_max: u32,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    encode_frame(body, datagram_bytes_max, out)
}

/// The body of a received datagram, which must be exactly one frame.
///
/// # Errors
/// [`FrameError::BadVersion`], [`FrameError::Oversized`] (checked before the length is
/// compared with the datagram), [`FrameError::Truncated`] or [`FrameError::TrailingBytes`].
pub fn decode_datagram(datagram: &[u8], datagram_bytes_max: u32) -> Result<&[u8], FrameError> {
    let Some((head, body)) = datagram.split_first_chunk::<FRAME_HEADER_BYTES>() else {
        return Err(FrameError::Truncated {
            datagram_bytes: datagram.len(),
            expected_bytes: FRAME_HEADER_BYTES as u64,
        });
    };
    let len = parse_header(head, datagram_bytes_max)?;
    let expected_bytes = FRAME_HEADER_BYTES as u64 + u64::from(len);
    match (body.len() as u64).cmp(&u64::from(len)) {
        std::cmp::Ordering::Less => Err(FrameError::Truncated {
            datagram_bytes: datagram.len(),
            expected_bytes,
        }),
        std::cmp::Ordering::Greater => Err(FrameError::TrailingBytes {
            datagram_bytes: datagram.len(),
            expected_bytes,
        }),
        std::cmp::Ordering::Equal => Ok(body),
    }
}

/// Where the decoder is within the current frame.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    /// Collecting header bytes; `have` of them are in `header`.
    Header { have: usize },
    /// Collecting `len` body bytes into `body`.
    Body { len: usize },
    /// The last call returned the frame now in `body`; it is cleared on the next call.
    Yielded,
    /// An error was returned; the stream is lost.
    Failed,
}

/// Cuts frames out of a byte stream that arrives in pieces of any size (TCP reads).
///
/// Memory is bounded by `frame_bytes_max`: the body buffer grows only towards the length
/// stated in a header that passed the limit, and only as bytes for it arrive.
///
/// ```
/// use tenure_gossip::frame::{encode_frame, FrameDecoder, FrameLimits};
///
/// let mut stream = Vec::new();
/// encode_frame(b"hello", 1024, &mut stream).unwrap();
/// encode_frame(b"world", 1024, &mut stream).unwrap();
///
/// let mut decoder = FrameDecoder::new(FrameLimits::default());
/// let mut input = &stream[..];
/// let mut frames = Vec::new();
/// while let Some(body) = decoder.decode(&mut input).unwrap() {
///     frames.push(body.to_vec());
/// }
/// assert_eq!(frames, [b"hello".to_vec(), b"world".to_vec()]);
/// ```
#[derive(Debug)]
pub struct FrameDecoder {
    frame_bytes_max: u32,
    state: State,
    header: [u8; FRAME_HEADER_BYTES],
    body: AlignedVec,
}

impl FrameDecoder {
    /// A decoder for stream frames up to `limits.frame_bytes_max`.
    pub fn new(limits: FrameLimits) -> Self {
        FrameDecoder {
            frame_bytes_max: limits.frame_bytes_max,
            state: State::Header { have: 0 },
            header: [0; FRAME_HEADER_BYTES],
            body: AlignedVec::new(),
        }
    }

    /// Consumes bytes from the front of `input` until one frame is complete or `input` is
    /// empty. Returns the complete frame's body (valid until the next call, 16-byte aligned),
    /// or `None` when more bytes are needed. Call again with the rest of `input` until it
    /// returns `None`: bytes after a frame are left in `input`.
    ///
    /// # Errors
    /// [`FrameError::BadVersion`] or [`FrameError::Oversized`] from a header (no body byte
    /// of that frame is buffered), then [`FrameError::DecoderFailed`] on every later call.
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Option<&[u8]>, FrameError> {
        if self.state == State::Yielded {
            self.body.clear();
            self.state = State::Header { have: 0 };
        }
        loop {
            match self.state {
                State::Failed => return Err(FrameError::DecoderFailed),
                State::Yielded => unreachable!("Yielded is cleared at the top of decode"),
                State::Header { have } => {
                    let take = (FRAME_HEADER_BYTES - have).min(input.len());
                    let (now, rest) = input.split_at(take);
                    self.header[have..have + take].copy_from_slice(now);
                    *input = rest;
                    let have = have + take;
                    if have < FRAME_HEADER_BYTES {
                        self.state = State::Header { have };
                        return Ok(None);
                    }
                    match parse_header(&self.header, self.frame_bytes_max) {
                        Ok(len) => {
                            let len = len as usize;
                            debug_assert!(
                                self.body.is_empty(),
                                "body buffer cleared between frames"
                            );
                            self.state = State::Body { len };
                        }
                        Err(e) => {
                            self.state = State::Failed;
                            return Err(e);
                        }
                    }
                }
                State::Body { len } => {
                    let take = (len - self.body.len()).min(input.len());
                    let (now, rest) = input.split_at(take);
                    self.body.extend_from_slice(now);
                    *input = rest;
                    if self.body.len() < len {
                        return Ok(None);
                    }
                    debug_assert_eq!(
                        self.body.len(),
                        len,
                        "body never grows past its header's length"
                    );
                    self.state = State::Yielded;
                    return Ok(Some(self.body.as_slice()));
                }
            }
        }
    }

    /// Bytes buffered for the frame in progress (header and body), for metrics and tests.
    pub fn buffered_bytes(&self) -> usize {
        match self.state {
            State::Header { have } => have,
            State::Body { .. } => FRAME_HEADER_BYTES + self.body.len(),
            State::Yielded | State::Failed => 0,
        }
    }

    /// Capacity held by the body buffer, in bytes. It grows in powers of two as body bytes
    /// arrive and is kept for reuse, so it stays below twice the largest frame accepted
    /// (and so below twice `frame_bytes_max`).
    pub fn capacity_bytes(&self) -> usize {
        self.body.capacity()
    }
}
