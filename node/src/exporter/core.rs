//! The exporter's deciding logic, sans-io: what the identity source says goes into the
//! local history, captured sockets wait until the history can judge them, and each
//! heartbeat takes the flows stamped by the history and the claims it owes. Time comes in
//! as arguments; nothing here reads a clock or does IO.
//!
//! Sockets and observations come in on the host's monotonic clock, in ms (the history's
//! clock, see [`super::frames`]); a heartbeat states its flows and claims on the wall
//! clock of the frame it is given, as the batcher takes them. The tokio shell (`exporter::run`)
//! and the simulator drive the same code, and [`Retry`] decides where and when a batch is
//! sent again.

use super::batcher::{LocalClaim, LocalFlow, LocalOwner, Socket};
use super::frames::to_wall;
use super::history::{HistoryConfig, HistoryStats, LocalHistory, Observation, Stamp};
use tenure_gossip::wire::LocalReason;

/// Default [`ExporterCoreConfig::waiting_flows_max`].
pub const WAITING_FLOWS_MAX_DEFAULT: usize = 1_000_000;

/// Limits of the core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExporterCoreConfig {
    pub history: HistoryConfig,
    /// Captured flows waiting for an observation of the identity source later than their
    /// end (the source could not be read); past it the oldest go out `local_unknown`,
    /// counted.
    pub waiting_flows_max: usize,
}

impl Default for ExporterCoreConfig {
    fn default() -> ExporterCoreConfig {
        ExporterCoreConfig {
            history: HistoryConfig::default(),
            waiting_flows_max: WAITING_FLOWS_MAX_DEFAULT,
        }
    }
}

/// Counters of the core.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoreStats {
    /// Flows whose local end was stamped with a workload.
    pub stamped: u64,
    /// Flows whose local end went out unattributed, by reason ([`LocalReason::ALL`]).
    pub unattributed: [u64; LocalReason::ALL.len()],
    /// Flows of IPs the source never mapped (not a local workload's): not reported.
    pub not_local: u64,
    /// Flows that waited past `waiting_flows_max` (sent `local_unknown`).
    pub waiting_overflow: u64,
}

/// The exporter core. See the module documentation.
#[derive(Debug)]
pub struct ExporterCore {
    history: LocalHistory,
    /// No identity source: every local end is `local_unknown`, and every flow is reported
    /// (the `--output stdout` view of a host).
    anonymous: bool,
    waiting: Vec<Socket>,
    waiting_flows_max: usize,
    stats: CoreStats,
}

impl ExporterCore {
    pub fn new(config: ExporterCoreConfig) -> ExporterCore {
        ExporterCore {
            history: LocalHistory::new(config.history),
            anonymous: false,
            waiting: Vec::new(),
            waiting_flows_max: config.waiting_flows_max.max(1),
            stats: CoreStats::default(),
        }
    }

    /// A core without an identity source.
    pub fn anonymous(config: ExporterCoreConfig) -> ExporterCore {
        ExporterCore {
            anonymous: true,
            ..ExporterCore::new(config)
        }
    }

    pub fn stats(&self) -> CoreStats {
        self.stats
    }

    pub fn history(&self) -> &LocalHistory {
        &self.history
    }

    pub fn history_stats(&self) -> HistoryStats {
        self.history.stats()
    }

    /// Flows waiting to be stamped.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// What the identity source knows as of monotonic `now_ms`, the host's wall clock
    /// then `frame_ms` ahead of its monotonic clock.
    pub fn observe(&mut self, now_ms: u64, frame_ms: i64, observation: &Observation) {
        self.history.observe(now_ms, frame_ms, observation);
    }

    /// Captured sockets (closed, or snapshots of open ones), their times monotonic.
    pub fn capture(&mut self, sockets: impl IntoIterator<Item = Socket>) {
        self.waiting.extend(sockets);
    }

    /// One heartbeat: the flows the history can judge now, their local ends stamped, and
    /// the claims owed, on the wall clock of frame `frame_ms`. Flows that ended after the
    /// last observation wait for the next.
    pub fn heartbeat(&mut self, frame_ms: i64) -> (Vec<LocalFlow>, Vec<LocalClaim>) {
        let overflow = self.waiting.len().saturating_sub(self.waiting_flows_max);
        let mut flows = Vec::new();
        let mut later = Vec::new();
        for (i, socket) in std::mem::take(&mut self.waiting).into_iter().enumerate() {
            let stamp = if self.anonymous {
                Stamp::Unattributed(LocalReason::Unknown)
            } else {
                self.history
                    .stamp(socket.local_ip, socket.start_ms, socket.end_ms)
            };
            let local = match stamp {
                Stamp::Workload(w) => LocalOwner::Workload(w.to_string()),
                Stamp::Unattributed(reason) => LocalOwner::Unattributed(reason),
                Stamp::NotYet if i < overflow => {
                    self.stats.waiting_overflow += 1;
                    LocalOwner::Unattributed(LocalReason::Unknown)
                }
                Stamp::NotYet => {
                    later.push(socket);
                    continue;
                }
                Stamp::NotLocal => {
                    self.stats.not_local += 1;
                    continue;
                }
            };
            match &local {
                LocalOwner::Workload(_) => self.stats.stamped += 1,
                LocalOwner::Unattributed(reason) => {
                    let k = LocalReason::ALL
                        .iter()
                        .position(|r| r == reason)
                        .unwrap_or(0);
                    self.stats.unattributed[k] += 1;
                }
            }
            let socket = Socket {
                start_ms: to_wall(socket.start_ms, frame_ms),
                end_ms: to_wall(socket.end_ms, frame_ms),
                ..socket
            };
            flows.push(LocalFlow { socket, local });
        }
        self.waiting = later;
        let mut claims = if self.anonymous {
            Vec::new()
        } else {
            self.history.claims()
        };
        for claim in &mut claims {
            claim.since_ms = to_wall(claim.since_ms, frame_ms);
            claim.until_ms = to_wall(claim.until_ms, frame_ms);
        }
        (flows, claims)
    }
}

/// Where and when a batch goes after a failure: the next collector, after a delay that
/// doubles from `backoff_initial_ms` up to `backoff_max_ms` and starts over on success.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retry {
    collectors: usize,
    current: usize,
    backoff_initial_ms: u64,
    backoff_max_ms: u64,
    backoff_ms: u64,
}

impl Retry {
    /// `first` picks the first collector (an exporter id spreads exporters over them).
    pub fn new(
        collectors: usize,
        first: usize,
        backoff_initial_ms: u64,
        backoff_max_ms: u64,
    ) -> Retry {
        Retry {
            collectors: collectors.max(1),
            current: first % collectors.max(1),
            backoff_initial_ms,
            backoff_max_ms: backoff_max_ms.max(backoff_initial_ms),
            backoff_ms: backoff_initial_ms,
        }
    }

    /// The collector to send to, by position.
    pub fn current(&self) -> usize {
        self.current
    }

    /// A batch was answered: the backoff starts over.
    pub fn succeeded(&mut self) {
        self.backoff_ms = self.backoff_initial_ms;
    }

    /// Sending failed: move to the next collector and return how long to wait first.
    pub fn failed(&mut self) -> u64 {
        let wait = self.backoff_ms;
        self.current = (self.current + 1) % self.collectors;
        self.backoff_ms = self.backoff_ms.saturating_mul(2).min(self.backoff_max_ms);
        wait
    }

    /// The collector asked to wait `retry_after_ms`: how long to wait (at most the backoff
    /// limit), staying with it.
    pub fn busy(&self, retry_after_ms: u64) -> u64 {
        retry_after_ms.min(self.backoff_max_ms)
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::sync::Arc;

    use tenure_gossip::wire::Direction;

    use super::super::history::Held;
    use super::*;

    fn socket(id: u128, start_ms: u64, end_ms: u64) -> Socket {
        Socket {
            flow_id: id,
            local_ip: IpAddr::from([10, 0, 0, 1]),
            local_port: 1,
            remote_ip: IpAddr::from([10, 0, 0, 2]),
            remote_port: 2,
            start_ms,
            end_ms,
            bytes_sent: 0,
            bytes_received: 0,
            segs_in: 0,
            segs_out: 0,
            rtt_us: 0,
            retransmits: 0,
            direction: Direction::Outbound,
            ongoing: false,
        }
    }

    fn held(workload: &str, since_ms: u64) -> Observation {
        Observation {
            held: [(
                IpAddr::from([10, 0, 0, 1]),
                Held {
                    workload: Arc::from(workload),
                    since_ms: Some(since_ms),
                },
            )]
            .into_iter()
            .collect(),
            changed_ms: None,
            released: Default::default(),
        }
    }

    #[test]
    fn a_flow_before_an_owner_change_keeps_its_owner_and_later_ones_wait() {
        let mut core = ExporterCore::new(ExporterCoreConfig::default());
        core.observe(1_000, 0, &held("web", 0));
        core.capture([socket(1, 100, 500), socket(2, 800, 1_150)]);
        // Before the heartbeat the map changed: inventory since 1_300.
        core.observe(1_500, 0, &held("inventory", 1_300));
        core.capture([socket(3, 1_100, 1_400), socket(4, 1_450, 1_600)]);
        let (flows, claims) = core.heartbeat(0);
        let locals: Vec<_> = flows
            .iter()
            .map(|f| (f.socket.flow_id, f.local.clone()))
            .collect();
        assert_eq!(
            locals,
            vec![
                (1, LocalOwner::Workload("web".into())),
                (2, LocalOwner::Workload("web".into())),
                (3, LocalOwner::Unattributed(LocalReason::Changed)),
            ],
            "never the owner at collection time"
        );
        assert_eq!(core.waiting(), 1, "flow 4 ended after the last observation");
        assert_eq!(claims.len(), 2, "web's last claim and inventory's");
        assert_eq!(claims[0].until_ms, 1_299);
        core.observe(2_000, 0, &held("inventory", 1_300));
        let (flows, _) = core.heartbeat(0);
        assert_eq!(flows[0].local, LocalOwner::Workload("inventory".into()));
    }

    #[test]
    fn a_step_of_the_wall_clock_moves_neither_tenures_nor_flows() {
        const BOOT: i64 = 1_700_000_000_000;
        let wall = |mono: u64, frame: i64| (i64::try_from(mono).unwrap_or(0) + frame) as u64;
        let mut core = ExporterCore::new(ExporterCoreConfig::default());
        core.observe(10_000, BOOT, &held("web", wall(1_000, BOOT)));
        core.capture([socket(1, 2_000, 9_000)]);
        let (flows, claims) = core.heartbeat(BOOT);
        assert_eq!(flows[0].local, LocalOwner::Workload("web".into()));
        assert_eq!(flows[0].socket.start_ms, wall(2_000, BOOT));
        assert_eq!(claims[0].since_ms, wall(1_000, BOOT));
        // The wall clock goes back 30 s at monotonic 10_500; at 12_000 inventory takes the
        // IP, stated on the stepped clock.
        let stepped = BOOT - 30_000;
        core.observe(13_000, stepped, &held("inventory", wall(12_000, stepped)));
        core.capture([
            socket(2, 10_200, 11_500),
            socket(3, 12_300, 12_800),
            socket(4, 11_000, 12_500),
        ]);
        let (flows, claims) = core.heartbeat(stepped);
        let locals: Vec<_> = flows
            .iter()
            .map(|f| (f.socket.flow_id, f.local.clone()))
            .collect();
        assert_eq!(
            locals,
            vec![
                (2, LocalOwner::Workload("web".into())),
                (3, LocalOwner::Workload("inventory".into())),
                (4, LocalOwner::Unattributed(LocalReason::Changed)),
            ],
            "each flow by who held the IP on the monotonic clock"
        );
        // Stated on the stepped wall clock, as the batcher takes them.
        assert_eq!(flows[0].socket.start_ms, wall(10_200, stepped));
        let web = claims.iter().find(|c| c.workload == "web");
        let inventory = claims.iter().find(|c| c.workload == "inventory");
        assert_eq!(
            web.map(|c| (c.since_ms, c.until_ms)),
            Some((wall(1_000, stepped), wall(11_999, stepped)))
        );
        assert_eq!(inventory.map(|c| c.since_ms), Some(wall(12_000, stepped)));
    }

    #[test]
    fn retry_moves_on_and_backs_off_up_to_the_limit() {
        let mut r = Retry::new(3, 4, 100, 350);
        assert_eq!(r.current(), 1);
        assert_eq!(r.failed(), 100);
        assert_eq!(r.failed(), 200);
        assert_eq!(r.failed(), 350);
        assert_eq!(r.current(), 1);
        r.succeeded();
        assert_eq!(r.failed(), 100);
        assert_eq!(r.busy(1_000), 350);
    }
}
