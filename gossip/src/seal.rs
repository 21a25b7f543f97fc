//! Authenticated encryption of every gossip datagram and data-plane frame, with key rotation
//! and replay protection.
//!
//! A sealed envelope is a fixed header, authenticated as associated data, then the
//! XChaCha20-Poly1305 ciphertext and its tag:
//!
//! ```text
//! offset  0  u8        SEAL_VERSION
//! offset  1  u8        channel (0 gossip datagram, 1 data-plane frame)
//! offset  2  u32 LE    key id
//! offset  6  u64 LE    sender id
//! offset 14  u64 LE    sender epoch (bumped on every restart of the sender)
//! offset 22  u64 LE    counter (per sender, epoch and channel; starts at 0)
//! offset 30  [u8; 24]  nonce, drawn from the injected RNG
//! offset 54  ...       ciphertext, then the 16-byte Poly1305 tag
//! ```
//!
//! Invariants:
//! - Nothing in the header is trusted before the tag verifies; the replay window and the
//!   sender table change only after it does, so a forged or corrupted envelope never changes
//!   the receiver's state.
//! - The channel is authenticated, so a datagram cannot be injected into a stream or the
//!   other way round, and each channel has its own replay window (UDP reordering cannot push
//!   a queued TCP frame out of the window).
//! - Nonces are random: 192 bits make collisions negligible without any nonce state, so a
//!   sender needs no persistent state beyond its epoch.
//!
//! Opened plaintext is written into a caller-owned [`AlignedVec`], so the rkyv archive inside
//! can be validated and read zero-copy without another copy (see `wire`).

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroUsize;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use rand::CryptoRng;
use rkyv::util::AlignedVec;

/// The first byte of every sealed envelope; bumped when the envelope layout changes.
pub const SEAL_VERSION: u8 = 1;

/// Bytes in the envelope header (authenticated, not encrypted).
pub const SEAL_HEADER_BYTES: usize = 54;

/// Bytes of the Poly1305 tag after the ciphertext.
pub const SEAL_TAG_BYTES: usize = 16;

/// Bytes sealing adds to a plaintext: header and tag.
pub const SEAL_OVERHEAD_BYTES: usize = SEAL_HEADER_BYTES + SEAL_TAG_BYTES;

/// Bytes of an XChaCha20-Poly1305 nonce.
pub const NONCE_BYTES: usize = 24;

/// Bytes of a key.
pub const KEY_BYTES: usize = 32;

/// How many counters behind the newest one a frame may arrive and still be accepted (once).
/// As in WireGuard and IPsec: wide enough for any reordering UDP and a few TCP connections
/// produce, small enough to be a fixed 136-byte bitmap per sender.
pub const REPLAY_WINDOW_COUNTERS: u64 = 1024;

/// Default for [`OpenerConfig::senders_max`]: senders whose replay state is kept. Above
/// any region's collectors plus the exporters that talk to one collector.
pub const SENDERS_MAX_DEFAULT: usize = 4096;

/// Default for the largest envelope sealed or opened, in bytes: the largest stream frame.
pub const SEALED_BYTES_MAX_DEFAULT: u32 = crate::frame::FRAME_BYTES_MAX_DEFAULT;

/// Which transport an envelope was sealed for. Authenticated, and each has its own replay
/// window per sender.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Channel {
    /// UDP gossip datagrams (membership, broadcasts).
    Gossip,
    /// TCP data-plane frames (claims, flows, handoff).
    Data,
}

impl Channel {
    fn to_byte(self) -> u8 {
        match self {
            Channel::Gossip => 0,
            Channel::Data => 1,
        }
    }

    fn from_byte(byte: u8) -> Option<Channel> {
        match byte {
            0 => Some(Channel::Gossip),
            1 => Some(Channel::Data),
            _ => None,
        }
    }
}

/// A 256-bit cluster (or exporter) key. Its `Debug` never prints the key.
#[derive(Clone)]
pub struct SecretKey([u8; KEY_BYTES]);

impl SecretKey {
    /// A key from its raw bytes (read from the key file by the shell).
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> Self {
        SecretKey(bytes)
    }

    /// A fresh key drawn from `rng` (tests and the simulator; production keys come from
    /// configuration).
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut bytes = [0u8; KEY_BYTES];
        rng.fill_bytes(&mut bytes);
        SecretKey(bytes)
    }
}

impl SecretKey {
    /// Whether two keys are the same, compared in constant time (configuration checks that
    /// an exporter key is not the cluster key).
    pub fn same_as(&self, other: &SecretKey) -> bool {
        let diff = self
            .0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        diff == 0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// Why a keyring change was refused. The keyring is unchanged when one is returned.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum KeyringError {
    /// Two keys are accepted already: retire one before adding another.
    #[error("keyring already holds two keys; retire one before accepting key {key_id}")]
    Full {
        /// The key id that was to be added.
        key_id: u32,
    },
    /// A key with this id is accepted already; ids must name one key each.
    #[error("key id {key_id} is already in the keyring")]
    DuplicateKeyId {
        /// The duplicated id.
        key_id: u32,
    },
    /// No accepted key has this id.
    #[error("key id {key_id} is not in the keyring")]
    NotAccepted {
        /// The id asked for.
        key_id: u32,
    },
    /// The send key cannot be retired; switch sending to the other key first.
    #[error("key id {key_id} is the send key; switch sending to another key before retiring it")]
    IsSendKey {
        /// The send key's id.
        key_id: u32,
    },
}

/// An accepted key, with its cipher set up once.
struct RingKey {
    key_id: u32,
    cipher: XChaCha20Poly1305,
}

/// The keys a node seals with and opens with: one send key and up to two accepted keys (the
/// send key among them).
///
/// Rotation without downtime, on every node: [`Keyring::accept`] the new key, then once all
/// nodes accept it [`Keyring::send_with`] the new key, then once all nodes send with it
/// [`Keyring::retire`] the old one.
pub struct Keyring {
    send_key_id: u32,
    keys: [Option<RingKey>; 2],
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("send_key_id", &self.send_key_id)
            .field(
                "accepted_key_ids",
                &self.accepted_key_ids().collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Keyring {
    /// A keyring that sends with and accepts only `key`.
    pub fn new(key_id: u32, key: &SecretKey) -> Self {
        Keyring {
            send_key_id: key_id,
            keys: [Some(RingKey::new(key_id, key)), None],
        }
    }

    /// Also accepts `key` (first step of a rotation).
    ///
    /// # Errors
    /// [`KeyringError::Full`] or [`KeyringError::DuplicateKeyId`]; the keyring is unchanged.
    pub fn accept(&mut self, key_id: u32, key: &SecretKey) -> Result<(), KeyringError> {
        if self.find(key_id).is_some() {
            return Err(KeyringError::DuplicateKeyId { key_id });
        }
        let slot = self
            .keys
            .iter_mut()
            .find(|slot| slot.is_none())
            .ok_or(KeyringError::Full { key_id })?;
        *slot = Some(RingKey::new(key_id, key));
        Ok(())
    }

    /// Seals with the accepted key `key_id` from now on (second step of a rotation).
    ///
    /// # Errors
    /// [`KeyringError::NotAccepted`]; the keyring is unchanged.
    pub fn send_with(&mut self, key_id: u32) -> Result<(), KeyringError> {
        self.find(key_id)
            .ok_or(KeyringError::NotAccepted { key_id })?;
        self.send_key_id = key_id;
        Ok(())
    }

    /// Stops accepting `key_id` (last step of a rotation).
    ///
    /// # Errors
    /// [`KeyringError::IsSendKey`] or [`KeyringError::NotAccepted`]; the keyring is unchanged.
    pub fn retire(&mut self, key_id: u32) -> Result<(), KeyringError> {
        if key_id == self.send_key_id {
            return Err(KeyringError::IsSendKey { key_id });
        }
        let slot = self
            .keys
            .iter_mut()
            .find(|slot| slot.as_ref().is_some_and(|k| k.key_id == key_id))
            .ok_or(KeyringError::NotAccepted { key_id })?;
        *slot = None;
        Ok(())
    }

    /// The id of the key new envelopes are sealed with.
    pub fn send_key_id(&self) -> u32 {
        self.send_key_id
    }

    /// The ids of the keys envelopes are opened with.
    pub fn accepted_key_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.keys.iter().flatten().map(|k| k.key_id)
    }

    fn find(&self, key_id: u32) -> Option<&XChaCha20Poly1305> {
        self.keys
            .iter()
            .flatten()
            .find(|k| k.key_id == key_id)
            .map(|k| &k.cipher)
    }
}

impl KeyLookup for Keyring {
    fn lookup(&self, key_id: u32) -> Option<FoundKey<'_>> {
        self.find(key_id).map(|cipher| FoundKey {
            cipher,
            owner: None,
        })
    }
}

/// A key found by its id: its cipher and, for a key bound to one sender, that sender.
#[derive(Clone, Copy)]
pub struct FoundKey<'a> {
    cipher: &'a XChaCha20Poly1305,
    owner: Option<u64>,
}

impl fmt::Debug for FoundKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FoundKey")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

mod private {
    pub trait Sealed {}
    impl Sealed for super::Keyring {}
    impl Sealed for super::BoundKeys {}
}

/// Where a [`Sealer`] or an [`Opener`] finds the key an envelope names: a [`Keyring`]
/// (shared keys: any holder may state any sender id) or [`BoundKeys`] (each key speaks for
/// one sender only). Implemented by those two.
pub trait KeyLookup: private::Sealed {
    /// The key `key_id`, if accepted.
    fn lookup(&self, key_id: u32) -> Option<FoundKey<'_>>;
}

/// Default for the most keys [`BoundKeys`] holds: two per exporter (a rotation) for a
/// region of 32,768 hosts.
pub const BOUND_KEYS_MAX_DEFAULT: usize = 65_536;

/// Why a key could not be bound. [`BoundKeys`] is unchanged when one is returned.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum BindError {
    /// Another key has this id already; key ids name one key each.
    #[error("key id {key_id} is bound already")]
    DuplicateKeyId {
        /// The duplicated id.
        key_id: u32,
    },
    /// The table holds its most keys.
    #[error("at most {keys_max} keys can be bound")]
    Full {
        /// The limit.
        keys_max: usize,
    },
}

/// Keys each bound to one sender (an exporter's own credential): an envelope opened with
/// one speaks for its owner, whatever sender id its header states, and its replay state is
/// the owner's. So a key's holder can speak for nobody else, nor disturb another sender's
/// replay window. A sender may own several keys (the old and new key of a rotation).
pub struct BoundKeys {
    keys: BTreeMap<u32, RingKey>,
    owners: BTreeMap<u32, u64>,
    keys_max: usize,
}

impl fmt::Debug for BoundKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoundKeys")
            .field("owners_by_key_id", &self.owners)
            .finish_non_exhaustive()
    }
}

impl Default for BoundKeys {
    fn default() -> Self {
        BoundKeys::new(BOUND_KEYS_MAX_DEFAULT)
    }
}

impl BoundKeys {
    /// An empty table that holds at most `keys_max` keys.
    pub fn new(keys_max: usize) -> Self {
        BoundKeys {
            keys: BTreeMap::new(),
            owners: BTreeMap::new(),
            keys_max,
        }
    }

    /// Binds `key`, named `key_id` in envelopes, to the sender `owner`.
    ///
    /// # Errors
    /// [`BindError::DuplicateKeyId`] or [`BindError::Full`]; the table is unchanged.
    pub fn bind(&mut self, key_id: u32, owner: u64, key: &SecretKey) -> Result<(), BindError> {
        if self.keys.contains_key(&key_id) {
            return Err(BindError::DuplicateKeyId { key_id });
        }
        if self.keys.len() >= self.keys_max {
            return Err(BindError::Full {
                keys_max: self.keys_max,
            });
        }
        self.keys.insert(key_id, RingKey::new(key_id, key));
        self.owners.insert(key_id, owner);
        Ok(())
    }

    /// The sender key `key_id` is bound to.
    pub fn owner_of(&self, key_id: u32) -> Option<u64> {
        self.owners.get(&key_id).copied()
    }

    /// Key ids and their owners, in key id order.
    pub fn bindings(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.owners.iter().map(|(k, o)| (*k, *o))
    }

    /// Keys bound.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is bound.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl KeyLookup for BoundKeys {
    fn lookup(&self, key_id: u32) -> Option<FoundKey<'_>> {
        let cipher = &self.keys.get(&key_id)?.cipher;
        Some(FoundKey {
            cipher,
            owner: self.owners.get(&key_id).copied(),
        })
    }
}

impl RingKey {
    fn new(key_id: u32, key: &SecretKey) -> Self {
        RingKey {
            key_id,
            cipher: XChaCha20Poly1305::new(&key.0.into()),
        }
    }
}

/// Why an envelope could not be sealed or opened.
///
/// On the receiving side no variant changes the receiver's state: the replay window and the
/// sender table are updated only after the tag verifies, and the keyring is never changed by
/// opening. The plaintext buffer is cleared. On the sending side the sealer's counter and the
/// output buffer are unchanged.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum SealError {
    /// Shorter than a header and a tag, or cut short. The receiver's state did not change.
    #[error("sealed envelope of {sealed_bytes} bytes is truncated (at least {SEAL_OVERHEAD_BYTES} needed)")]
    Truncated {
        /// The envelope's length.
        sealed_bytes: usize,
    },
    /// Larger than the configured limit (sealing: the plaintext plus overhead; opening: the
    /// envelope). The receiver's (or sender's) state did not change.
    #[error(
        "sealed envelope of {sealed_bytes} bytes exceeds the limit of {sealed_bytes_max} bytes"
    )]
    Oversized {
        /// The envelope's length.
        sealed_bytes: usize,
        /// The limit it exceeded.
        sealed_bytes_max: u32,
    },
    /// The version byte is not [`SEAL_VERSION`]. The receiver's state did not change.
    #[error("sealed envelope has version {found}, expected {SEAL_VERSION}")]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
    },
    /// Sealed for another channel (or an unknown one). The receiver's state did not change.
    #[error("sealed envelope has channel byte {found}, expected {expected:?}")]
    WrongChannel {
        /// The channel the receiver opens for.
        expected: Channel,
        /// The channel byte found.
        found: u8,
    },
    /// The key id is not in the keyring (retired, not yet accepted, or another cluster's).
    /// The receiver's state did not change.
    #[error("unknown key id {key_id}")]
    UnknownKey {
        /// The key id stated in the header.
        key_id: u32,
    },
    /// The tag did not verify: corrupted, forged, or sealed under another key with the same
    /// id. The receiver's state did not change.
    #[error("authentication failed (key id {key_id})")]
    AuthenticationFailed {
        /// The key id stated in the header.
        key_id: u32,
    },
    /// This sender's counter was already accepted in this epoch. The receiver's state did
    /// not change.
    #[error("replayed envelope: sender {sender_id} epoch {epoch} counter {counter}")]
    Replayed {
        /// The sender stated (and authenticated) in the header.
        sender_id: u64,
        /// The sender's epoch.
        epoch: u64,
        /// The replayed counter.
        counter: u64,
    },
    /// The counter is more than [`REPLAY_WINDOW_COUNTERS`] behind the newest accepted from
    /// this sender, so whether it was seen is no longer known. The receiver's state did not
    /// change.
    #[error(
        "envelope too old: sender {sender_id} epoch {epoch} counter {counter}, newest {newest}"
    )]
    TooOld {
        /// The sender.
        sender_id: u64,
        /// The sender's epoch.
        epoch: u64,
        /// The counter refused.
        counter: u64,
        /// The newest counter accepted from this sender in this epoch.
        newest: u64,
    },
    /// The epoch is lower than one already accepted from this sender: a frame from before
    /// the sender restarted. The receiver's state did not change.
    #[error("stale epoch: sender {sender_id} epoch {epoch}, current epoch {current_epoch}")]
    StaleEpoch {
        /// The sender.
        sender_id: u64,
        /// The epoch stated.
        epoch: u64,
        /// The newest epoch accepted from this sender.
        current_epoch: u64,
    },
    /// The sender used every counter of its epoch; it must restart with a higher epoch.
    /// The sealer's state did not change.
    #[error("counter exhausted for this epoch; restart the sender with a higher epoch")]
    CounterExhausted,
}

/// Seals envelopes for one sender, epoch and channel, numbering them with a counter.
///
/// The epoch must grow every time the sender restarts (the shell may use its start time in
/// Unix ms, or a persisted restart count): receivers reject a lower epoch than one they saw,
/// and a restarted sender's counter starts again at 0.
#[derive(Debug)]
pub struct Sealer {
    channel: Channel,
    sender_id: u64,
    epoch: u64,
    next_counter: u64,
    sealed_bytes_max: u32,
}

impl Sealer {
    /// A sealer whose first envelope has counter 0, limited to
    /// [`SEALED_BYTES_MAX_DEFAULT`].
    pub fn new(channel: Channel, sender_id: u64, epoch: u64) -> Self {
        Sealer {
            channel,
            sender_id,
            epoch,
            next_counter: 0,
            sealed_bytes_max: SEALED_BYTES_MAX_DEFAULT,
        }
    }

    /// The same sealer with another limit on envelope size, in bytes: for gossip datagrams,
    /// `FrameLimits::datagram_bytes_max` (the envelope is the datagram frame's body).
    pub fn with_sealed_bytes_max(mut self, sealed_bytes_max: u32) -> Self {
        self.sealed_bytes_max = sealed_bytes_max;
        self
    }

    /// The counter the next envelope will carry.
    pub fn next_counter(&self) -> u64 {
        self.next_counter
    }

    /// Appends the envelope of `plaintext`, sealed under the keyring's send key with a nonce
    /// from `rng`, to `out`.
    ///
    /// # Errors
    /// [`SealError::Oversized`] or [`SealError::CounterExhausted`]; `out` and the counter are
    /// unchanged.
    pub fn seal<R: CryptoRng + ?Sized>(
        &mut self,
        keyring: &Keyring,
        rng: &mut R,
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), SealError> {
        self.seal_with(keyring, keyring.send_key_id(), rng, plaintext, out)
    }

    /// Like [`Sealer::seal`], but under the accepted key `key_id` rather than the send key:
    /// a reply goes out under the key its request came in with, so that a sender in the
    /// middle of a key rotation can always open it.
    ///
    /// # Errors
    /// [`SealError::UnknownKey`] when `key_id` is not accepted, [`SealError::Oversized`] or
    /// [`SealError::CounterExhausted`]; `out` and the counter are unchanged.
    pub fn seal_with<K: KeyLookup + ?Sized, R: CryptoRng + ?Sized>(
        &mut self,
        keys: &K,
        key_id: u32,
        rng: &mut R,
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), SealError> {
        let cipher = keys
            .lookup(key_id)
            .ok_or(SealError::UnknownKey { key_id })?
            .cipher;
        let sealed_bytes = plaintext.len().saturating_add(SEAL_OVERHEAD_BYTES);
        if sealed_bytes > self.sealed_bytes_max as usize {
            return Err(SealError::Oversized {
                sealed_bytes,
                sealed_bytes_max: self.sealed_bytes_max,
            });
        }
        let counter = self.next_counter;
        let next_counter = counter.checked_add(1).ok_or(SealError::CounterExhausted)?;
        let mut nonce = [0u8; NONCE_BYTES];
        rng.fill_bytes(&mut nonce);
        let header = Header {
            channel: self.channel,
            key_id,
            sender_id: self.sender_id,
            epoch: self.epoch,
            counter,
            nonce,
        }
        .to_bytes();

        let start = out.len();
        out.reserve(sealed_bytes);
        out.extend_from_slice(&header);
        out.extend_from_slice(plaintext);
        let sealed = cipher.encrypt_in_place_detached(
            XNonce::from_slice(&nonce),
            &header,
            &mut out[start + SEAL_HEADER_BYTES..],
        );
        match sealed {
            Ok(tag) => out.extend_from_slice(&tag),
            Err(chacha20poly1305::Error) => {
                // Only reachable past 256 GiB of plaintext, far beyond any limit above.
                out.truncate(start);
                return Err(SealError::Oversized {
                    sealed_bytes,
                    sealed_bytes_max: self.sealed_bytes_max,
                });
            }
        }
        debug_assert_eq!(
            out.len() - start,
            sealed_bytes,
            "envelope length is plaintext plus overhead"
        );
        self.next_counter = next_counter;
        Ok(())
    }
}

/// The decoded envelope header. Untrusted until the tag verifies.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Header {
    channel: Channel,
    key_id: u32,
    sender_id: u64,
    epoch: u64,
    counter: u64,
    nonce: [u8; NONCE_BYTES],
}

impl Header {
    fn to_bytes(self) -> [u8; SEAL_HEADER_BYTES] {
        let mut out = [0u8; SEAL_HEADER_BYTES];
        out[0] = SEAL_VERSION;
        out[1] = self.channel.to_byte();
        out[2..6].copy_from_slice(&self.key_id.to_le_bytes());
        out[6..14].copy_from_slice(&self.sender_id.to_le_bytes());
        out[14..22].copy_from_slice(&self.epoch.to_le_bytes());
        out[22..30].copy_from_slice(&self.counter.to_le_bytes());
        out[30..54].copy_from_slice(&self.nonce);
        out
    }

    fn parse(bytes: &[u8; SEAL_HEADER_BYTES], expected: Channel) -> Result<Header, SealError> {
        if bytes[0] != SEAL_VERSION {
            return Err(SealError::UnsupportedVersion { found: bytes[0] });
        }
        let channel = Channel::from_byte(bytes[1])
            .filter(|&c| c == expected)
            .ok_or(SealError::WrongChannel {
                expected,
                found: bytes[1],
            })?;
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let mut key_id = [0u8; 4];
        key_id.copy_from_slice(&bytes[2..6]);
        let mut nonce = [0u8; NONCE_BYTES];
        nonce.copy_from_slice(&bytes[30..54]);
        Ok(Header {
            channel,
            key_id: u32::from_le_bytes(key_id),
            sender_id: u64_at(6),
            epoch: u64_at(14),
            counter: u64_at(22),
            nonce,
        })
    }
}

/// What an opened envelope's authenticated header said.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Opened {
    /// The channel it was sealed for (the one the receiver asked for).
    pub channel: Channel,
    /// The key it was sealed with.
    pub key_id: u32,
    /// The sender: under a shared key ([`Keyring`]) as it stated itself (any key holder can
    /// state any sender id); under a bound key ([`BoundKeys`]) the key's owner, whatever the
    /// header states.
    pub sender_id: u64,
    /// The sender's epoch.
    pub epoch: u64,
    /// Its counter within the epoch.
    pub counter: u64,
}

/// Limits of an [`Opener`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct OpenerConfig {
    /// Senders (per channel) whose replay state is kept; past it the least recently seen
    /// is forgotten. Forgetting a sender means one of its old envelopes could be accepted
    /// once more, so this should exceed the number of peers that send to one node.
    pub senders_max: NonZeroUsize,
    /// The largest envelope opened, in bytes.
    pub sealed_bytes_max: u32,
}

impl Default for OpenerConfig {
    fn default() -> Self {
        OpenerConfig {
            senders_max: NonZeroUsize::new(SENDERS_MAX_DEFAULT).expect("the default is not zero"),
            sealed_bytes_max: SEALED_BYTES_MAX_DEFAULT,
        }
    }
}

/// Words in the replay bitmap: one more than the window needs, so that the word being
/// rotated in never holds a counter still inside the window.
const REPLAY_WORDS: usize = (REPLAY_WINDOW_COUNTERS / 64) as usize + 1;

/// A sliding window over counters (RFC 6479, as WireGuard does it): the newest counter
/// accepted and a bitmap of which of the [`REPLAY_WINDOW_COUNTERS`] before it were seen.
#[derive(Clone, PartialEq, Eq, Debug)]
struct ReplayWindow {
    newest: Option<u64>,
    bits: [u64; REPLAY_WORDS],
}

/// Why a counter is refused by a window.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ReplayReject {
    Replayed,
    TooOld { newest: u64 },
}

impl ReplayWindow {
    fn new() -> Self {
        ReplayWindow {
            newest: None,
            bits: [0; REPLAY_WORDS],
        }
    }

    fn slot(counter: u64) -> (usize, u64) {
        let word = (counter / 64 % REPLAY_WORDS as u64) as usize;
        (word, 1u64 << (counter % 64))
    }

    /// Whether `counter` would be accepted. Does not change the window.
    fn check(&self, counter: u64) -> Result<(), ReplayReject> {
        let Some(newest) = self.newest else {
            return Ok(());
        };
        if counter > newest {
            return Ok(());
        }
        if newest - counter >= REPLAY_WINDOW_COUNTERS {
            return Err(ReplayReject::TooOld { newest });
        }
        let (word, bit) = Self::slot(counter);
        if self.bits[word] & bit != 0 {
            return Err(ReplayReject::Replayed);
        }
        Ok(())
    }

    /// Records `counter`, which [`ReplayWindow::check`] accepted.
    fn commit(&mut self, counter: u64) {
        debug_assert_eq!(
            self.check(counter),
            Ok(()),
            "commit only counters check accepted"
        );
        match self.newest {
            Some(newest) if counter <= newest => {}
            Some(newest) => {
                // Clear the words between the old newest and the new one: they hold
                // counters that have just left the window.
                let steps = (counter / 64 - newest / 64).min(REPLAY_WORDS as u64);
                for step in 1..=steps {
                    let (word, _) = Self::slot((newest / 64 + step) * 64);
                    self.bits[word] = 0;
                }
                self.newest = Some(counter);
            }
            None => {
                self.bits = [0; REPLAY_WORDS];
                self.newest = Some(counter);
            }
        }
        let (word, bit) = Self::slot(counter);
        self.bits[word] |= bit;
    }
}

/// Replay state of one sender on one channel.
#[derive(Clone, Debug)]
struct SenderState {
    epoch: u64,
    window: ReplayWindow,
    /// When it was last accepted, in opener ticks (for least-recently-seen eviction).
    seen_tick: u64,
}

/// Opens envelopes, keeping a replay window per (sender, channel) for the sender's newest
/// epoch.
///
/// Memory is bounded by [`OpenerConfig::senders_max`]. Deterministic: ordered maps, no
/// clock (recency is counted in envelopes accepted).
#[derive(Debug)]
pub struct Opener {
    config: OpenerConfig,
    senders: BTreeMap<(u64, Channel), SenderState>,
    /// Senders by the tick they were last seen, oldest first.
    by_recency: BTreeMap<u64, (u64, Channel)>,
    tick: u64,
}

impl Opener {
    /// An opener that has seen no sender.
    pub fn new(config: OpenerConfig) -> Self {
        Opener {
            config,
            senders: BTreeMap::new(),
            by_recency: BTreeMap::new(),
            tick: 0,
        }
    }

    /// Senders whose replay state is held.
    pub fn senders_tracked(&self) -> usize {
        self.senders.len()
    }

    /// Opens `sealed`, received on `channel`, with the keyring's accepted keys, and writes the
    /// plaintext into `plaintext` (cleared first; 16-byte aligned, ready for `wire::decode`).
    ///
    /// Order of checks: size, version, channel, key id, epoch and replay window (without
    /// changing anything), then the tag; only then the window and sender table are updated.
    ///
    /// # Errors
    /// Any [`SealError`] but `CounterExhausted`; the opener is unchanged and `plaintext` is
    /// left empty.
    pub fn open<K: KeyLookup + ?Sized>(
        &mut self,
        keys: &K,
        channel: Channel,
        sealed: &[u8],
        plaintext: &mut AlignedVec,
    ) -> Result<Opened, SealError> {
        plaintext.clear();
        if sealed.len() > self.config.sealed_bytes_max as usize {
            return Err(SealError::Oversized {
                sealed_bytes: sealed.len(),
                sealed_bytes_max: self.config.sealed_bytes_max,
            });
        }
        let truncated = SealError::Truncated {
            sealed_bytes: sealed.len(),
        };
        let (head, rest) = sealed
            .split_first_chunk::<SEAL_HEADER_BYTES>()
            .ok_or(truncated)?;
        let (ciphertext, tag) = rest.split_last_chunk::<SEAL_TAG_BYTES>().ok_or(truncated)?;
        let mut header = Header::parse(head, channel)?;
        let found = keys.lookup(header.key_id).ok_or(SealError::UnknownKey {
            key_id: header.key_id,
        })?;
        let cipher = found.cipher;
        // A bound key speaks for its owner only: the replay state and the result are the
        // owner's. `head` (authenticated below) keeps the bytes as sent.
        if let Some(owner) = found.owner {
            header.sender_id = owner;
        }
        self.check_replay(&header)?;

        plaintext.extend_from_slice(ciphertext);
        let opened = cipher.decrypt_in_place_detached(
            XNonce::from_slice(&header.nonce),
            head,
            plaintext.as_mut_slice(),
            Tag::from_slice(tag),
        );
        if opened.is_err() {
            plaintext.clear();
            return Err(SealError::AuthenticationFailed {
                key_id: header.key_id,
            });
        }
        self.commit(&header);
        Ok(Opened {
            channel: header.channel,
            key_id: header.key_id,
            sender_id: header.sender_id,
            epoch: header.epoch,
            counter: header.counter,
        })
    }

    /// Whether the header's epoch and counter would be accepted. Changes nothing.
    fn check_replay(&self, header: &Header) -> Result<(), SealError> {
        let Some(state) = self.senders.get(&(header.sender_id, header.channel)) else {
            return Ok(());
        };
        if header.epoch < state.epoch {
            return Err(SealError::StaleEpoch {
                sender_id: header.sender_id,
                epoch: header.epoch,
                current_epoch: state.epoch,
            });
        }
        if header.epoch > state.epoch {
            return Ok(());
        }
        state
            .window
            .check(header.counter)
            .map_err(|reject| match reject {
                ReplayReject::Replayed => SealError::Replayed {
                    sender_id: header.sender_id,
                    epoch: header.epoch,
                    counter: header.counter,
                },
                ReplayReject::TooOld { newest } => SealError::TooOld {
                    sender_id: header.sender_id,
                    epoch: header.epoch,
                    counter: header.counter,
                    newest,
                },
            })
    }

    /// Records an authenticated header that [`Opener::check_replay`] accepted.
    fn commit(&mut self, header: &Header) {
        let key = (header.sender_id, header.channel);
        self.tick += 1;
        let tick = self.tick;
        if let Some(state) = self.senders.get_mut(&key) {
            self.by_recency.remove(&state.seen_tick);
            if header.epoch > state.epoch {
                // The sender restarted: its counters begin again.
                state.epoch = header.epoch;
                state.window = ReplayWindow::new();
            }
            state.window.commit(header.counter);
            state.seen_tick = tick;
        } else {
            if self.senders.len() >= self.config.senders_max.get() {
                if let Some((_, oldest)) = self.by_recency.pop_first() {
                    self.senders.remove(&oldest);
                }
            }
            let mut window = ReplayWindow::new();
            window.commit(header.counter);
            self.senders.insert(
                key,
                SenderState {
                    epoch: header.epoch,
                    window,
                    seen_tick: tick,
                },
            );
        }
        self.by_recency.insert(tick, key);
        debug_assert_eq!(
            self.senders.len(),
            self.by_recency.len(),
            "recency index matches sender table"
        );
        debug_assert!(
            self.senders.len() <= self.config.senders_max.get(),
            "sender table is bounded"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_key_speaks_for_its_owner_only() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (key_a, key_b) = (SecretKey::generate(&mut rng), SecretKey::generate(&mut rng));
        let mut bound = BoundKeys::new(3);
        bound.bind(10, 1, &key_a).expect("bind a");
        bound.bind(20, 2, &key_b).expect("bind b");
        assert_eq!(
            bound.bind(10, 3, &key_b),
            Err(BindError::DuplicateKeyId { key_id: 10 })
        );
        bound.bind(21, 2, &key_b).expect("b's second key");
        assert_eq!(
            bound.bind(30, 3, &key_b),
            Err(BindError::Full { keys_max: 3 })
        );
        assert_eq!(bound.owner_of(21), Some(2));

        // A holds key 10 and states B's sender id, at an epoch far ahead of B's.
        let ring_a = Keyring::new(10, &key_a);
        let ring_b = Keyring::new(20, &key_b);
        let mut forger = Sealer::new(Channel::Data, 2, u64::MAX);
        let mut honest_b = Sealer::new(Channel::Data, 2, 5);
        let mut opener = Opener::new(OpenerConfig::default());
        let mut plain = AlignedVec::new();
        let mut sealed = Vec::new();
        forger
            .seal(&ring_a, &mut rng, b"forged", &mut sealed)
            .expect("seal");
        let opened = opener
            .open(&bound, Channel::Data, &sealed, &mut plain)
            .expect("a's own key opens");
        assert_eq!(opened.sender_id, 1, "it speaks for A, the key's owner");
        // B's replay state is untouched: B's next envelope (epoch 5) still opens.
        sealed.clear();
        honest_b
            .seal(&ring_b, &mut rng, b"b", &mut sealed)
            .expect("seal");
        let opened = opener
            .open(&bound, Channel::Data, &sealed, &mut plain)
            .expect("b opens");
        assert_eq!(opened.sender_id, 2);
        // A key nobody bound is unknown.
        let mut stranger = Sealer::new(Channel::Data, 1, 1);
        let ring_x = Keyring::new(99, &key_a);
        sealed.clear();
        stranger
            .seal(&ring_x, &mut rng, b"x", &mut sealed)
            .expect("seal");
        assert_eq!(
            opener.open(&bound, Channel::Data, &sealed, &mut plain),
            Err(SealError::UnknownKey { key_id: 99 })
        );
        // Replies under a bound key open with the owner's own keyring.
        let mut reply = Sealer::new(Channel::Data, 77, 1);
        sealed.clear();
        reply
            .seal_with(&bound, 20, &mut rng, b"ack", &mut sealed)
            .expect("seal a reply");
        let mut b_side = Opener::new(OpenerConfig::default());
        assert!(b_side
            .open(&ring_b, Channel::Data, &sealed, &mut plain)
            .is_ok());
    }

    #[test]
    fn window_accepts_each_counter_once_in_any_order() {
        let mut w = ReplayWindow::new();
        for c in [5u64, 3, 4, 1000, 6, 999, 2000] {
            assert_eq!(w.check(c), Ok(()), "counter {c}");
            w.commit(c);
            assert_eq!(w.check(c), Err(ReplayReject::Replayed), "counter {c}");
        }
        // 2000 - 999 = 1001 < 1024: still in the window and seen.
        assert_eq!(w.check(999), Err(ReplayReject::Replayed));
        assert_eq!(w.check(998), Ok(()));
        assert_eq!(w.check(976), Err(ReplayReject::TooOld { newest: 2000 }));
        assert_eq!(w.check(977), Ok(()));
    }

    #[test]
    fn window_edges_after_large_jumps() {
        let mut w = ReplayWindow::new();
        w.commit(0);
        w.commit(REPLAY_WINDOW_COUNTERS - 1);
        assert_eq!(w.check(0), Err(ReplayReject::Replayed));
        w.commit(REPLAY_WINDOW_COUNTERS);
        assert_eq!(
            w.check(0),
            Err(ReplayReject::TooOld {
                newest: REPLAY_WINDOW_COUNTERS
            })
        );
        // A jump far ahead clears every word: nothing old is remembered as seen.
        w.commit(1_000_000);
        for c in (1_000_000 - REPLAY_WINDOW_COUNTERS + 1)..1_000_000 {
            assert_eq!(w.check(c), Ok(()), "counter {c}");
        }
    }

    #[test]
    fn window_matches_a_model_over_a_walk() {
        // A simple model: the set of every counter accepted.
        let mut w = ReplayWindow::new();
        let mut seen = std::collections::BTreeSet::new();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut newest = 0u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let c = (newest + 200).saturating_sub(x % 1400);
            let expected = if seen.is_empty() || c > newest {
                Ok(())
            } else if newest - c >= REPLAY_WINDOW_COUNTERS {
                Err(ReplayReject::TooOld { newest })
            } else if seen.contains(&c) {
                Err(ReplayReject::Replayed)
            } else {
                Ok(())
            };
            assert_eq!(w.check(c), expected, "counter {c}, newest {newest}");
            if expected.is_ok() {
                w.commit(c);
                seen.insert(c);
                newest = newest.max(c);
            }
        }
    }

    #[test]
    fn least_recently_seen_sender_is_evicted() {
        let key = SecretKey::from_bytes([7; KEY_BYTES]);
        let ring = Keyring::new(1, &key);
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
        let mut opener = Opener::new(OpenerConfig {
            senders_max: NonZeroUsize::new(2).expect("2 is not zero"),
            sealed_bytes_max: 1024,
        });
        let mut sealers: Vec<Sealer> = (0..3).map(|id| Sealer::new(Channel::Data, id, 1)).collect();
        let mut envelopes = Vec::new();
        for s in &mut sealers {
            let mut out = Vec::new();
            s.seal(&ring, &mut rng, b"x", &mut out).expect("seal");
            envelopes.push(out);
        }
        let mut plain = AlignedVec::new();
        opener
            .open(&ring, Channel::Data, &envelopes[0], &mut plain)
            .expect("open 0");
        opener
            .open(&ring, Channel::Data, &envelopes[1], &mut plain)
            .expect("open 1");
        opener
            .open(&ring, Channel::Data, &envelopes[2], &mut plain)
            .expect("open 2");
        assert_eq!(opener.senders_tracked(), 2);
        // Sender 0 was least recently seen and forgotten; 1 and 2 still reject replays.
        assert!(matches!(
            opener.open(&ring, Channel::Data, &envelopes[1], &mut plain),
            Err(SealError::Replayed { sender_id: 1, .. })
        ));
        assert!(matches!(
            opener.open(&ring, Channel::Data, &envelopes[2], &mut plain),
            Err(SealError::Replayed { sender_id: 2, .. })
        ));
    }
}
