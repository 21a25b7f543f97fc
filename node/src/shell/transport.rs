//! Sealed, length-prefixed frames over TCP and sealed datagrams over UDP: the bytes side of
//! the wire, shared by collectors and exporters.

use std::sync::Mutex;
use std::time::Duration;

use rand::rngs::StdRng;
use tenure_gossip::frame::{self, FrameDecoder, FrameError, FrameLimits};
use tenure_gossip::seal::{
    BoundKeys, Channel, Keyring, Opener, OpenerConfig, SealError, Sealer, SecretKey,
};
use tenure_gossip::wire::{self, AlignedVec, Message, WireError, WireLimits};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::core::Sender;

/// Bytes read from a socket at once.
pub const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Why a frame or datagram was refused; also the `reason` label of the rejected-frames
/// metric.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("framing")]
    Frame(#[from] FrameError),
    #[error("sealing")]
    Seal(#[from] SealError),
    #[error("message")]
    Wire(#[from] WireError),
    #[error("io")]
    Io(#[from] std::io::Error),
    #[error("connection closed")]
    Closed,
    /// A connection whose first frame was sealed with one key family (exporter or
    /// cluster) sent a frame sealed with the other.
    #[error("frame sealed with the other key family than the connection's first frame")]
    MixedKeys,
    /// Nothing arrived for too long, or a frame took too long to arrive.
    #[error("read timed out (partial frame: {partial_frame})")]
    Timeout { partial_frame: bool },
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
            TransportError::MixedKeys => "mixed_keys",
            TransportError::Timeout { .. } => "timeout",
        }
    }
}

/// Sealing state of one node: keys, sealers per channel, one opener per key family, and
/// the RNG that draws nonces (seeded from the OS: the shell, not the core, owns it).
///
/// Collectors hold two keyrings: the cluster's (gossip and peer frames) and the exporters'
/// (data-plane frames from exporters). The keyring that opens a frame says who sent it
/// ([`Sender`]); the two have separate replay state, so that an exporter cannot disturb a
/// peer's replay window by stating the peer's sender id. Both keyrings can be replaced
/// while running ([`Crypto::replace_keys`]), for key rotation.
#[derive(Debug)]
pub struct Crypto {
    keys: Mutex<Keys>,
    data: Mutex<(Sealer, StdRng)>,
    gossip: Mutex<(Sealer, StdRng)>,
    opener: Mutex<Opener>,
    exporter_opener: Mutex<Opener>,
    limits: FrameLimits,
}

/// The keyrings of a node.
#[derive(Debug)]
pub struct Keys {
    /// Seals everything this node sends (but replies to exporters); opens gossip and
    /// peer frames. An exporter's only keyring.
    pub cluster: Keyring,
    /// Opens frames from exporters and seals the replies to them when exporters share one
    /// key; none on exporters, with a registry, and in development mode, where exporters
    /// use the cluster key.
    pub exporter: Option<Keyring>,
    /// Each exporter's own keys, bound to its id (the exporter registry): a frame one opens
    /// comes from [`Sender::ProvenExporter`], and the reply is sealed with the same key.
    pub registry: Option<BoundKeys>,
}

/// Who sealed an opened frame, and with which key (replies use the same one).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FrameOrigin {
    /// Which keyring opened it.
    pub sender: Sender,
    /// The key id in its envelope.
    pub key_id: u32,
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
        Crypto::with_keys(
            Keys {
                cluster: Keyring::new(key_id, key),
                exporter: exporter.map(|(id, k)| Keyring::new(id, k)),
                registry: None,
            },
            sender_id,
            epoch,
        )
    }

    /// Like [`Crypto::new`], with keyrings that may hold two keys each (during rotation).
    pub fn with_keys(keys: Keys, sender_id: u64, epoch: u64) -> Crypto {
        let limits = FrameLimits::default();
        Crypto {
            keys: Mutex::new(keys),
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
            exporter_opener: Mutex::new(Opener::new(OpenerConfig::default())),
            limits,
        }
    }

    /// Replaces both keyrings (a configuration reload). Replay state is kept: a rotation
    /// does not reopen any window.
    pub fn replace_keys(&self, keys: Keys) {
        *lock(&self.keys) = keys;
    }

    /// Exporters whose keys are bound (registry), and keys bound; zeros without one.
    pub fn registry_size(&self) -> (usize, usize) {
        let keys = lock(&self.keys);
        keys.registry.as_ref().map_or((0, 0), |r| {
            let owners: std::collections::BTreeSet<u64> = r.bindings().map(|(_, o)| o).collect();
            (owners.len(), r.len())
        })
    }

    /// The key ids in use: (cluster send, cluster accepted, exporter send, exporter
    /// accepted), for logs and tests.
    pub fn key_ids(&self) -> (u32, Vec<u32>, Option<u32>, Vec<u32>) {
        let keys = lock(&self.keys);
        (
            keys.cluster.send_key_id(),
            keys.cluster.accepted_key_ids().collect(),
            keys.exporter.as_ref().map(Keyring::send_key_id),
            keys.exporter
                .as_ref()
                .map(|k| k.accepted_key_ids().collect())
                .unwrap_or_default(),
        )
    }

    /// One sealed data-plane frame holding `message`, under the cluster send key.
    pub fn frame(&self, message: &Message) -> Result<Vec<u8>, TransportError> {
        self.frame_to(message, None)
    }

    /// One sealed data-plane frame holding `message`: a reply to a frame that came from
    /// `origin` goes out under the key that frame was sealed with (an exporter's key for
    /// an exporter), anything else under the cluster send key.
    pub fn frame_to(
        &self,
        message: &Message,
        origin: Option<FrameOrigin>,
    ) -> Result<Vec<u8>, TransportError> {
        let plain = wire::encode(message)?;
        let mut out = Vec::with_capacity(plain.len() + 128);
        let keys = lock(&self.keys);
        if let Some(FrameOrigin {
            sender: Sender::ProvenExporter(_),
            key_id,
        }) = origin
        {
            // The exporter's own key; gone after a reload that removed it, and then there
            // is no key the exporter could open a reply with.
            let registry = keys
                .registry
                .as_ref()
                .ok_or(TransportError::Seal(SealError::UnknownKey { key_id }))?;
            let mut guard = lock(&self.data);
            let (sealer, rng) = &mut *guard;
            frame::encode_frame_with::<TransportError, _>(
                &mut out,
                self.limits.frame_bytes_max,
                |body| {
                    sealer.seal_with(registry, key_id, rng, &plain, body)?;
                    Ok(())
                },
            )?;
            return Ok(out);
        }
        let (keyring, key_id) = match origin {
            Some(FrameOrigin {
                sender: Sender::Exporter,
                key_id,
            }) => match &keys.exporter {
                Some(ring) => (ring, key_id),
                None => (&keys.cluster, keys.cluster.send_key_id()),
            },
            Some(FrameOrigin {
                sender: Sender::Collector | Sender::ProvenExporter(_),
                ..
            })
            | None => (&keys.cluster, keys.cluster.send_key_id()),
        };
        let mut guard = lock(&self.data);
        let (sealer, rng) = &mut *guard;
        frame::encode_frame_with::<TransportError, _>(
            &mut out,
            self.limits.frame_bytes_max,
            |body| {
                sealer.seal_with(keyring, key_id, rng, &plain, body)?;
                Ok(())
            },
        )?;
        Ok(out)
    }

    /// One sealed gossip datagram holding `plaintext`.
    pub fn datagram(&self, plaintext: &[u8]) -> Result<Vec<u8>, TransportError> {
        let mut sealed = Vec::with_capacity(plaintext.len() + 128);
        {
            let keys = lock(&self.keys);
            let mut guard = lock(&self.gossip);
            let (sealer, rng) = &mut *guard;
            sealer.seal(&keys.cluster, rng, plaintext, &mut sealed)?;
        }
        let mut out = Vec::with_capacity(sealed.len() + frame::FRAME_HEADER_BYTES);
        frame::encode_datagram(&sealed, self.limits.datagram_bytes_max, &mut out)?;
        Ok(out)
    }

    /// Opens a received datagram into `plaintext`. Only the cluster key opens gossip.
    pub fn open_datagram(
        &self,
        datagram: &[u8],
        plaintext: &mut AlignedVec,
    ) -> Result<(), TransportError> {
        let body = frame::decode_datagram(datagram, self.limits.datagram_bytes_max)?;
        let keys = lock(&self.keys);
        lock(&self.opener).open(&keys.cluster, Channel::Gossip, body, plaintext)?;
        Ok(())
    }

    /// Opens a frame body and decodes the message inside; says which keyring opened it.
    pub fn open_frame(
        &self,
        body: &[u8],
        plaintext: &mut AlignedVec,
    ) -> Result<(FrameOrigin, Message), TransportError> {
        let opened = {
            let keys = lock(&self.keys);
            match lock(&self.opener).open(&keys.cluster, Channel::Data, body, plaintext) {
                Ok(o) => Ok((Sender::Collector, o)),
                Err(
                    e @ (SealError::UnknownKey { .. } | SealError::AuthenticationFailed { .. }),
                ) => match (&keys.registry, &keys.exporter) {
                    (Some(r), _) => lock(&self.exporter_opener)
                        .open(r, Channel::Data, body, plaintext)
                        .map(|o| (Sender::ProvenExporter(o.sender_id), o)),
                    (None, Some(k)) => lock(&self.exporter_opener)
                        .open(k, Channel::Data, body, plaintext)
                        .map(|o| (Sender::Exporter, o)),
                    (None, None) => Err(e),
                },
                Err(e) => Err(e),
            }
        };
        let (sender, opened) = opened?;
        let archived = wire::decode(plaintext, &WireLimits::default())?;
        let origin = FrameOrigin {
            sender,
            key_id: opened.key_id,
        };
        Ok((origin, wire::to_owned(archived)?))
    }

    /// A decoder for one TCP stream.
    pub fn decoder(&self) -> FrameDecoder {
        FrameDecoder::new(self.limits)
    }
}

/// Deadlines of one data-plane connection. They keep a slow or half-open peer from holding
/// a connection slot (and its buffer) forever.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ReadTimeouts {
    /// How long a connection may stay silent between frames, in ms.
    pub idle_ms: u64,
    /// How long one frame may take to arrive once its first byte has, in ms.
    pub frame_ms: u64,
}

impl Default for ReadTimeouts {
    fn default() -> Self {
        ReadTimeouts {
            idle_ms: CONN_IDLE_TIMEOUT_MS_DEFAULT,
            frame_ms: FRAME_READ_TIMEOUT_MS_DEFAULT,
        }
    }
}

/// Default for [`ReadTimeouts::idle_ms`]: above any heartbeat interval, so an exporter's
/// connection stays up between batches.
pub const CONN_IDLE_TIMEOUT_MS_DEFAULT: u64 = 120_000;

/// Default for [`ReadTimeouts::frame_ms`]: a 4 MiB frame at 1 MiB/s, with room to spare.
pub const FRAME_READ_TIMEOUT_MS_DEFAULT: u64 = 10_000;

/// Reads frames from a stream and hands each decoded message, with who sealed it, to
/// `on_message`; returns when the stream ends or fails. A frame that fails to open or
/// decode ends the stream too (after a bad frame the peer's state is unknown), and is
/// reported to `on_reject`; so does a frame sealed by the other key family than the
/// connection's first frame (a connection is an exporter's or a peer's, never both), and
/// a peer that stays silent or sends too slowly past `timeouts`.
pub async fn read_messages<R, F, Fut>(
    crypto: &Crypto,
    mut reader: R,
    timeouts: ReadTimeouts,
    mut on_message: F,
    mut on_reject: impl FnMut(&TransportError),
) -> TransportError
where
    R: AsyncRead + Unpin,
    F: FnMut(FrameOrigin, Message) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut decoder = crypto.decoder();
    let mut buf = vec![0u8; READ_CHUNK_BYTES];
    let mut plaintext = AlignedVec::new();
    let mut pinned: Option<Sender> = None;
    // Set while a frame is partly read: when it must be complete.
    let mut frame_deadline: Option<tokio::time::Instant> = None;
    loop {
        let idle = tokio::time::Instant::now() + Duration::from_millis(timeouts.idle_ms);
        let deadline = frame_deadline.map_or(idle, |d| d.min(idle));
        let read = tokio::time::timeout_at(deadline, reader.read(&mut buf)).await;
        let n = match read {
            Err(_) => {
                let e = TransportError::Timeout {
                    partial_frame: frame_deadline.is_some(),
                };
                on_reject(&e);
                return e;
            }
            Ok(Ok(0)) => return TransportError::Closed,
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return TransportError::Io(e),
        };
        let mut input = &buf[..n];
        loop {
            let message = match decoder.decode(&mut input) {
                Ok(Some(body)) => crypto.open_frame(body, &mut plaintext),
                Ok(None) => break,
                Err(e) => Err(TransportError::Frame(e)),
            };
            let message = message.and_then(|(origin, m)| match pinned {
                Some(first) if first != origin.sender => Err(TransportError::MixedKeys),
                Some(_) | None => {
                    pinned = Some(origin.sender);
                    Ok((origin, m))
                }
            });
            match message {
                Ok((origin, m)) => on_message(origin, m).await,
                Err(e) => {
                    on_reject(&e);
                    return e;
                }
            }
        }
        frame_deadline = if decoder.buffered_bytes() == 0 {
            None
        } else {
            Some(frame_deadline.unwrap_or_else(|| {
                tokio::time::Instant::now() + Duration::from_millis(timeouts.frame_ms)
            }))
        };
    }
}
