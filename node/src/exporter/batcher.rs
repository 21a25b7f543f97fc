//! The exporter's batch buffer, sans-io: flows and heartbeats become batches, batches wait
//! until a collector acknowledges them, and the buffer is bounded with a counted drop of
//! the oldest batch.
//!
//! Every time in a batch is by the host's wall clock, and a copy goes out with `sent_ms`,
//! the wall clock at the send, which collectors hold against other exporters' clocks. So
//! that the two always agree, each batch remembers the *clock frame* it was built in (the
//! wall clock minus the monotonic clock, which moves only when the wall clock is stepped)
//! and a copy sent in another frame has every time moved by the step ([`Batcher::outgoing`]).

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;

use tenure_gossip::wire::{self, Direction, FlowBatch, LocalEnd, LocalReason};

/// The smallest change of the clock frame taken for a step of the wall clock, in ms;
/// smaller ones are the jitter of reading two clocks one after the other.
pub const CLOCK_STEP_MIN_MS: u64 = 10;

/// A socket's life as capture saw it, before the local end is stamped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Socket {
    pub flow_id: u128,
    pub local_ip: IpAddr,
    pub local_port: u16,
    pub remote_ip: IpAddr,
    pub remote_port: u16,
    pub start_ms: u64,
    pub end_ms: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub segs_in: u64,
    pub segs_out: u64,
    pub retransmits: u64,
    /// Smoothed RTT, µs; 0 = no sample.
    pub rtt_us: u32,
    pub direction: Direction,
    pub ongoing: bool,
}

/// Who a flow's local end was, as the exporter vouches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalOwner {
    /// One tenure of this workload covered the whole flow.
    Workload(String),
    /// No workload is vouched for, for this reason.
    Unattributed(LocalReason),
}

/// A flow as the exporter reports it: the socket and its stamped local end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalFlow {
    pub socket: Socket,
    pub local: LocalOwner,
}

/// One ownership heartbeat: `workload` has held `ip` since `since_ms`, as of `until_ms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalClaim {
    pub ip: IpAddr,
    pub workload: String,
    pub since_ms: u64,
    pub until_ms: u64,
}

/// Counters of the buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatcherStats {
    pub batches_made: u64,
    pub batches_acked: u64,
    pub batches_dropped: u64,
    pub flows_dropped: u64,
    pub batches_rejected: u64,
}

/// The buffer of unacknowledged batches. See the module documentation.
#[derive(Debug)]
pub struct Batcher {
    exporter_id: u64,
    region: String,
    next_batch_id: u64,
    batch_flows_max: usize,
    buffer_batches_max: usize,
    /// Unacknowledged batches, each with the clock frame it was built in.
    buffer: VecDeque<(FlowBatch, i64)>,
    /// The clock frame of the batches being built: wall minus monotonic clock, ms.
    frame_ms: i64,
    stats: BatcherStats,
}

impl Batcher {
    /// `first_batch_id` should differ across restarts (the start time in ms does), so that
    /// a collector never mistakes a new batch for an old one.
    pub fn new(
        exporter_id: u64,
        region: &str,
        first_batch_id: u64,
        batch_flows_max: usize,
        buffer_batches_max: usize,
    ) -> Batcher {
        Batcher {
            exporter_id,
            region: region.to_owned(),
            next_batch_id: first_batch_id,
            batch_flows_max: batch_flows_max.max(1),
            buffer_batches_max: buffer_batches_max.max(1),
            buffer: VecDeque::new(),
            frame_ms: 0,
            stats: BatcherStats::default(),
        }
    }

    pub fn stats(&self) -> BatcherStats {
        self.stats
    }

    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Turns one heartbeat interval's flows and claims into batches (more than one when
    /// there are more flows than a batch holds; the claims ride in the first). Always makes
    /// at least one batch: heartbeats go out even with no traffic. `frame_ms` is the clock
    /// frame their times were read in: the host's wall clock minus its monotonic clock, ms.
    pub fn push(&mut self, flows: Vec<LocalFlow>, claims: Vec<LocalClaim>, frame_ms: i64) {
        self.frame_ms = frame_ms;
        let mut claim_chunks = split_claims(claims).into_iter();
        let mut flow_chunks = flows
            .chunks(self.batch_flows_max)
            .map(<[LocalFlow]>::to_vec)
            .collect::<Vec<_>>()
            .into_iter();
        let mut made = false;
        loop {
            // Claims travel with (or ahead of) the flows, so a flow finds its claims.
            let claims = claim_chunks.next();
            let flows = flow_chunks.next();
            if claims.is_none() && flows.is_none() {
                break;
            }
            self.enqueue(flows.unwrap_or_default(), claims.unwrap_or_default());
            made = true;
        }
        if !made {
            self.enqueue(Vec::new(), Vec::new());
        }
    }

    fn enqueue(&mut self, flows: Vec<LocalFlow>, claims: Vec<LocalClaim>) {
        let mut names: BTreeMap<String, u32> = BTreeMap::new();
        let mut dictionary = Vec::new();
        let mut index = |name: &str| -> u32 {
            if let Some(i) = names.get(name) {
                return *i;
            }
            let i = dictionary.len() as u32;
            dictionary.push(name.to_owned());
            names.insert(name.to_owned(), i);
            i
        };
        let wire_claims: Vec<wire::Claim> = claims
            .iter()
            .map(|c| wire::Claim {
                ip: c.ip,
                workload: index(&c.workload),
                instance: 0,
                since_ms: c.since_ms,
                until_ms: c.until_ms.max(c.since_ms),
            })
            .collect();
        let wire_flows: Vec<wire::Flow> = flows
            .iter()
            .map(|LocalFlow { socket: f, local }| wire::Flow {
                flow_id: f.flow_id,
                start_ms: f.start_ms,
                end_ms: f.end_ms.max(f.start_ms),
                bytes_sent: f.bytes_sent,
                bytes_received: f.bytes_received,
                segs_in: f.segs_in,
                segs_out: f.segs_out,
                retransmits: f.retransmits,
                rtt_us: f.rtt_us,
                local: match local {
                    LocalOwner::Workload(w) => LocalEnd::Workload(index(w)),
                    LocalOwner::Unattributed(reason) => LocalEnd::Unattributed(*reason),
                },
                local_ip: f.local_ip,
                remote_ip: f.remote_ip,
                local_port: f.local_port,
                remote_port: f.remote_port,
                direction: f.direction,
                ongoing: f.ongoing,
            })
            .collect();
        self.next_batch_id += 1;
        self.stats.batches_made += 1;
        self.buffer.push_back((
            FlowBatch {
                batch_id: self.next_batch_id,
                exporter_id: self.exporter_id,
                hops: 0,
                sent_ms: 0,
                region: self.region.clone(),
                dictionary,
                flows: wire_flows,
                claims: wire_claims,
            },
            self.frame_ms,
        ));
        while self.buffer.len() > self.buffer_batches_max {
            if let Some((dropped, _)) = self.buffer.pop_front() {
                self.stats.batches_dropped += 1;
                self.stats.flows_dropped += dropped.flows.len() as u64;
                tracing::warn!(
                    batch = dropped.batch_id,
                    flows = dropped.flows.len(),
                    "exporter buffer full; dropped the oldest batch"
                );
            }
        }
    }

    /// The oldest unacknowledged batch: the next to send.
    pub fn front(&self) -> Option<&FlowBatch> {
        self.buffer.front().map(|(b, _)| b)
    }

    /// A copy of the oldest unacknowledged batch to send at `now_ms` (wall clock) in clock
    /// frame `frame_ms`: stamped `sent_ms`, and with every time moved by the wall clock's
    /// steps since it was built, so that all of them and `sent_ms` read one clock.
    pub fn outgoing(&self, now_ms: u64, frame_ms: i64) -> Option<FlowBatch> {
        let (batch, built_in) = self.buffer.front()?;
        let mut copy = batch.clone();
        copy.sent_ms = now_ms;
        let step = frame_ms.saturating_sub(*built_in);
        if step.unsigned_abs() >= CLOCK_STEP_MIN_MS {
            for f in &mut copy.flows {
                f.start_ms = f.start_ms.saturating_add_signed(step);
                f.end_ms = f.end_ms.saturating_add_signed(step);
            }
            for c in &mut copy.claims {
                c.since_ms = c.since_ms.saturating_add_signed(step);
                c.until_ms = c.until_ms.saturating_add_signed(step);
            }
        }
        Some(copy)
    }

    /// The collector took `batch_id`.
    pub fn acked(&mut self, batch_id: u64) {
        if self.front().is_some_and(|b| b.batch_id == batch_id) {
            self.buffer.pop_front();
            self.stats.batches_acked += 1;
        }
    }

    /// The collector refused `batch_id` for good: drop it, counted.
    pub fn rejected(&mut self, batch_id: u64) {
        if self.front().is_some_and(|b| b.batch_id == batch_id) {
            if let Some((b, _)) = self.buffer.pop_front() {
                self.stats.batches_rejected += 1;
                self.stats.flows_dropped += b.flows.len() as u64;
            }
        }
    }
}

/// Claims per batch stay under the wire's limit.
fn split_claims(claims: Vec<LocalClaim>) -> Vec<Vec<LocalClaim>> {
    if claims.is_empty() {
        return Vec::new();
    }
    claims
        .chunks(wire::CLAIMS_PER_BATCH_MAX_DEFAULT)
        .map(<[LocalClaim]>::to_vec)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(i: u8) -> LocalClaim {
        LocalClaim {
            ip: IpAddr::from([10, 0, 0, i]),
            workload: "w".into(),
            since_ms: 1,
            until_ms: 2,
        }
    }

    #[test]
    fn heartbeats_go_out_without_flows_and_the_buffer_drops_the_oldest_counted() {
        let mut b = Batcher::new(1, "r", 100, 10, 2);
        b.push(Vec::new(), vec![claim(1)], 0);
        assert_eq!(b.front().unwrap().claims.len(), 1);
        b.push(Vec::new(), vec![claim(2)], 0);
        b.push(Vec::new(), vec![claim(3)], 0);
        assert_eq!(b.buffered(), 2);
        assert_eq!(b.stats().batches_dropped, 1);
        let first = b.front().unwrap().batch_id;
        b.acked(first);
        assert_eq!(b.buffered(), 1);
        assert_eq!(b.stats().batches_acked, 1);
    }

    #[test]
    fn a_batch_sent_after_the_clock_stepped_carries_its_times_by_the_new_clock() {
        let mut b = Batcher::new(1, "r", 100, 10, 4);
        let claim = LocalClaim {
            ip: IpAddr::from([10, 0, 0, 1]),
            workload: "w".into(),
            since_ms: 50_000,
            until_ms: 60_000,
        };
        b.push(Vec::new(), vec![claim], 1_000);
        let same = b.outgoing(60_100, 1_000).unwrap();
        assert_eq!(same.sent_ms, 60_100);
        assert_eq!(
            (same.claims[0].since_ms, same.claims[0].until_ms),
            (50_000, 60_000)
        );
        // The wall clock was stepped back 30 s before the retry.
        let retry = b.outgoing(30_200, -29_000).unwrap();
        assert_eq!(retry.sent_ms, 30_200);
        assert_eq!(
            (retry.claims[0].since_ms, retry.claims[0].until_ms),
            (20_000, 30_000)
        );
        assert_eq!(
            b.front().unwrap().claims[0].since_ms,
            50_000,
            "kept as built"
        );
    }
}
