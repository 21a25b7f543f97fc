//! The messages nodes exchange, as rkyv 0.8 archives: validated with bytecheck, then read in
//! place without copying.
//!
//! Invariant: a message is validated before it is read. [`decode`] runs bytecheck over the
//! whole archive (every pointer, length, enum tag and UTF-8 string) and then checks what
//! bytecheck cannot know: every count and string against [`WireLimits`], every dictionary
//! index against its dictionary, every time window in order, snapshot segments sorted and
//! disjoint, prefix lengths within their address family. Only a message that passes all of
//! it is returned, so readers index dictionaries and compare windows without checks.
//! [`encode`] runs the same checks on the owned value first, so a node never sends what
//! its peers would refuse.
//!
//! Layout: one archived [`Message`] enum per frame body (its tag is the kind). The frame's
//! version byte (`frame::FRAME_VERSION`) versions this schema: rkyv archives carry no
//! schema, so a change to any message here must bump it.
//!
//! Alignment: rkyv reads fields in place, so the archive must start at an address aligned
//! to [`MESSAGE_ALIGN_BYTES`]. Received bytes must therefore sit in an [`AlignedVec`]
//! (`seal::Opener::open` writes plaintext into one, and `frame::FrameDecoder` yields aligned
//! bodies); [`decode`] refuses a misaligned slice with [`WireError::Misaligned`] instead
//! of copying behind the caller's back.
//!
//! Sending: `encode` → `seal::Sealer::seal` → `frame::encode_frame_with`. Receiving:
//! `frame::FrameDecoder::decode` (or `frame::decode_datagram`) → `seal::Opener::open` into
//! an `AlignedVec` → [`decode`].

mod check;
mod message;
mod snapshot;

use std::fmt;

use rkyv::rancor;

/// A byte buffer whose start is aligned to 16 bytes, as [`decode`] needs: receive buffers,
/// opened plaintext and encoded messages all live in one. (rkyv's type, with its alignment
/// fixed so that `AlignedVec::new()` needs no annotation.)
pub type AlignedVec = rkyv::util::AlignedVec<16>;

pub use message::*;

/// The alignment, in bytes, that [`decode`] requires of its input (that of the archived
/// message; [`AlignedVec`] guarantees 16).
pub const MESSAGE_ALIGN_BYTES: usize = std::mem::align_of::<ArchivedMessage>();

/// Default for [`WireLimits::flows_per_batch_max`].
pub const FLOWS_PER_BATCH_MAX_DEFAULT: usize = 16_384;
/// Default for [`WireLimits::claims_per_batch_max`].
pub const CLAIMS_PER_BATCH_MAX_DEFAULT: usize = 4_096;
/// Default for [`WireLimits::dictionary_entries_max`].
pub const DICTIONARY_ENTRIES_MAX_DEFAULT: usize = 4_096;
/// Default for [`WireLimits::workload_name_bytes_max`]; the attribution engine's limit.
pub const WORKLOAD_NAME_BYTES_MAX_DEFAULT: usize = 256;
/// Default for [`WireLimits::region_name_bytes_max`]; the region map's limit.
pub const REGION_NAME_BYTES_MAX_DEFAULT: usize = tenure_attribution::region::REGION_NAME_MAX_BYTES;
/// Default for [`WireLimits::owner_name_bytes_max`].
pub const OWNER_NAME_BYTES_MAX_DEFAULT: usize = 256;
/// Default for [`WireLimits::ip_events_per_batch_max`].
pub const IP_EVENTS_PER_BATCH_MAX_DEFAULT: usize = 16_384;
/// Default for [`WireLimits::snapshot_ips_max`].
pub const SNAPSHOT_IPS_MAX_DEFAULT: usize = 65_536;
/// Default for [`WireLimits::segments_per_ip_max`]: above the engine's default of 64 ranges
/// per IP plus the conflict windows between them.
pub const SEGMENTS_PER_IP_MAX_DEFAULT: usize = 256;
/// Default for [`WireLimits::spans_per_request_max`].
pub const SPANS_PER_REQUEST_MAX_DEFAULT: usize = 4_096;
/// Default for [`WireLimits::directory_regions_max`].
pub const DIRECTORY_REGIONS_MAX_DEFAULT: usize = 256;
/// Default for [`WireLimits::prefixes_per_region_max`].
pub const PREFIXES_PER_REGION_MAX_DEFAULT: usize = 256;

/// Limits on what one message may hold, checked on encode and on decode. Counts are items,
/// lengths are bytes. The defaults keep the largest flow batch (flows, claims and a full
/// dictionary) under the 4 MiB frame limit; a range snapshot of many IPs may still exceed
/// it, so senders split snapshots (see [`RangeSnapshot`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct WireLimits {
    /// Flows in one [`FlowBatch`].
    pub flows_per_batch_max: usize,
    /// Claims in one [`ClaimBatch`] or [`FlowBatch`].
    pub claims_per_batch_max: usize,
    /// Entries in one batch's workload dictionary.
    pub dictionary_entries_max: usize,
    /// Bytes of one workload identity (dictionary entry or snapshot owner).
    pub workload_name_bytes_max: usize,
    /// Bytes of a region name.
    pub region_name_bytes_max: usize,
    /// Bytes of an event owner's name.
    pub owner_name_bytes_max: usize,
    /// Events in one [`IpEventBatch`].
    pub ip_events_per_batch_max: usize,
    /// IPs in one [`RangeSnapshot`].
    pub snapshot_ips_max: usize,
    /// Segments of one IP in a [`RangeSnapshot`].
    pub segments_per_ip_max: usize,
    /// Spans in one [`RangeRequest`].
    pub spans_per_request_max: usize,
    /// Regions in one [`RegionDirectory`].
    pub directory_regions_max: usize,
    /// Prefixes of one region in a [`RegionDirectory`].
    pub prefixes_per_region_max: usize,
}

impl Default for WireLimits {
    fn default() -> Self {
        WireLimits {
            flows_per_batch_max: FLOWS_PER_BATCH_MAX_DEFAULT,
            claims_per_batch_max: CLAIMS_PER_BATCH_MAX_DEFAULT,
            dictionary_entries_max: DICTIONARY_ENTRIES_MAX_DEFAULT,
            workload_name_bytes_max: WORKLOAD_NAME_BYTES_MAX_DEFAULT,
            region_name_bytes_max: REGION_NAME_BYTES_MAX_DEFAULT,
            owner_name_bytes_max: OWNER_NAME_BYTES_MAX_DEFAULT,
            ip_events_per_batch_max: IP_EVENTS_PER_BATCH_MAX_DEFAULT,
            snapshot_ips_max: SNAPSHOT_IPS_MAX_DEFAULT,
            segments_per_ip_max: SEGMENTS_PER_IP_MAX_DEFAULT,
            spans_per_request_max: SPANS_PER_REQUEST_MAX_DEFAULT,
            directory_regions_max: DIRECTORY_REGIONS_MAX_DEFAULT,
            prefixes_per_region_max: PREFIXES_PER_REGION_MAX_DEFAULT,
        }
    }
}

/// Which of the [`WireLimits`] a message exceeded.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Limit {
    /// [`WireLimits::flows_per_batch_max`].
    FlowsPerBatch,
    /// [`WireLimits::claims_per_batch_max`].
    ClaimsPerBatch,
    /// [`WireLimits::dictionary_entries_max`].
    DictionaryEntries,
    /// [`WireLimits::workload_name_bytes_max`].
    WorkloadNameBytes,
    /// [`WireLimits::region_name_bytes_max`].
    RegionNameBytes,
    /// [`WireLimits::owner_name_bytes_max`].
    OwnerNameBytes,
    /// [`WireLimits::ip_events_per_batch_max`].
    IpEventsPerBatch,
    /// [`WireLimits::snapshot_ips_max`].
    SnapshotIps,
    /// [`WireLimits::segments_per_ip_max`].
    SegmentsPerIp,
    /// [`WireLimits::spans_per_request_max`].
    SpansPerRequest,
    /// [`WireLimits::directory_regions_max`].
    DirectoryRegions,
    /// [`WireLimits::prefixes_per_region_max`].
    PrefixesPerRegion,
}

impl Limit {
    /// The name of the limit's field in [`WireLimits`], for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Limit::FlowsPerBatch => "flows_per_batch_max",
            Limit::ClaimsPerBatch => "claims_per_batch_max",
            Limit::DictionaryEntries => "dictionary_entries_max",
            Limit::WorkloadNameBytes => "workload_name_bytes_max",
            Limit::RegionNameBytes => "region_name_bytes_max",
            Limit::OwnerNameBytes => "owner_name_bytes_max",
            Limit::IpEventsPerBatch => "ip_events_per_batch_max",
            Limit::SnapshotIps => "snapshot_ips_max",
            Limit::SegmentsPerIp => "segments_per_ip_max",
            Limit::SpansPerRequest => "spans_per_request_max",
            Limit::DirectoryRegions => "directory_regions_max",
            Limit::PrefixesPerRegion => "prefixes_per_region_max",
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a message could not be encoded, decoded or converted. Nothing is partly done: on
/// decode nothing of the message may be read; on encode the buffer holds no message.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The input does not start at a multiple of [`MESSAGE_ALIGN_BYTES`]; receive into an
    /// [`AlignedVec`].
    #[error(
        "message bytes at address offset {offset_bytes} mod {MESSAGE_ALIGN_BYTES} are misaligned"
    )]
    Misaligned {
        /// The input address modulo the required alignment.
        offset_bytes: usize,
    },
    /// bytecheck refused the archive: out-of-bounds pointer, bad tag, bad UTF-8, wrong
    /// length, or not an archived message at all.
    #[error("message failed validation")]
    Invalid(#[source] rancor::Error),
    /// rkyv could not serialize or deserialize the value.
    #[error("message could not be serialized or deserialized")]
    Codec(#[source] rancor::Error),
    /// A count or a string length is over its limit.
    #[error("{limit} exceeded: {value} > {max}")]
    OverLimit {
        /// Which limit.
        limit: Limit,
        /// The count or length found.
        value: usize,
        /// The limit's value.
        max: usize,
    },
    /// A workload index points past the batch's dictionary.
    #[error("workload index {index} outside a dictionary of {entries} entries")]
    BadIndex {
        /// The index found.
        index: u32,
        /// Entries in the dictionary.
        entries: usize,
    },
    /// A time window ends before it starts.
    #[error("time window ends at {end_ms} ms before it starts at {start_ms} ms")]
    InvertedWindow {
        /// Its start, Unix ms.
        start_ms: u64,
        /// Its end, Unix ms.
        end_ms: u64,
    },
    /// An IP's snapshot segments are out of order or overlap.
    #[error("segments of {ip} are unsorted or overlap at {start_ms} ms")]
    UnsortedSegments {
        /// The IP.
        ip: std::net::IpAddr,
        /// The start of the first segment out of place, Unix ms.
        start_ms: u64,
    },
    /// A prefix length longer than its address family allows.
    #[error("prefix {addr}/{len} is longer than the address")]
    BadPrefix {
        /// The address.
        addr: std::net::IpAddr,
        /// The length found.
        len: u8,
    },
}

/// Encodes `message` into a new buffer, under the default [`WireLimits`].
///
/// # Errors
/// [`WireError::OverLimit`], [`WireError::BadIndex`], [`WireError::InvertedWindow`],
/// [`WireError::UnsortedSegments`], [`WireError::BadPrefix`] for a message its receiver
/// would refuse, or [`WireError::Codec`].
pub fn encode(message: &Message) -> Result<AlignedVec, WireError> {
    let mut buffer = AlignedVec::new();
    encode_into(message, &WireLimits::default(), &mut buffer)?;
    Ok(buffer)
}

/// Encodes `message` into `buffer` (cleared first, its allocation reused), after checking
/// it against `limits`.
///
/// # Errors
/// As [`encode`]; `buffer` is left empty.
pub fn encode_into(
    message: &Message,
    limits: &WireLimits,
    buffer: &mut AlignedVec,
) -> Result<(), WireError> {
    let mut writer = std::mem::take(buffer);
    writer.clear();
    let written = rkyv::api::high::to_bytes_in::<_, rancor::Error>(message, writer)
        .map_err(WireError::Codec)?;
    // The receiver's checks, run on what was written: one set of rules for both sides.
    decode(&written, limits)?;
    *buffer = written;
    Ok(())
}

/// Validates `bytes` as a message under `limits` and returns it to read in place.
///
/// # Errors
/// [`WireError::Misaligned`] (see the module docs), [`WireError::Invalid`] from bytecheck,
/// or any of the semantic errors [`encode`] lists. Never panics, whatever the input.
pub fn decode<'a>(bytes: &'a [u8], limits: &WireLimits) -> Result<&'a ArchivedMessage, WireError> {
    let offset_bytes = (bytes.as_ptr() as usize) % MESSAGE_ALIGN_BYTES;
    if offset_bytes != 0 {
        return Err(WireError::Misaligned { offset_bytes });
    }
    let message =
        rkyv::access::<ArchivedMessage, rancor::Error>(bytes).map_err(WireError::Invalid)?;
    check::archived(message, limits)?;
    Ok(message)
}

/// Copies a validated message out into an owned value (tests, and handlers that keep a
/// message beyond the receive buffer's life).
///
/// # Errors
/// [`WireError::Codec`], which a message from [`decode`] does not produce.
pub fn to_owned(message: &ArchivedMessage) -> Result<Message, WireError> {
    rkyv::deserialize::<Message, rancor::Error>(message).map_err(WireError::Codec)
}
