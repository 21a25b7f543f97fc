//! Sealed, length-prefixed frames over TCP and sealed datagrams over UDP: the bytes side of
//! the wire, shared by collectors and exporters.

use std::sync::Mutex;

use rand::rngs::StdRng;
use tenure_gossip::frame::{self, FrameDecoder, FrameError, FrameLimits};
use tenure_gossip::seal::{Channel, Keyring, Opener, OpenerConfig, SealError, Sealer, SecretKey};
use tenure_gossip::wire::{self, AlignedVec, Message, WireError, WireLimits};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes read from a socket at once.
pub const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Why a frame or datagram was refused; also the `reason` label of the rejected-frames
/// metric.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("framing: {0}")]
    Frame(#[from] FrameError),
    #[error("sealing: {0}")]
    Seal(#[from] SealError),
    #[error("message: {0}")]
    Wire(#[from] WireError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed")]
    Closed,
}

impl TransportError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            TransportError::Frame(_) => "frame",
            TransportError::Seal(
                SealError::Replayed { .. }
                | SealError::TooOld { .. }
                | SealError::StaleEpoch { .. },
            ) => "replay",
            TransportError::Seal(
                SealError::UnknownKey { .. } | SealError::AuthenticationFailed { .. },
            ) => "auth",
            TransportError::Seal(
                SealError::Truncated { .. }
                | SealError::Oversized { .. }
                | SealError::UnsupportedVersion { .. }
                | SealError::WrongChannel { .. }
                | SealError::CounterExhausted,
            ) => "seal",
            TransportError::Wire(_) => "invalid",
            TransportError::Io(_) => "io",
            TransportError::Closed => "closed",
        }
    }
}

/// Sealing state of one node: keys, sealers per channel, one opener, and the RNG that
/// draws nonces (seeded from the OS: the shell, not the core, owns it).
#[derive(Debug)]
pub struct Crypto {
    keyring: Keyring,
    /// A second keyring accepted on the data plane (exporters' key), when different.
    exporter_keyring: Option<Keyring>,
    data: Mutex<(Sealer, StdRng)>,
    gossip: Mutex<(Sealer, StdRng)>,
    opener: Mutex<Opener>,
    limits: FrameLimits,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Crypto {
    /// `sender_id` names this node in envelopes; `epoch` must grow on every restart (the
    /// start time in ms does).
    pub fn new(
        key_id: u32,
        key: &SecretKey,
        exporter: Option<(u32, &SecretKey)>,
        sender_id: u64,
        epoch: u64,
    ) -> Crypto {
        let limits = FrameLimits::default();
        Crypto {
            keyring: Keyring::new(key_id, key),
            exporter_keyring: exporter.map(|(id, k)| Keyring::new(id, k)),
            data: Mutex::new((
                Sealer::new(Channel::Data, sender_id, epoch),
                rand::make_rng(),
            )),
            gossip: Mutex::new((
                Sealer::new(Channel::Gossip, sender_id, epoch)
                    .with_sealed_bytes_max(limits.datagram_bytes_max),
                rand::make_rng(),
            )),
            opener: Mutex::new(Opener::new(OpenerConfig::default())),
            limits,
        }
    }

    /// One sealed data-plane frame holding `message`.
    pub fn frame(&self, message: &Message) -> Result<Vec<u8>, TransportError> {
        let plain = wire::encode(message)?;
        let mut out = Vec::with_capacity(plain.len() + 128);
        let mut guard = lock(&self.data);
        let (sealer, rng) = &mut *guard;
        frame::encode_frame_with::<TransportError, _>(
            &mut out,
            self.limits.frame_bytes_max,
            |body| {
                sealer.seal(&self.keyring, rng, &plain, body)?;
                Ok(())
            },
        )?;
        Ok(out)
    }

    /// One sealed gossip datagram holding `plaintext`.
    pub fn datagram(&self, plaintext: &[u8]) -> Result<Vec<u8>, TransportError> {
        let mut sealed = Vec::with_capacity(plaintext.len() + 128);
        {
            let mut guard = lock(&self.gossip);
            let (sealer, rng) = &mut *guard;
            sealer.seal(&self.keyring, rng, plaintext, &mut sealed)?;
        }
        let mut out = Vec::with_capacity(sealed.len() + frame::FRAME_HEADER_BYTES);
        frame::encode_datagram(&sealed, self.limits.datagram_bytes_max, &mut out)?;
        Ok(out)
    }

    /// Opens a received datagram into `plaintext`.
    pub fn open_datagram(
        &self,
        datagram: &[u8],
        plaintext: &mut AlignedVec,
    ) -> Result<(), TransportError> {
        let body = frame::decode_datagram(datagram, self.limits.datagram_bytes_max)?;
        lock(&self.opener).open(&self.keyring, Channel::Gossip, body, plaintext)?;
        Ok(())
    }

    /// Opens a frame body and decodes the message inside.
    pub fn open_frame(
        &self,
        body: &[u8],
        plaintext: &mut AlignedVec,
    ) -> Result<Message, TransportError> {
        let opened = {
            let mut opener = lock(&self.opener);
            match opener.open(&self.keyring, Channel::Data, body, plaintext) {
                Ok(o) => Ok(o),
                Err(
                    e @ (SealError::UnknownKey { .. } | SealError::AuthenticationFailed { .. }),
                ) => match &self.exporter_keyring {
                    Some(k) => opener.open(k, Channel::Data, body, plaintext),
                    None => Err(e),
                },
                Err(e) => Err(e),
            }
        };
        opened?;
        let archived = wire::decode(plaintext, &WireLimits::default())?;
        Ok(wire::to_owned(archived)?)
    }

    /// A decoder for one TCP stream.
    pub fn decoder(&self) -> FrameDecoder {
        FrameDecoder::new(self.limits)
    }
}

/// Reads frames from a stream and hands each decoded message to `on_message`; returns when
/// the stream ends or fails. A frame that fails to open or decode ends the stream too
/// (after a bad frame the peer's state is unknown), and is reported to `on_reject`.
pub async fn read_messages<R, F, Fut>(
    crypto: &Crypto,
    mut reader: R,
    mut on_message: F,
    mut on_reject: impl FnMut(&TransportError),
) -> TransportError
where
    R: AsyncRead + Unpin,
    F: FnMut(Message) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut decoder = crypto.decoder();
    let mut buf = vec![0u8; READ_CHUNK_BYTES];
    let mut plaintext = AlignedVec::new();
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) => return TransportError::Closed,
            Ok(n) => n,
            Err(e) => return TransportError::Io(e),
        };
        let mut input = &buf[..n];
        loop {
            let message = match decoder.decode(&mut input) {
                Ok(Some(body)) => crypto.open_frame(body, &mut plaintext),
                Ok(None) => break,
                Err(e) => Err(TransportError::Frame(e)),
            };
            match message {
                Ok(m) => on_message(m).await,
                Err(e) => {
                    on_reject(&e);
                    return e;
                }
            }
        }
    }
}
