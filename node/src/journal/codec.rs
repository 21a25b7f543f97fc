//! The journal's record format: a fixed header, then a checksummed payload.
//!
//! ```text
//! segment  = magic "TNRJ" (4 bytes) · version u32 LE · record*
//! record   = len u32 LE · crc32 u32 LE · kind u8 · payload[len]
//!            crc32 (IEEE, crc32fast) covers kind and payload
//! append   = kind 1 · id u64 · count u32 · flow*
//! release  = kind 2 · count u32 · id u64*
//! flow     = flow_id u128 · local ip · local_port u16 · remote ip · remote_port u16
//!            · local · start_ms u64 · end_ms u64 · bytes_sent u64
//!            · bytes_received u64 · segs_in u64 · segs_out u64 · retransmits u64
//!            · rtt_us u32 · direction u8 · ongoing u8 · exporter_id u64
//!            · exporter_region str · hops u8
//! local    = 0 · workload str | 1 · reason u8 (0 changed, 1 unknown, 2 expired)
//! flow v2  = as above with the local workload as a plain str (no tag: every local end
//!            stamped)
//! flow v1  = as v2 up to bytes_received · packets u64 · retransmits u64 · direction u8
//!            · … (version 1 segments, still read: their flows replay with zero segment
//!            counts and no RTT, since a packet total cannot be split)
//! ip       = 4 · 4 bytes | 6 · 16 bytes;   str = len u16 LE · UTF-8
//! ```
//!
//! Every integer is little-endian. The length is checked against
//! [`RECORD_PAYLOAD_BYTES_MAX`] before anything is read, and the checksum before the
//! payload is decoded, so a torn or corrupt tail is detected rather than misread.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use tenure_gossip::wire::{Direction, LocalReason};

use crate::core::{FlowRecord, Local};

/// The first bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 4] = *b"TNRJ";
/// The format version after the magic, the one written.
pub const SEGMENT_VERSION: u32 = 3;
/// The oldest version still read.
pub const SEGMENT_VERSION_MIN: u32 = 1;
/// Magic plus version.
pub const SEGMENT_HEADER_BYTES: usize = 8;
/// Length, checksum and kind.
pub const RECORD_HEADER_BYTES: usize = 9;
/// The largest payload a record may have: a full batch of 16,384 flows is about 3 MiB.
pub const RECORD_PAYLOAD_BYTES_MAX: usize = 32 * 1024 * 1024;

const KIND_APPEND: u8 = 1;
const KIND_RELEASE: u8 = 2;

/// A decoded record.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Record {
    Append { id: u64, flows: Vec<FlowRecord> },
    Release { ids: Vec<u64> },
}

/// Why bytes could not be read as a record. Nothing is changed by a failed read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the header or the payload claims: a write cut short by a crash.
    #[error("torn record: {needed} bytes needed, {available} available")]
    Torn { needed: usize, available: usize },
    #[error("record payload of {len} bytes is over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("checksum mismatch")]
    Checksum,
    #[error("malformed payload: {0}")]
    Malformed(&'static str),
}

/// Encodes `record` (header included) onto `out`.
pub fn encode(record: &Record, out: &mut Vec<u8>) {
    match record {
        Record::Append { id, flows } => encode_append(*id, flows.iter(), out),
        Record::Release { ids } => {
            let start = out.len();
            out.extend_from_slice(&[0u8; RECORD_HEADER_BYTES]);
            out[start + 8] = KIND_RELEASE;
            put_u32(out, ids.len());
            for id in ids {
                out.extend_from_slice(&id.to_le_bytes());
            }
            seal_record(start, out);
        }
    }
}

/// Encodes `Record::Append { id, flows }` onto `out` without building the record: every
/// accepted flow is journaled, and copying a batch only to encode it was a visible share
/// of a collector's CPU under `tenure loadgen`.
pub fn encode_append<'a>(
    id: u64,
    flows: impl ExactSizeIterator<Item = &'a FlowRecord>,
    out: &mut Vec<u8>,
) {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER_BYTES]);
    out[start + 8] = KIND_APPEND;
    out.extend_from_slice(&id.to_le_bytes());
    put_u32(out, flows.len());
    for flow in flows {
        encode_flow(flow, out);
    }
    seal_record(start, out);
}

/// About the bytes [`encode_append`] writes for `count` flows like `first`, to size its
/// buffer once.
pub fn append_bytes_hint(count: usize, first: Option<&FlowRecord>) -> usize {
    // A flow takes 96 bytes besides its IPs (5 bytes each for v4) and its two names;
    // the first flow's names stand for the others', with some room for longer ones.
    const FIXED: usize = 96 + 2 * 5 + 16;
    let names = first.map_or(0, |f| {
        f.local_workload().map_or(0, |w| w.len()) + f.exporter_region.len()
    });
    RECORD_HEADER_BYTES + 12 + count * (FIXED + names)
}

/// Decodes one append record as [`encode_append`] wrote it: its id and flows.
pub fn decode_append(bytes: &[u8]) -> Result<(u64, Vec<FlowRecord>), DecodeError> {
    match decode(bytes)? {
        (Record::Append { id, flows }, _) => Ok((id, flows)),
        (Record::Release { .. }, _) => Err(DecodeError::Malformed("a release, not an append")),
    }
}

/// Writes the header (payload length, checksum) of the record that starts at `start`.
fn seal_record(start: usize, out: &mut [u8]) {
    let len = out.len() - start - RECORD_HEADER_BYTES;
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start..start + 4].copy_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    debug_assert!(len <= RECORD_PAYLOAD_BYTES_MAX, "a record fits the limit");
}

/// Decodes the record at the start of `bytes`: the record and the bytes it took.
pub fn decode(bytes: &[u8]) -> Result<(Record, usize), DecodeError> {
    decode_version(bytes, SEGMENT_VERSION)
}

/// [`decode`] for a record of a segment of `version` (from [`SEGMENT_VERSION_MIN`] to
/// [`SEGMENT_VERSION`]).
pub fn decode_version(bytes: &[u8], version: u32) -> Result<(Record, usize), DecodeError> {
    if bytes.len() < RECORD_HEADER_BYTES {
        return Err(DecodeError::Torn {
            needed: RECORD_HEADER_BYTES,
            available: bytes.len(),
        });
    }
    let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    if len > RECORD_PAYLOAD_BYTES_MAX {
        return Err(DecodeError::TooLarge {
            len,
            max: RECORD_PAYLOAD_BYTES_MAX,
        });
    }
    let total = RECORD_HEADER_BYTES + len;
    if bytes.len() < total {
        return Err(DecodeError::Torn {
            needed: total,
            available: bytes.len(),
        });
    }
    let crc = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if crc32fast::hash(&bytes[8..total]) != crc {
        return Err(DecodeError::Checksum);
    }
    let mut r = Reader {
        bytes: &bytes[RECORD_HEADER_BYTES..total],
    };
    let record = match bytes[8] {
        KIND_APPEND => {
            let id = r.u64()?;
            let count = r.u32()? as usize;
            // Each flow takes well over 16 bytes: a count beyond that is corrupt.
            if count > r.bytes.len() / 16 {
                return Err(DecodeError::Malformed("flow count exceeds the payload"));
            }
            let mut flows = Vec::with_capacity(count);
            for _ in 0..count {
                flows.push(decode_flow(&mut r, version)?);
            }
            Record::Append { id, flows }
        }
        KIND_RELEASE => {
            let count = r.u32()? as usize;
            if count > r.bytes.len() / 8 {
                return Err(DecodeError::Malformed("id count exceeds the payload"));
            }
            let mut ids = Vec::with_capacity(count);
            for _ in 0..count {
                ids.push(r.u64()?);
            }
            Record::Release { ids }
        }
        _ => return Err(DecodeError::Malformed("unknown record kind")),
    };
    if !r.bytes.is_empty() {
        return Err(DecodeError::Malformed("trailing bytes in a record"));
    }
    Ok((record, total))
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
}

fn put_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            out.push(4);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(6);
            out.extend_from_slice(&v6.octets());
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Workload and region names are far below 64 KiB (the wire limits them); cut if not.
    let bytes = s.as_bytes();
    let len = bytes.len().min(usize::from(u16::MAX));
    out.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_le_bytes());
    out.extend_from_slice(&bytes[..len]);
}

fn encode_flow(f: &FlowRecord, out: &mut Vec<u8>) {
    out.extend_from_slice(&f.flow_id.to_le_bytes());
    put_ip(out, f.local_ip);
    out.extend_from_slice(&f.local_port.to_le_bytes());
    put_ip(out, f.remote_ip);
    out.extend_from_slice(&f.remote_port.to_le_bytes());
    match &f.local {
        Local::Workload(w) => {
            out.push(0);
            put_str(out, w);
        }
        Local::Unattributed(reason) => {
            out.push(1);
            out.push(match reason {
                LocalReason::Changed => 0,
                LocalReason::Unknown => 1,
                LocalReason::Expired => 2,
            });
        }
    }
    for v in [
        f.start_ms,
        f.end_ms,
        f.bytes_sent,
        f.bytes_received,
        f.segs_in,
        f.segs_out,
        f.retransmits,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&f.rtt_us.to_le_bytes());
    out.push(match f.direction {
        Direction::Outbound => 0,
        Direction::Inbound => 1,
    });
    out.push(u8::from(f.ongoing));
    out.extend_from_slice(&f.exporter_id.to_le_bytes());
    put_str(out, &f.exporter_region);
    out.push(f.hops);
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError::Malformed("payload ends early"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn u128(&mut self) -> Result<u128, DecodeError> {
        Ok(u128::from_le_bytes(self.array()?))
    }

    fn ip(&mut self) -> Result<IpAddr, DecodeError> {
        match self.u8()? {
            4 => Ok(IpAddr::V4(Ipv4Addr::from(self.array::<4>()?))),
            6 => Ok(IpAddr::V6(Ipv6Addr::from(self.array::<16>()?))),
            _ => Err(DecodeError::Malformed("bad IP tag")),
        }
    }

    fn str(&mut self) -> Result<Arc<str>, DecodeError> {
        let len = usize::from(self.u16()?);
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(Arc::from)
            .map_err(|_| DecodeError::Malformed("name is not UTF-8"))
    }
}

fn decode_local(r: &mut Reader<'_>) -> Result<Local, DecodeError> {
    Ok(match r.u8()? {
        0 => Local::Workload(r.str()?),
        1 => Local::Unattributed(match r.u8()? {
            0 => LocalReason::Changed,
            1 => LocalReason::Unknown,
            2 => LocalReason::Expired,
            _ => return Err(DecodeError::Malformed("bad local reason")),
        }),
        _ => return Err(DecodeError::Malformed("bad local tag")),
    })
}

fn decode_flow(r: &mut Reader<'_>, version: u32) -> Result<FlowRecord, DecodeError> {
    let flow_id = r.u128()?;
    let local_ip = r.ip()?;
    let local_port = r.u16()?;
    let remote_ip = r.ip()?;
    let remote_port = r.u16()?;
    let local = if version <= 2 {
        Local::Workload(r.str()?)
    } else {
        decode_local(r)?
    };
    let start_ms = r.u64()?;
    let end_ms = r.u64()?;
    let bytes_sent = r.u64()?;
    let bytes_received = r.u64()?;
    let (segs_in, segs_out, retransmits, rtt_us) = if version == 1 {
        let _packets = r.u64()?;
        (0, 0, r.u64()?, 0)
    } else {
        (r.u64()?, r.u64()?, r.u64()?, r.u32()?)
    };
    let direction = match r.u8()? {
        0 => Direction::Outbound,
        1 => Direction::Inbound,
        _ => return Err(DecodeError::Malformed("bad direction")),
    };
    let ongoing = match r.u8()? {
        0 => false,
        1 => true,
        _ => return Err(DecodeError::Malformed("bad ongoing flag")),
    };
    let exporter_id = r.u64()?;
    let exporter_region = r.str()?;
    let hops = r.u8()?;
    Ok(FlowRecord {
        flow_id,
        local_ip,
        local_port,
        remote_ip,
        remote_port,
        local,
        start_ms,
        end_ms,
        bytes_sent,
        bytes_received,
        segs_in,
        segs_out,
        retransmits,
        rtt_us,
        direction,
        ongoing,
        exporter_id,
        exporter_region,
        hops,
    })
}
