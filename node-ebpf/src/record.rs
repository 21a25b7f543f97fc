//! The wire format between the kernel program and userspace, decoded without `unsafe`.
//!
//! [`RawRecord`] mirrors `struct flow_record` in `bpf/flows.h` field for field (the
//! `#[repr(C)]` layout and the offsets are asserted at compile time); records are decoded
//! from bytes with explicit little-endian reads rather than by casting, so a short or
//! garbled record is a [`DecodeError`], never undefined behaviour or a panic.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::clock::ClockOffset;
use crate::flow::{CapturedFlow, Direction};

/// `FLOW_RECORD_VERSION` in `bpf/flows.h`.
pub const RECORD_VERSION: u8 = 2;

const DIRECTION_UNKNOWN: u8 = 0;
const DIRECTION_OUTBOUND: u8 = 1;
const DIRECTION_INBOUND: u8 = 2;

/// The socket was still open (iter/tcp snapshot).
pub const FLAG_ONGOING: u8 = 1;
/// Capture saw the socket after its birth; `start_ns` is a late bound.
pub const FLAG_START_LATE: u8 = 2;
const FLAGS_KNOWN: u8 = FLAG_ONGOING | FLAG_START_LATE;

/// `struct flow_record` from `bpf/flows.h`, byte for byte. Addresses are IPv6 layout with
/// IPv4 mapped; ports are host byte order; times are `CLOCK_MONOTONIC` nanoseconds.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RawRecord {
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub start_ns: u64,
    pub end_ns: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub segs_in: u32,
    pub segs_out: u32,
    pub retransmits: u32,
    pub srtt_us: u32,
    pub workload_id: u32,
    pub local_port: u16,
    pub remote_port: u16,
    pub version: u8,
    pub direction: u8,
    pub flags: u8,
    pub pad0: u8,
    pub pad1: u32,
}

/// Size of one record in the ring buffer and in the snapshot stream.
pub const RECORD_LEN: usize = 96;

const _: () = {
    assert!(std::mem::size_of::<RawRecord>() == RECORD_LEN);
    assert!(std::mem::offset_of!(RawRecord, start_ns) == 32);
    assert!(std::mem::offset_of!(RawRecord, bytes_sent) == 48);
    assert!(std::mem::offset_of!(RawRecord, segs_in) == 64);
    assert!(std::mem::offset_of!(RawRecord, workload_id) == 80);
    assert!(std::mem::offset_of!(RawRecord, local_port) == 84);
    assert!(std::mem::offset_of!(RawRecord, version) == 88);
    assert!(std::mem::offset_of!(RawRecord, flags) == 90);
    assert!(std::mem::offset_of!(RawRecord, pad1) == 92);
};

/// Why a record was rejected. The record is skipped and counted; nothing else changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The ring-buffer item or snapshot chunk is not exactly one record long.
    #[error("record is {len} bytes, expected {RECORD_LEN}")]
    Length { len: usize },
    /// The program and the loader disagree on the layout (a stale object).
    #[error("record version {found}, expected {RECORD_VERSION}; rebuild bpf/flows.bpf.o")]
    Version { found: u8 },
    /// A direction code the loader does not know.
    #[error("unknown direction code {found}")]
    Direction { found: u8 },
    /// Flag bits the loader does not know.
    #[error("unknown flag bits {found:#04x}")]
    Flags { found: u8 },
    /// The program ends after it starts; anything else is a corrupt record.
    #[error("flow ends ({end_ns} ns) before it starts ({start_ns} ns)")]
    TimeOrder { start_ns: u64, end_ns: u64 },
}

/// A cursor over one record's bytes; every read is in bounds because the length was
/// checked first, and the fallbacks only keep the code free of panics.
struct Fields<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        if let Some(src) = self.bytes.get(self.at..self.at + N) {
            out.copy_from_slice(src);
        }
        self.at += N;
        out
    }
    fn u8(&mut self) -> u8 {
        let [b] = self.take::<1>();
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

impl RawRecord {
    /// Reads one record from exactly [`RECORD_LEN`] bytes (the BPF target and every host
    /// this runs on are little-endian).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() != RECORD_LEN {
            return Err(DecodeError::Length { len: bytes.len() });
        }
        let mut f = Fields { bytes, at: 0 };
        let record = Self {
            local_addr: f.take(),
            remote_addr: f.take(),
            start_ns: f.u64(),
            end_ns: f.u64(),
            bytes_sent: f.u64(),
            bytes_received: f.u64(),
            segs_in: f.u32(),
            segs_out: f.u32(),
            retransmits: f.u32(),
            srtt_us: f.u32(),
            workload_id: f.u32(),
            local_port: f.u16(),
            remote_port: f.u16(),
            version: f.u8(),
            direction: f.u8(),
            flags: f.u8(),
            pad0: f.u8(),
            pad1: f.u32(),
        };
        debug_assert_eq!(
            f.at, RECORD_LEN,
            "decoder read a different length than the layout"
        );
        Ok(record)
    }

    /// The record's bytes as the kernel writes them; the inverse of [`Self::from_bytes`].
    pub fn to_bytes(&self) -> [u8; RECORD_LEN] {
        let mut out = Vec::with_capacity(RECORD_LEN);
        out.extend_from_slice(&self.local_addr);
        out.extend_from_slice(&self.remote_addr);
        for v in [
            self.start_ns,
            self.end_ns,
            self.bytes_sent,
            self.bytes_received,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in [
            self.segs_in,
            self.segs_out,
            self.retransmits,
            self.srtt_us,
            self.workload_id,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.local_port.to_le_bytes());
        out.extend_from_slice(&self.remote_port.to_le_bytes());
        out.extend_from_slice(&[self.version, self.direction, self.flags, self.pad0]);
        out.extend_from_slice(&self.pad1.to_le_bytes());
        let mut fixed = [0u8; RECORD_LEN];
        fixed.copy_from_slice(&out);
        fixed
    }

    /// Checks the record and converts it into a [`CapturedFlow`].
    pub fn into_flow(self, clock: ClockOffset) -> Result<CapturedFlow, DecodeError> {
        if self.version != RECORD_VERSION {
            return Err(DecodeError::Version {
                found: self.version,
            });
        }
        let direction = match self.direction {
            DIRECTION_OUTBOUND => Direction::Outbound,
            DIRECTION_INBOUND => Direction::Inbound,
            DIRECTION_UNKNOWN => Direction::Unknown,
            found => return Err(DecodeError::Direction { found }),
        };
        if self.flags & !FLAGS_KNOWN != 0 {
            return Err(DecodeError::Flags { found: self.flags });
        }
        if self.end_ns < self.start_ns {
            return Err(DecodeError::TimeOrder {
                start_ns: self.start_ns,
                end_ns: self.end_ns,
            });
        }
        Ok(CapturedFlow {
            local: SocketAddr::new(canonical_ip(self.local_addr), self.local_port),
            remote: SocketAddr::new(canonical_ip(self.remote_addr), self.remote_port),
            direction,
            start_unix_ms: clock.to_unix_ms(self.start_ns),
            end_unix_ms: clock.to_unix_ms(self.end_ns),
            bytes_sent: self.bytes_sent,
            bytes_received: self.bytes_received,
            segs_in: self.segs_in,
            segs_out: self.segs_out,
            retransmits: self.retransmits,
            srtt_us: self.srtt_us,
            workload_id: self.workload_id,
            ongoing: self.flags & FLAG_ONGOING != 0,
            start_exact: self.flags & FLAG_START_LATE == 0,
            frame_ms: clock.frame_ms(),
        })
    }
}

/// Decodes one record and converts it.
pub fn decode(bytes: &[u8], clock: ClockOffset) -> Result<CapturedFlow, DecodeError> {
    RawRecord::from_bytes(bytes)?.into_flow(clock)
}

/// Decodes a snapshot stream: back-to-back records. Returns the flows and the number of
/// records (or trailing bytes) that were rejected.
pub fn decode_stream(bytes: &[u8], clock: ClockOffset) -> (Vec<CapturedFlow>, u64) {
    let mut flows = Vec::with_capacity(bytes.len() / RECORD_LEN);
    let mut rejected = 0u64;
    let mut chunks = bytes.chunks_exact(RECORD_LEN);
    for chunk in &mut chunks {
        match decode(chunk, clock) {
            Ok(flow) => flows.push(flow),
            Err(_) => rejected += 1,
        }
    }
    if !chunks.remainder().is_empty() {
        rejected += 1;
    }
    (flows, rejected)
}

/// The address as the exporter wants it: IPv4 and IPv4-mapped IPv6 both become IPv4.
pub fn canonical_ip(octets: [u8; 16]) -> IpAddr {
    Ipv6Addr::from(octets).to_canonical()
}

/// The key the workload maps use for an address: IPv6 layout, IPv4 mapped.
pub fn ip_key(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The key of the `workload_by_endpoint` map: `struct endpoint_key` in `bpf/flows.h`
/// (address, port in host byte order, two zero bytes of padding).
pub fn endpoint_key(addr: SocketAddr) -> [u8; 20] {
    let mut key = [0u8; 20];
    key[..16].copy_from_slice(&ip_key(addr.ip()));
    key[16..18].copy_from_slice(&addr.port().to_le_bytes());
    key
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4, SocketAddrV6};

    use super::*;

    const CLOCK: ClockOffset = ClockOffset::from_ns(1_000_000_000_000);

    fn sample() -> RawRecord {
        RawRecord {
            local_addr: ip_key(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))),
            remote_addr: ip_key(IpAddr::V4(Ipv4Addr::new(10, 9, 8, 7))),
            start_ns: 2_000_000,
            end_ns: 5_000_000,
            bytes_sent: 1234,
            bytes_received: 5678,
            segs_in: 7,
            segs_out: 9,
            retransmits: 1,
            srtt_us: 42,
            workload_id: 77,
            local_port: 40000,
            remote_port: 443,
            version: RECORD_VERSION,
            direction: DIRECTION_OUTBOUND,
            flags: 0,
            pad0: 0,
            pad1: 0,
        }
    }

    #[test]
    fn decodes_bytes_laid_out_like_the_c_struct() {
        // Hand-built at the C offsets, independently of to_bytes.
        let mut bytes = [0u8; RECORD_LEN];
        bytes[10] = 0xff;
        bytes[11] = 0xff;
        bytes[12..16].copy_from_slice(&[127, 0, 0, 1]);
        bytes[16..32].copy_from_slice(&Ipv6Addr::LOCALHOST.octets());
        bytes[32..40].copy_from_slice(&10u64.to_le_bytes());
        bytes[40..48].copy_from_slice(&20u64.to_le_bytes());
        bytes[48..56].copy_from_slice(&300u64.to_le_bytes());
        bytes[56..64].copy_from_slice(&400u64.to_le_bytes());
        bytes[64..68].copy_from_slice(&5u32.to_le_bytes());
        bytes[68..72].copy_from_slice(&6u32.to_le_bytes());
        bytes[72..76].copy_from_slice(&7u32.to_le_bytes());
        bytes[76..80].copy_from_slice(&8u32.to_le_bytes());
        bytes[80..84].copy_from_slice(&9u32.to_le_bytes());
        bytes[84..86].copy_from_slice(&1111u16.to_le_bytes());
        bytes[86..88].copy_from_slice(&2222u16.to_le_bytes());
        bytes[88] = RECORD_VERSION;
        bytes[89] = DIRECTION_INBOUND;
        bytes[90] = FLAG_ONGOING;
        let raw = RawRecord::from_bytes(&bytes).expect("valid record");
        assert_eq!(raw.to_bytes(), bytes);
        let flow = raw
            .into_flow(ClockOffset::from_ns(0))
            .expect("valid record");
        assert_eq!(flow.local, "127.0.0.1:1111".parse().expect("addr"));
        assert_eq!(flow.remote, "[::1]:2222".parse().expect("addr"));
        assert_eq!(flow.direction, Direction::Inbound);
        assert_eq!((flow.bytes_sent, flow.bytes_received), (300, 400));
        assert_eq!(
            (flow.segs_in, flow.segs_out, flow.retransmits, flow.srtt_us),
            (5, 6, 7, 8)
        );
        assert_eq!(flow.workload_id, 9);
        assert!(flow.ongoing);
        assert!(flow.start_exact);
    }

    #[test]
    fn round_trips_and_converts_time() {
        let raw = sample();
        assert_eq!(RawRecord::from_bytes(&raw.to_bytes()), Ok(raw));
        let flow = decode(&raw.to_bytes(), CLOCK).expect("valid record");
        assert_eq!(
            flow.local,
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 1, 2, 3), 40000))
        );
        assert_eq!(flow.start_unix_ms, 1_000_002);
        assert_eq!(flow.end_unix_ms, 1_000_005);
        assert_eq!(flow.direction, Direction::Outbound);
        assert!(!flow.ongoing);
    }

    #[test]
    fn keeps_real_ipv6() {
        let mut raw = sample();
        let v6: Ipv6Addr = "2001:db8::5".parse().expect("addr");
        raw.local_addr = v6.octets();
        let flow = decode(&raw.to_bytes(), CLOCK).expect("valid record");
        assert_eq!(
            flow.local,
            SocketAddr::V6(SocketAddrV6::new(v6, 40000, 0, 0))
        );
    }

    #[test]
    fn start_late_flag_clears_start_exact() {
        let mut raw = sample();
        raw.flags = FLAG_START_LATE;
        raw.direction = DIRECTION_UNKNOWN;
        let flow = decode(&raw.to_bytes(), CLOCK).expect("valid record");
        assert!(!flow.start_exact);
        assert_eq!(flow.direction, Direction::Unknown);
    }

    #[test]
    fn rejects_malformed_records() {
        let good = sample().to_bytes();
        assert_eq!(
            decode(&good[..95], CLOCK),
            Err(DecodeError::Length { len: 95 })
        );
        assert_eq!(decode(&[], CLOCK), Err(DecodeError::Length { len: 0 }));
        let mut raw = sample();
        raw.version = 9;
        assert_eq!(
            decode(&raw.to_bytes(), CLOCK),
            Err(DecodeError::Version { found: 9 })
        );
        let mut raw = sample();
        raw.direction = 3;
        assert_eq!(
            decode(&raw.to_bytes(), CLOCK),
            Err(DecodeError::Direction { found: 3 })
        );
        let mut raw = sample();
        raw.flags = 0x80;
        assert_eq!(
            decode(&raw.to_bytes(), CLOCK),
            Err(DecodeError::Flags { found: 0x80 })
        );
        let mut raw = sample();
        raw.start_ns = raw.end_ns + 1;
        assert!(matches!(
            decode(&raw.to_bytes(), CLOCK),
            Err(DecodeError::TimeOrder { .. })
        ));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: every length up to two records, every byte value.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..=2 * RECORD_LEN {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state.to_le_bytes()[0]
                })
                .collect();
            let _ = decode(&bytes, CLOCK);
            let (flows, rejected) = decode_stream(&bytes, CLOCK);
            assert!(flows.len() as u64 + rejected >= (len / RECORD_LEN) as u64);
        }
    }

    #[test]
    fn stream_skips_bad_records_and_counts_them() {
        let mut bad = sample();
        bad.version = 0;
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&sample().to_bytes());
        bytes.extend_from_slice(&bad.to_bytes());
        bytes.extend_from_slice(&sample().to_bytes());
        bytes.extend_from_slice(&[1, 2, 3]);
        let (flows, rejected) = decode_stream(&bytes, CLOCK);
        assert_eq!(flows.len(), 2);
        assert_eq!(rejected, 2);
    }

    #[test]
    fn workload_keys_match_the_c_layout() {
        let v4 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        assert_eq!(ip_key(v4), ip_key(mapped));
        assert_eq!(
            ip_key(v4),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 1]
        );
        let key = endpoint_key(SocketAddr::new(v4, 0x1234));
        assert_eq!(&key[16..], &[0x34, 0x12, 0, 0]);
    }
}
