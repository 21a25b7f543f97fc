//! The one module that talks to the kernel: loading the object, attaching, reading the
//! ring buffer and the iterator, and writing the workload maps. Everything it reads is
//! handed to the pure code in `record`, `workload` and `clock`.

use std::fmt;
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::time::Duration;

use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{BtfTracePoint, Iter, ProgramError};
use aya::{Btf, Ebpf, EbpfLoader};
use tokio::io::unix::AsyncFd;

use crate::clock::ClockOffset;
use crate::error::CaptureError;
use crate::flow::CapturedFlow;
use crate::privilege::check_privileges;
use crate::record::{self, endpoint_key, ip_key, RECORD_LEN};
use crate::workload;

/// The compiled program, rebuilt byte for byte by `bpf/build.sh` (CI checks it is
/// current), so that building the crate needs no clang.
static OBJECT: &[u8] = aya::include_bytes_aligned!("../bpf/flows.bpf.o");

const TRACEPOINT: &str = "inet_sock_set_state";
const ITER: &str = "snapshot_tcp";
const MAP_EVENTS: &str = "events";
const MAP_BY_IP: &str = "workload_by_ip";
const MAP_BY_ENDPOINT: &str = "workload_by_endpoint";
const MAP_STATS: &str = "stats";
const MAP_USED: &str = "workload_maps_used";
/// Indexes of `workload_maps_used` (`USED_*` in `bpf/flows.h`).
const USED_BY_IP: u32 = 0;
const USED_BY_ENDPOINT: u32 = 1;
const MAP_BIRTHS: &str = "births";
const GLOBAL_BIRTH_BUCKET_BITS: &str = "birth_bucket_bits";

/// Slots per bucket of the `births` table (`BIRTH_WAYS` in the C).
const BIRTH_WAYS: u32 = 4;
/// Bounds of [`CaptureOptions::births_max`]: two buckets at least (the program hashes
/// into 2^n buckets with n ≥ 1), 2^20 at most (24 MiB of table).
pub const BIRTHS_MIN: u32 = 2 * BIRTH_WAYS;
/// See [`BIRTHS_MIN`].
pub const BIRTHS_MAX: u32 = 1 << 20;

/// Capacity of `workload_by_ip` and `workload_by_endpoint` (`max_entries` in the C).
pub const WORKLOAD_ENTRIES_MAX: usize = 16384;

/// Indexes of the per-CPU `stats` array (`STAT_*` in `bpf/flows.h`).
const STAT_RINGBUF_FULL: u32 = 0;
const STAT_UNTRACKED_CLOSE: u32 = 1;
const STAT_BIRTH_INSERT_FAILED: u32 = 2;

/// How a [`Capture`] is loaded and bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureOptions {
    /// Most flows one [`Capture::next_batch`] returns; the rest wait in the ring buffer
    /// for the next call. Default 4096.
    pub batch_flows_max: NonZeroUsize,
    /// Most flows one [`Capture::snapshot`] reads; the rest of the stream is dropped and
    /// counted in [`CaptureStats::snapshots_truncated`]. Default 65536.
    pub snapshot_flows_max: NonZeroUsize,
    /// Longest a closed flow waits in the ring buffer before [`Capture::next_batch`]
    /// reads it, in milliseconds. The kernel does not wake the reader for each record
    /// (that would cost a context switch per closed socket), so a timer does. Default 100.
    pub drain_interval_ms: NonZeroU64,
    /// Run one snapshot during load so that sockets opened before capture started are
    /// adopted and reported in full when they close. Default true.
    pub adopt_existing: bool,
    /// Sockets whose birth the kernel table keeps until they close: a power of two from
    /// [`BIRTHS_MIN`] to [`BIRTHS_MAX`], 24 bytes each. The table is set-associative
    /// (buckets of 4); a birth that finds its bucket full evicts the oldest there, and an
    /// evicted socket is reported at close with `start_exact == false`, so this bounds
    /// memory, never correctness. A bucket can fill before the table does: with `n`
    /// sockets open at once, about P(Poisson(4n / births_max) ≥ 4) of births evict a
    /// live one (with the default, ~1.4% at 30 000 open sockets). Default 131072 (3 MiB).
    pub births_max: NonZeroU32,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        Self {
            batch_flows_max: NonZeroUsize::new(4096).unwrap_or(NonZeroUsize::MIN),
            snapshot_flows_max: NonZeroUsize::new(65536).unwrap_or(NonZeroUsize::MIN),
            drain_interval_ms: NonZeroU64::new(100).unwrap_or(NonZeroU64::MIN),
            adopt_existing: true,
            births_max: NonZeroU32::new(131072).unwrap_or(NonZeroU32::MIN),
        }
    }
}

/// Counters of everything the capture lost or skipped, so that nothing goes silently.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CaptureStats {
    /// Closed flows lost in the kernel because the ring buffer was full (userspace read
    /// too slowly).
    pub ringbuf_full: u64,
    /// Sockets that closed without capture having seen them open; they were still
    /// reported, with `start_exact == false`.
    pub untracked_closes: u64,
    /// Births the kernel did not record because another CPU held their table slot at
    /// that instant (rare); those sockets are reported at close with
    /// `start_exact == false`.
    pub birth_insert_failed: u64,
    /// Ring-buffer or snapshot records that failed to decode and were skipped.
    pub malformed_records: u64,
    /// Snapshots cut short at [`CaptureOptions::snapshot_flows_max`].
    pub snapshots_truncated: u64,
}

/// A loaded and attached flow capture. Dropping it detaches the programs and frees the
/// maps.
pub struct Capture {
    ebpf: Ebpf,
    events: AsyncFd<RingBuf<MapData>>,
    by_ip: HashMap<MapData, [u8; 16], u32>,
    by_endpoint: HashMap<MapData, [u8; 20], u32>,
    maps_used: Array<MapData, u32>,
    stats: PerCpuArray<MapData, u64>,
    options: CaptureOptions,
    malformed_records: u64,
    snapshots_truncated: u64,
}

impl fmt::Debug for Capture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Capture")
            .field("options", &self.options)
            .field("malformed_records", &self.malformed_records)
            .field("snapshots_truncated", &self.snapshots_truncated)
            .finish_non_exhaustive()
    }
}

impl Capture {
    /// Checks privileges, loads the program with the kernel's BTF, attaches the
    /// tracepoint and prepares the snapshot iterator. Must run inside a tokio runtime
    /// with its IO and time drivers enabled (`enable_all`), which `next_batch` uses.
    pub fn load(options: CaptureOptions) -> Result<Self, CaptureError> {
        check_privileges()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(CaptureError::NoRuntime);
        }
        let buckets = birth_buckets(options.births_max)?;
        let bucket_bits = buckets.trailing_zeros();
        let btf = Btf::from_sys_fs().map_err(|source| CaptureError::NoBtf { source })?;

        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .override_global(GLOBAL_BIRTH_BUCKET_BITS, &bucket_bits, true)
            .map_max_entries(MAP_BIRTHS, buckets)
            .load(OBJECT)
            .map_err(|source| CaptureError::Object { source })?;

        let tracepoint: &mut BtfTracePoint = program(&mut ebpf, TRACEPOINT)?;
        tracepoint
            .load(TRACEPOINT, &btf)
            .map_err(|e| program_error(TRACEPOINT, e))?;
        tracepoint
            .attach()
            .map_err(|e| program_error(TRACEPOINT, e))?;

        let iter: &mut Iter = program(&mut ebpf, ITER)?;
        iter.load("tcp", &btf).map_err(|e| program_error(ITER, e))?;

        let events = RingBuf::try_from(take_map(&mut ebpf, MAP_EVENTS)?).map_err(|source| {
            CaptureError::Map {
                map: MAP_EVENTS,
                source,
            }
        })?;
        let events = register_ring(events).map_err(|source| CaptureError::Io {
            what: "registering the ring buffer with tokio",
            source,
        })?;
        let by_ip = HashMap::try_from(take_map(&mut ebpf, MAP_BY_IP)?).map_err(|source| {
            CaptureError::Map {
                map: MAP_BY_IP,
                source,
            }
        })?;
        let by_endpoint =
            HashMap::try_from(take_map(&mut ebpf, MAP_BY_ENDPOINT)?).map_err(|source| {
                CaptureError::Map {
                    map: MAP_BY_ENDPOINT,
                    source,
                }
            })?;
        let maps_used = Array::try_from(take_map(&mut ebpf, MAP_USED)?).map_err(|source| {
            CaptureError::Map {
                map: MAP_USED,
                source,
            }
        })?;
        let stats = PerCpuArray::try_from(take_map(&mut ebpf, MAP_STATS)?).map_err(|source| {
            CaptureError::Map {
                map: MAP_STATS,
                source,
            }
        })?;

        let adopt = options.adopt_existing;
        let mut capture = Self {
            ebpf,
            events,
            by_ip,
            by_endpoint,
            maps_used,
            stats,
            options,
            malformed_records: 0,
            snapshots_truncated: 0,
        };
        if adopt {
            capture.snapshot()?;
        }
        Ok(capture)
    }

    /// Waits until at least one closed flow is available and returns up to
    /// [`CaptureOptions::batch_flows_max`] of them, in the order the kernel closed them.
    /// A flow waits at most about [`CaptureOptions::drain_interval_ms`] before it is
    /// returned (the kernel wakes the reader early once many records are waiting).
    /// Cancel-safe: a flow is taken out of the ring buffer only once it is in the batch.
    pub async fn next_batch(&mut self) -> Result<Vec<CapturedFlow>, CaptureError> {
        let max = self.options.batch_flows_max.get();
        let interval = Duration::from_millis(self.options.drain_interval_ms.get());
        loop {
            let flows = match tokio::time::timeout(interval, self.events.readable_mut()).await {
                Ok(Ok(mut guard)) => {
                    let (flows, drained) =
                        drain(guard.get_inner_mut(), max, &mut self.malformed_records);
                    if drained {
                        // Only once empty: a full batch leaves the readiness set so the
                        // next call reads on without waiting for another wakeup.
                        guard.clear_ready();
                    }
                    flows
                }
                Ok(Err(source)) => {
                    return Err(CaptureError::Io {
                        what: "waiting on the ring buffer",
                        source,
                    })
                }
                // Records below the wakeup threshold: read them on the timer.
                Err(_elapsed) => drain(self.events.get_mut(), max, &mut self.malformed_records).0,
            };
            if !flows.is_empty() {
                return Ok(flows);
            }
        }
    }

    /// Reports every live TCP socket of this network namespace as an ongoing flow with
    /// cumulative counters (the iter/tcp program), adopting sockets capture had not seen.
    /// Listeners, request and time-wait sockets are not flows and are left out.
    pub fn snapshot(&mut self) -> Result<Vec<CapturedFlow>, CaptureError> {
        let iter: &mut Iter = program(&mut self.ebpf, ITER)?;
        let link_id = iter.attach().map_err(|e| program_error(ITER, e))?;
        let link = iter
            .take_link(link_id)
            .map_err(|e| program_error(ITER, e))?;
        let file = link.into_file().map_err(|e| CaptureError::Io {
            what: "opening the tcp iterator",
            source: io::Error::other(e),
        })?;
        let limit = self
            .options
            .snapshot_flows_max
            .get()
            .saturating_mul(RECORD_LEN);
        let mut bytes = Vec::new();
        file.take(u64::try_from(limit).unwrap_or(u64::MAX))
            .read_to_end(&mut bytes)
            .map_err(|source| CaptureError::Io {
                what: "reading the tcp iterator",
                source,
            })?;
        if bytes.len() >= limit {
            self.snapshots_truncated += 1;
        }
        let (flows, rejected) = record::decode_stream(&bytes, ClockOffset::measure());
        self.malformed_records += rejected;
        Ok(flows)
    }

    /// Replaces the local-IP → workload table. IPv4 and IPv4-mapped IPv6 are the same
    /// key; for duplicate IPs the last entry wins. Flows closing while this runs see
    /// either the old or the new id for an IP, never a missing one for a kept IP.
    pub fn set_workloads(&mut self, entries: &[(IpAddr, u32)]) -> Result<(), CaptureError> {
        let desired = entries.iter().map(|&(ip, id)| (ip_key(ip), id));
        let used = (&mut self.maps_used, USED_BY_IP);
        replace(&mut self.by_ip, MAP_BY_IP, used, desired)
    }

    /// Replaces the (local IP, local port) → workload table, which wins over
    /// [`Self::set_workloads`] for sockets bound to that port: for hosts where one IP is
    /// shared by workloads that own distinct ports.
    pub fn set_port_workloads(
        &mut self,
        entries: &[(SocketAddr, u32)],
    ) -> Result<(), CaptureError> {
        let desired = entries.iter().map(|&(addr, id)| (endpoint_key(addr), id));
        let used = (&mut self.maps_used, USED_BY_ENDPOINT);
        replace(&mut self.by_endpoint, MAP_BY_ENDPOINT, used, desired)
    }

    /// Counters of what was lost or skipped since load.
    pub fn stats(&self) -> Result<CaptureStats, CaptureError> {
        let sum = |index: u32| -> Result<u64, CaptureError> {
            let values = self
                .stats
                .get(&index, 0)
                .map_err(|source| CaptureError::Map {
                    map: MAP_STATS,
                    source,
                })?;
            Ok(values.iter().fold(0u64, |acc, v| acc.saturating_add(*v)))
        };
        Ok(CaptureStats {
            ringbuf_full: sum(STAT_RINGBUF_FULL)?,
            untracked_closes: sum(STAT_UNTRACKED_CLOSE)?,
            birth_insert_failed: sum(STAT_BIRTH_INSERT_FAILED)?,
            malformed_records: self.malformed_records,
            snapshots_truncated: self.snapshots_truncated,
        })
    }
}

/// Buckets of the `births` table for [`CaptureOptions::births_max`]: a power of two, so
/// that the program's hash picks one with a shift.
fn birth_buckets(births_max: NonZeroU32) -> Result<u32, CaptureError> {
    let births = births_max.get();
    if !births.is_power_of_two() || !(BIRTHS_MIN..=BIRTHS_MAX).contains(&births) {
        return Err(CaptureError::BirthsMax {
            given: births,
            min: BIRTHS_MIN,
            max: BIRTHS_MAX,
        });
    }
    Ok(births / BIRTH_WAYS)
}

/// Hands the ring buffer to tokio's reactor. tokio made this `unsafe` because a type's
/// `as_raw_fd` could return an fd that closes while registered; here it cannot.
#[allow(
    unsafe_code,
    reason = "AsyncFd::register's contract is upheld: RingBuf owns its map's OwnedFd, \
              always returns that same fd, and the AsyncFd owns the RingBuf until drop"
)]
fn register_ring(ring: RingBuf<MapData>) -> io::Result<AsyncFd<RingBuf<MapData>>> {
    // SAFETY: the fd belongs to `ring` (an OwnedFd inside MapData), stays open while the
    // AsyncFd that owns `ring` lives, and RingBuf::as_raw_fd returns it unchanged.
    unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into())
}

/// Reads up to `max` records; also says whether the ring buffer is now empty.
fn drain(
    ring: &mut RingBuf<MapData>,
    max: usize,
    malformed: &mut u64,
) -> (Vec<CapturedFlow>, bool) {
    let clock = ClockOffset::measure();
    let mut flows = Vec::new();
    while flows.len() < max {
        let Some(item) = ring.next() else {
            return (flows, true);
        };
        match record::decode(&item, clock) {
            Ok(flow) => flows.push(flow),
            Err(_) => *malformed += 1,
        }
    }
    (flows, false)
}

/// Makes `map` hold exactly `desired`, and keeps its flag in `workload_maps_used` true to
/// the program's promise: the flag goes up before the first insert and down only once
/// the map is empty, so a close that sees it down may skip the lookup.
fn replace<const N: usize>(
    map: &mut HashMap<MapData, [u8; N], u32>,
    name: &'static str,
    (used, used_index): (&mut Array<MapData, u32>, u32),
    desired: impl Iterator<Item = ([u8; N], u32)>,
) -> Result<(), CaptureError> {
    let used_err = |source| CaptureError::Map {
        map: MAP_USED,
        source,
    };
    let map_err = |source| CaptureError::Map { map: name, source };
    let current = map.keys().collect::<Result<Vec<_>, _>>().map_err(map_err)?;
    let plan = workload::plan(current, desired, WORKLOAD_ENTRIES_MAX).map_err(|too_many| {
        CaptureError::TooManyEntries {
            map: name,
            given: too_many.given,
            max: too_many.max,
        }
    })?;
    let in_use = !plan.upsert.is_empty();
    if in_use {
        used.set(used_index, 1, 0).map_err(used_err)?;
    }
    for key in &plan.remove {
        map.remove(key).map_err(map_err)?;
    }
    for (key, id) in &plan.upsert {
        map.insert(key, id, 0).map_err(map_err)?;
    }
    if !in_use {
        used.set(used_index, 0, 0).map_err(used_err)?;
    }
    Ok(())
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, CaptureError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(CaptureError::Missing {
        kind: "program",
        name,
    })?;
    program.try_into().map_err(|e| program_error(name, e))
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, CaptureError> {
    ebpf.take_map(name)
        .ok_or(CaptureError::Missing { kind: "map", name })
}

fn program_error(program: &'static str, error: ProgramError) -> CaptureError {
    // An `if let` rather than a match: ProgramError is aya's enum, and every other
    // variant, present or future, is reported as it is.
    if let ProgramError::LoadError {
        io_error,
        verifier_log,
    } = error
    {
        return CaptureError::VerifierRejected {
            program,
            source: io_error,
            // Trimmed: the syscall's failure follows the log's last line.
            verifier_log: verifier_log.to_string().trim_end().to_owned(),
        };
    }
    CaptureError::Program {
        program,
        source: error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buckets(births: u32) -> Result<u32, CaptureError> {
        birth_buckets(NonZeroU32::new(births).unwrap_or(NonZeroU32::MIN))
    }

    #[test]
    fn births_max_is_a_bounded_power_of_two() {
        assert_eq!(buckets(65536).ok(), Some(16384));
        assert_eq!(buckets(BIRTHS_MIN).ok(), Some(2));
        assert_eq!(buckets(BIRTHS_MAX).ok(), Some(BIRTHS_MAX / 4));
        for bad in [4, 12, 65535, BIRTHS_MAX * 2] {
            assert!(
                matches!(buckets(bad), Err(CaptureError::BirthsMax { given, .. }) if given == bad),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn default_births_max_is_valid() {
        assert!(birth_buckets(CaptureOptions::default().births_max).is_ok());
    }
}
