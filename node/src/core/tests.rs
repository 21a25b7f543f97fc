//! Scenarios of the core driven by hand: no sockets, no clock.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};

use tenure_attribution::{Attribution, EngineConfig, Reason, UnixMillis, Verdict};
use tenure_gossip::handoff::HandoffConfig;
use tenure_gossip::identity::NodeIdentity;
use tenure_gossip::ring::RingConfig;
use tenure_gossip::wire::{self, AckStatus, Direction, Message, RejectReason};

use super::{
    AdmissionConfig, CoreConfig, Entitlement, Entitlements, FlowRecord, JournalOp, NodeCore,
    Output, Rejection, Sender,
};

const START: u64 = 1_700_000_000_000;

fn core() -> NodeCore {
    core_of("a0", "127.0.0.1:1".parse().unwrap(), Vec::new(), 7)
}

/// A core of region `a` named `name`, listening (for gossip and data) at `addr`.
fn core_of(name: &str, addr: SocketAddr, seeds: Vec<SocketAddr>, rng_seed: u64) -> NodeCore {
    let identity = NodeIdentity::new(name, "a", addr, addr, 1).unwrap();
    let config = CoreConfig {
        identity,
        seeds,
        rng_seed,
        region_size_hint: NonZeroU32::MIN,
        fleet_size_hint: NonZeroU32::MIN,
        region_prefixes: vec!["10.1.0.0/16".parse().unwrap()],
        region_version: 1,
        static_regions: vec![("10.2.0.0/16".parse().unwrap(), "b".to_owned())],
        engine: EngineConfig {
            skew_margin_ms: 100,
            pending_deadline_ms: 2_000,
            ..EngineConfig::default()
        },
        ring: RingConfig {
            replication: NonZeroUsize::MIN,
            ..RingConfig::default()
        },
        handoff: HandoffConfig {
            heartbeat_interval_ms: 1_000,
            replication_delay_ms: 1_000,
            ..HandoffConfig::default()
        },
        forward_ack_timeout_ms: 1_000,
        held_flows_max: 100,
        inflight_flows_max: 100,
        busy_flows_threshold: 1_000,
        busy_retry_after_ms: 500,
    };
    let mut core = NodeCore::new(config, UnixMillis(START)).unwrap();
    // The scenarios below state claims up to 15 s ahead of the core's clock.
    core.set_admission(AdmissionConfig {
        claim_skew_max_ms: 20_000,
        ..AdmissionConfig::default()
    });
    core
}

fn flow(id: u128, remote: &str, start_ms: u64) -> wire::Flow {
    wire::Flow {
        flow_id: id,
        start_ms,
        end_ms: start_ms + 10,
        bytes_sent: 1,
        bytes_received: 1,
        segs_in: 1,
        segs_out: 1,
        retransmits: 0,
        rtt_us: 0,
        local: wire::LocalEnd::Workload(0),
        local_ip: "10.1.0.10".parse().unwrap(),
        remote_ip: remote.parse().unwrap(),
        local_port: 1,
        remote_port: 2,
        direction: Direction::Outbound,
        ongoing: false,
    }
}

fn batch(id: u64, region: &str, flows: Vec<wire::Flow>, claims: Vec<wire::Claim>) -> Message {
    Message::FlowBatch(wire::FlowBatch {
        batch_id: id,
        exporter_id: 1,
        hops: 0,
        sent_ms: 0,
        region: region.into(),
        dictionary: vec!["gateway".into(), "svc".into()],
        flows,
        claims,
    })
}

fn emitted(out: &[Output]) -> Vec<(u128, Verdict)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Emit(e) => Some((e.record.flow_id, e.verdict.clone())),
            Output::Frame { .. }
            | Output::Datagram { .. }
            | Output::Timer { .. }
            | Output::Notice(_)
            | Output::Journal(_) => None,
        })
        .collect()
}

fn acks(out: &[Output]) -> Vec<AckStatus> {
    out.iter()
        .filter_map(|o| match o {
            Output::Frame {
                message: Message::Ack(a),
                ..
            } => Some(a.status),
            Output::Frame { .. }
            | Output::Datagram { .. }
            | Output::Timer { .. }
            | Output::Emit(_)
            | Output::Notice(_)
            | Output::Journal(_) => None,
        })
        .collect()
}

#[test]
fn a_lone_node_holds_flows_until_handoff_then_attributes_by_time() {
    let mut core = core();
    let mut out = Vec::new();
    core.start(UnixMillis(START), &mut out);
    assert!(!core.is_ready(), "a new node's spans are pending");

    // Before handoff completes: accepted and held, not guessed.
    let t = START + 10_000;
    let claims = vec![wire::Claim {
        ip: "10.1.0.100".parse().unwrap(),
        workload: 1,
        instance: 0,
        since_ms: t,
        until_ms: t + 5_000,
    }];
    let mut out = Vec::new();
    core.handle_message(
        1,
        batch(1, "a", vec![flow(1, "10.1.0.100", t + 1_000)], claims),
        UnixMillis(START + 100),
        &mut out,
    );
    assert!(acks(&out).is_empty(), "the ack waits for the journal");
    core.journal_synced(u64::MAX, UnixMillis(START + 100), &mut out);
    assert_eq!(acks(&out), vec![AckStatus::Accepted]);
    assert!(emitted(&out).is_empty());
    assert_eq!(core.held_len(), 1);

    // Handoff rebuilds after 2 heartbeats + replication (3 s) with a floor at the start.
    let mut out = Vec::new();
    core.tick(UnixMillis(START + 3_500), &mut out);
    assert!(core.is_ready());
    assert_eq!(
        emitted(&out),
        vec![(1, Verdict::Attributed(Attribution::Heartbeat("svc".into())))]
    );

    // External at once; a region with no live collector: unattributed, not dropped; a flow
    // before the handoff floor: expired.
    let mut out = Vec::new();
    let flows = vec![
        flow(2, "198.51.100.1", t),
        flow(3, "10.2.0.5", t),
        flow(4, "10.1.0.100", START - 60_000),
    ];
    core.handle_message(
        2,
        batch(2, "a", flows, Vec::new()),
        UnixMillis(START + 4_000),
        &mut out,
    );
    let verdicts = emitted(&out);
    assert!(verdicts.contains(&(2, Verdict::Attributed(Attribution::External))));
    assert!(verdicts.contains(&(3, Verdict::Unattributed(Reason::RegionUnreachable))));
    assert!(verdicts.contains(&(4, Verdict::Unattributed(Reason::Expired))));

    // A batch from another region's exporter is refused for good.
    let mut out = Vec::new();
    core.handle_message(
        3,
        batch(3, "b", Vec::new(), Vec::new()),
        UnixMillis(START + 4_000),
        &mut out,
    );
    assert_eq!(
        acks(&out),
        vec![AckStatus::Rejected(RejectReason::WrongRegion)]
    );

    // A flow in no one's range waits, then goes out unattributed at its deadline.
    let mut out = Vec::new();
    core.handle_message(
        4,
        batch(4, "a", vec![flow(5, "10.1.0.101", t)], Vec::new()),
        UnixMillis(START + 4_000),
        &mut out,
    );
    assert!(emitted(&out).is_empty());
    let mut out = Vec::new();
    core.tick(UnixMillis(START + 6_500), &mut out);
    assert_eq!(
        emitted(&out),
        vec![(5, Verdict::Unattributed(Reason::NoOwner))]
    );
}

#[test]
fn leaving_alone_emits_what_waits_instead_of_losing_it() {
    let mut core = core();
    let mut out = Vec::new();
    core.start(UnixMillis(START), &mut out);
    let mut out = Vec::new();
    core.tick(UnixMillis(START + 3_500), &mut out);
    let mut out = Vec::new();
    core.handle_message(
        1,
        batch(1, "a", vec![flow(1, "10.1.0.7", START + 4_000)], Vec::new()),
        UnixMillis(START + 4_000),
        &mut out,
    );
    assert_eq!(core.unsettled_flows(), 1);
    let mut out = Vec::new();
    core.leave(UnixMillis(START + 4_100), &mut out);
    assert_eq!(
        emitted(&out),
        vec![(1, Verdict::Unattributed(Reason::NoOwner))]
    );
    assert_eq!(core.unsettled_flows(), 0);
}

fn journal(out: &[Output]) -> Vec<JournalOp> {
    out.iter()
        .filter_map(|o| match o {
            Output::Journal(op) => Some(op.clone()),
            Output::Frame { .. }
            | Output::Datagram { .. }
            | Output::Timer { .. }
            | Output::Emit(_)
            | Output::Notice(_) => None,
        })
        .collect()
}

/// The flows of an append record the core wrote.
fn decoded(record: &[u8]) -> Vec<FlowRecord> {
    crate::journal::codec::decode_append(record)
        .expect("the core's append records decode")
        .1
}

/// A disk as the journal sees it: appends written, the prefix fsynced, releases.
#[derive(Default)]
struct Disk {
    written: Vec<(u64, Vec<FlowRecord>)>,
    synced_upto: u64,
    released: Vec<u64>,
}

impl Disk {
    fn apply(&mut self, out: &[Output]) {
        for op in journal(out) {
            match op {
                JournalOp::Append { id, record } => self.written.push((id, decoded(&record))),
                JournalOp::Release { ids } => self.released.extend(ids),
            }
        }
    }

    fn sync(&mut self) -> u64 {
        self.synced_upto = self.written.last().map_or(0, |(id, _)| *id);
        self.synced_upto
    }

    /// What survives a `kill -9`: fsynced appends not released (a release that was
    /// written may or may not survive; assume the worst, that none did).
    fn after_crash(&self) -> Vec<(u64, Vec<FlowRecord>)> {
        self.written
            .iter()
            .filter(|(id, _)| *id <= self.synced_upto)
            .cloned()
            .collect()
    }
}

/// A ready lone node: its handoff is complete.
fn ready_core(at: u64) -> NodeCore {
    let mut core = core();
    let mut out = Vec::new();
    core.start(UnixMillis(at), &mut out);
    core.tick(UnixMillis(at + 3_500), &mut out);
    assert!(core.is_ready());
    core
}

#[test]
fn the_ack_follows_the_sync_and_the_release_follows_the_emit() {
    let mut core = ready_core(START);
    let now = UnixMillis(START + 4_000);
    let mut out = Vec::new();
    // One flow decided at once (external), one pending (nobody claims 10.1.0.9 yet).
    let flows = vec![
        flow(1, "198.51.100.1", START + 4_000),
        flow(2, "10.1.0.9", START + 4_000),
    ];
    core.handle_message(7, batch(70, "a", flows, Vec::new()), now, &mut out);
    let ops = journal(&out);
    let JournalOp::Append { id, record } = &ops[0] else {
        panic!("the first journal op is the append: {ops:?}");
    };
    assert_eq!(decoded(record).len(), 2);
    assert_eq!(ops.len(), 1, "one flow is still pending: no release yet");
    assert!(acks(&out).is_empty(), "no ack before the sync");
    assert_eq!(core.journal_withheld_acks(), 1);

    // A sync below the append acknowledges nothing; at it, the batch.
    let mut out = Vec::new();
    core.journal_synced(id - 1, now, &mut out);
    assert!(acks(&out).is_empty());
    core.journal_synced(*id, now, &mut out);
    assert_eq!(acks(&out), vec![AckStatus::Accepted]);
    assert_eq!(core.journal_withheld_acks(), 0);

    // The pending flow goes out at its deadline; then, and only then, the release.
    let mut out = Vec::new();
    core.tick(UnixMillis(START + 7_000), &mut out);
    assert_eq!(
        emitted(&out),
        vec![(2, Verdict::Unattributed(Reason::NoOwner))]
    );
    let emit_at = out.iter().position(|o| matches!(o, Output::Emit(_)));
    let release_at = out
        .iter()
        .position(|o| matches!(o, Output::Journal(JournalOp::Release { .. })));
    assert!(emit_at < release_at, "the release follows the emit");
    assert_eq!(journal(&out), vec![JournalOp::Release { ids: vec![*id] }]);
    assert_eq!(core.journal_open_appends(), 0);
}

#[test]
fn a_crash_between_append_and_sync_loses_no_acked_flow() {
    let mut disk = Disk::default();
    let mut acked: Vec<u128> = Vec::new();
    let mut core = ready_core(START);
    let now = UnixMillis(START + 4_000);

    // Batch 1 is appended, synced and acknowledged; its flow waits for a claim.
    let mut out = Vec::new();
    core.handle_message(
        1,
        batch(1, "a", vec![flow(1, "10.1.0.9", START + 4_000)], Vec::new()),
        now,
        &mut out,
    );
    disk.apply(&out);
    let upto = disk.sync();
    core.journal_synced(upto, now, &mut out);
    assert_eq!(acks(&out), vec![AckStatus::Accepted]);
    acked.push(1);

    // Batch 2 is appended, and the node dies before the fsync: no ack went out.
    let mut out = Vec::new();
    core.handle_message(
        1,
        batch(2, "a", vec![flow(2, "10.1.0.9", START + 4_000)], Vec::new()),
        now,
        &mut out,
    );
    disk.apply(&out);
    assert!(acks(&out).is_empty(), "batch 2 was never acknowledged");
    drop(core);

    // The restarted node replays what the disk kept: every acknowledged flow.
    let survivors = disk.after_crash();
    let mut core = ready_core(START + 10_000);
    let mut out = Vec::new();
    core.recover(survivors, UnixMillis(START + 13_500), &mut out);
    assert!(
        journal(&out)
            .iter()
            .all(|op| !matches!(op, JournalOp::Append { .. })),
        "replayed flows are already journaled"
    );
    core.tick(UnixMillis(START + 20_000), &mut out);
    let ids: Vec<u128> = emitted(&out).into_iter().map(|(id, _)| id).collect();
    for id in &acked {
        assert!(
            ids.contains(id),
            "acknowledged flow {id} lost; emitted {ids:?}"
        );
    }
    assert_eq!(
        journal(&out).last(),
        Some(&JournalOp::Release { ids: vec![upto] })
    );
}

#[test]
fn recover_re_emits_and_new_appends_get_larger_ids() {
    let mut core = ready_core(START);
    let now = UnixMillis(START + 4_000);
    let mut out = Vec::new();
    core.handle_message(
        1,
        batch(1, "a", vec![flow(9, "198.51.100.1", START)], Vec::new()),
        now,
        &mut out,
    );
    // Emitted at once, released in the same output: a restart after a lost release
    // emits it again, with the same flow id.
    assert_eq!(emitted(&out).len(), 1);
    let Some(JournalOp::Append { id, record }) = journal(&out).into_iter().next() else {
        panic!("no append");
    };
    let flows = decoded(&record);
    assert_eq!(journal(&out)[1], JournalOp::Release { ids: vec![id] });

    let mut core = ready_core(START);
    let mut out = Vec::new();
    core.recover(vec![(id + 40, flows), (id + 41, Vec::new())], now, &mut out);
    assert_eq!(
        emitted(&out),
        vec![(9, Verdict::Attributed(Attribution::External))]
    );
    assert_eq!(
        journal(&out),
        vec![JournalOp::Release {
            ids: vec![id + 40, id + 41]
        }]
    );
    assert!(
        core.journal_next_id() > id + 41,
        "recovered ids are never issued again"
    );
}

fn claim(ip: &str, workload: u32, since_ms: u64, until_ms: u64) -> wire::Claim {
    wire::Claim {
        ip: ip.parse().unwrap(),
        workload,
        instance: 0,
        since_ms,
        until_ms,
    }
}

/// A ready lone node that owns `10.1.0.7` as `gateway` over [START, START + 5 s].
fn ready_core_with_an_owner() -> (NodeCore, UnixMillis) {
    let mut core = core();
    core.set_admission(AdmissionConfig::default());
    let mut out = Vec::new();
    core.start(UnixMillis(START), &mut out);
    core.tick(UnixMillis(START + 3_500), &mut out);
    assert!(core.is_ready());
    let now = UnixMillis(START + 5_000);
    let claims = vec![claim("10.1.0.7", 0, START, START + 5_000)];
    core.handle_message_from(
        1,
        Sender::Exporter,
        batch(1, "a", Vec::new(), claims),
        now,
        &mut out,
    );
    assert_eq!(acks(&out), vec![AckStatus::Accepted]);
    assert_eq!(core.history("10.1.0.7".parse().unwrap()).segments.len(), 1);
    (core, now)
}

#[test]
fn forged_claims_are_refused_by_reason_and_never_change_ranges() {
    let (mut core, now) = ready_core_with_an_owner();
    let ip = "10.1.0.7".parse().unwrap();
    let before = core.history(ip);
    let n = now.0;
    let forged = vec![
        // "svc" claims the future: beyond the skew allowed.
        claim("10.1.0.7", 1, n + 20_000, n + 3_600_000),
        // ... or the far past.
        claim("10.1.0.7", 1, n - 7_200_000, n - 3_600_000),
        // ... or since after until.
        claim("10.1.0.7", 1, n, n - 1),
        // An IP of region b, and an external one.
        claim("10.2.0.7", 1, n - 1_000, n),
        claim("198.51.100.7", 1, n - 1_000, n),
    ];
    let mut out = Vec::new();
    core.handle_message_from(
        2,
        Sender::Exporter,
        batch(2, "a", Vec::new(), forged),
        now,
        &mut out,
    );
    // The batch itself is fine (it carried no flows): its bad claims are dropped.
    assert_eq!(acks(&out), vec![AckStatus::Accepted]);
    assert_eq!(
        core.history(ip),
        before,
        "no forged claim reached the ranges"
    );
    assert_eq!(core.history("10.2.0.7".parse().unwrap()).segments.len(), 0);
    let rejected = &core.admission_stats().claims_rejected;
    assert_eq!(rejected.get(&Rejection::Future), Some(&1));
    assert_eq!(rejected.get(&Rejection::Stale), Some(&1));
    assert_eq!(rejected.get(&Rejection::Inverted), Some(&1));
    assert_eq!(rejected.get(&Rejection::ForeignCidr), Some(&2));
    // And a flow inside the owner's range is still attributed to the owner.
    let mut out = Vec::new();
    core.handle_message_from(
        3,
        Sender::Exporter,
        batch(3, "a", vec![flow(9, "10.1.0.7", START + 2_000)], Vec::new()),
        now,
        &mut out,
    );
    assert_eq!(
        emitted(&out),
        vec![(
            9,
            Verdict::Attributed(Attribution::Heartbeat("gateway".into()))
        )]
    );
}

/// Exporter 1 may claim 10.1.0.0/29 under any name; exporter 2 may claim 10.1.0.8/29 as
/// `svc` only; exporter 3 is revoked.
fn entitlements(revoke_1: bool) -> Entitlements {
    let net = |s: &str| s.parse().unwrap();
    Entitlements::new(
        [
            (
                1,
                Entitlement {
                    prefixes: vec![net("10.1.0.0/29")],
                    workloads: None,
                    revoked: revoke_1,
                },
            ),
            (
                2,
                Entitlement {
                    prefixes: vec![net("10.1.0.8/29")],
                    workloads: Some(["svc".to_owned()].into_iter().collect()),
                    revoked: false,
                },
            ),
            (
                3,
                Entitlement {
                    prefixes: vec![net("10.1.0.0/16")],
                    workloads: None,
                    revoked: true,
                },
            ),
        ]
        .into_iter()
        .collect(),
    )
}

#[test]
fn claims_outside_the_proven_exporters_entitlement_are_refused_and_change_nothing() {
    let (mut core, now) = ready_core_with_an_owner();
    core.set_entitlements(Some(entitlements(false)));
    let owner_ip = "10.1.0.7".parse().unwrap();
    let before = core.history(owner_ip);
    let n = now.0;
    // Exporter 2, entitled to 10.1.0.8/29 as `svc`, claims exporter 1's 10.1.0.7, an idle
    // IP outside both, and one of its own under a name it may not use; the batch names
    // exporter 1 as its sender, which changes nothing: the credential says 2.
    let mut out = Vec::new();
    core.handle_message_from(
        5,
        Sender::ProvenExporter(2),
        batch(
            5,
            "a",
            Vec::new(),
            vec![
                claim("10.1.0.7", 1, n - 1_000, n),
                claim("10.1.0.200", 1, n - 1_000, n),
                claim("10.1.0.9", 0, n - 1_000, n),
                // Its own IP under its own name: taken.
                claim("10.1.0.10", 1, n - 1_000, n),
            ],
        ),
        now,
        &mut out,
    );
    assert_eq!(acks(&out), vec![AckStatus::Accepted]);
    assert_eq!(
        core.history(owner_ip),
        before,
        "the owner's ranges are unchanged"
    );
    assert!(core
        .history("10.1.0.200".parse().unwrap())
        .segments
        .is_empty());
    assert!(core
        .history("10.1.0.9".parse().unwrap())
        .segments
        .is_empty());
    assert_eq!(core.history("10.1.0.10".parse().unwrap()).segments.len(), 1);
    let rejected = &core.admission_stats().claims_rejected;
    assert_eq!(rejected.get(&Rejection::NotEntitled), Some(&3));
    // Flows to the owner's IP are still the owner's.
    let mut out = Vec::new();
    core.handle_message_from(
        6,
        Sender::ProvenExporter(2),
        batch(
            6,
            "a",
            vec![flow(11, "10.1.0.7", START + 2_000)],
            Vec::new(),
        ),
        now,
        &mut out,
    );
    assert_eq!(
        emitted(&out),
        vec![(
            11,
            Verdict::Attributed(Attribution::Heartbeat("gateway".into()))
        )]
    );
}

#[test]
fn a_revoked_credential_sends_nothing_and_the_others_are_unaffected() {
    let (mut core, now) = ready_core_with_an_owner();
    core.set_entitlements(Some(entitlements(false)));
    let n = now.0;
    for (conn, id) in [(7, 3), (8, 9)] {
        // Revoked (3), and unlisted (9: a key bound without an entitlement).
        let mut out = Vec::new();
        core.handle_message_from(
            conn,
            Sender::ProvenExporter(id),
            batch(
                conn,
                "a",
                vec![flow(u128::from(conn), "198.51.100.1", n - 100)],
                vec![claim("10.1.0.1", 1, n - 1_000, n)],
            ),
            now,
            &mut out,
        );
        assert_eq!(
            acks(&out),
            vec![AckStatus::Rejected(RejectReason::Revoked)],
            "exporter {id}"
        );
        assert!(emitted(&out).is_empty());
    }
    assert!(core
        .history("10.1.0.1".parse().unwrap())
        .segments
        .is_empty());
    assert_eq!(
        core.admission_stats()
            .messages_rejected
            .get(&Rejection::Revoked),
        Some(&2)
    );
    // Exporter 1 is revoked at a reload: its next batch is refused, exporter 2's is not.
    core.set_entitlements(Some(entitlements(true)));
    let mut out = Vec::new();
    core.handle_message_from(
        10,
        Sender::ProvenExporter(1),
        batch(
            10,
            "a",
            Vec::new(),
            vec![claim("10.1.0.1", 1, n - 1_000, n)],
        ),
        now,
        &mut out,
    );
    assert_eq!(acks(&out), vec![AckStatus::Rejected(RejectReason::Revoked)]);
    let mut out = Vec::new();
    core.handle_message_from(
        11,
        Sender::ProvenExporter(2),
        batch(
            11,
            "a",
            Vec::new(),
            vec![claim("10.1.0.11", 1, n - 1_000, n)],
        ),
        now,
        &mut out,
    );
    assert_eq!(acks(&out), vec![AckStatus::Accepted]);
    assert_eq!(core.history("10.1.0.11".parse().unwrap()).segments.len(), 1);
}

#[test]
fn the_exporter_key_cannot_send_peer_messages() {
    let (mut core, now) = ready_core_with_an_owner();
    let ip = "10.1.0.7".parse().unwrap();
    let before = core.history(ip);
    let snapshot = Message::RangeSnapshot(wire::RangeSnapshot {
        request_id: 1,
        region: "a".into(),
        last: true,
        ips: vec![wire::SnapshotIp {
            floor_ms: None,
            ip,
            segments: vec![wire::SnapshotSegment {
                start_ms: START,
                end_ms: START + 3_600_000,
                owner: wire::SnapshotOwner::Workload("mallory".into()),
            }],
        }],
    });
    let claims = Message::ClaimBatch(wire::ClaimBatch {
        batch_id: 5,
        dictionary: vec!["mallory".into()],
        claims: vec![claim("10.1.0.7", 0, now.0 - 1_000, now.0)],
    });
    let Message::FlowBatch(mut relayed) = batch(6, "a", Vec::new(), Vec::new()) else {
        unreachable!("batch() builds a flow batch")
    };
    relayed.hops = 1;
    relayed.claims = vec![claim("10.1.0.7", 1, now.0 - 1_000, now.0)];
    let mut out = Vec::new();
    for m in [snapshot, claims, Message::FlowBatch(relayed)] {
        core.handle_message_from(4, Sender::Exporter, m, now, &mut out);
    }
    assert_eq!(core.history(ip), before);
    assert_eq!(
        acks(&out),
        vec![
            AckStatus::Rejected(RejectReason::Invalid),
            AckStatus::Rejected(RejectReason::Invalid)
        ]
    );
    let refused = &core.admission_stats().messages_rejected;
    assert_eq!(refused.get(&Rejection::PeerOnly), Some(&2));
    assert_eq!(refused.get(&Rejection::Relayed), Some(&1));
}

#[test]
fn an_exporter_over_its_budget_is_told_busy_and_changes_nothing() {
    let mut core = core();
    core.set_admission(AdmissionConfig {
        exporter_claims_per_sec_max: 1,
        exporter_claims_burst_max: 2,
        exporter_flows_per_sec_max: 1,
        exporter_flows_burst_max: 3,
        ..AdmissionConfig::default()
    });
    let mut out = Vec::new();
    core.start(UnixMillis(START), &mut out);
    core.tick(UnixMillis(START + 3_500), &mut out);
    let now = UnixMillis(START + 5_000);
    let n = now.0;
    // Three empty batches use the flow budget (each batch costs one).
    for id in 0..3 {
        let mut out = Vec::new();
        core.handle_message_from(
            1,
            Sender::Exporter,
            batch(id, "a", Vec::new(), Vec::new()),
            now,
            &mut out,
        );
        assert_eq!(acks(&out), vec![AckStatus::Accepted], "batch {id}");
    }
    let mut out = Vec::new();
    let claims = vec![claim("10.1.0.8", 0, n - 1_000, n)];
    core.handle_message_from(
        1,
        Sender::Exporter,
        batch(9, "a", Vec::new(), claims),
        now,
        &mut out,
    );
    assert_eq!(
        acks(&out),
        vec![AckStatus::Busy {
            retry_after_ms: 500
        }]
    );
    assert_eq!(core.history("10.1.0.8".parse().unwrap()).segments.len(), 0);
    assert_eq!(
        core.admission_stats()
            .claims_rejected
            .get(&Rejection::RateLimited),
        Some(&1)
    );
    // Another exporter is not affected.
    let Message::FlowBatch(mut other) = batch(
        10,
        "a",
        Vec::new(),
        vec![claim("10.1.0.8", 0, n - 1_000, n)],
    ) else {
        unreachable!("batch() builds a flow batch")
    };
    other.exporter_id = 2;
    let mut out = Vec::new();
    core.handle_message_from(
        2,
        Sender::Exporter,
        Message::FlowBatch(other),
        now,
        &mut out,
    );
    assert_eq!(acks(&out), vec![AckStatus::Accepted]);
    assert_eq!(core.history("10.1.0.8".parse().unwrap()).segments.len(), 1);
}

fn forwarded(id: u64, flows: Vec<wire::Flow>) -> Message {
    let Message::FlowBatch(mut b) = batch(id, "a", flows, Vec::new()) else {
        unreachable!("batch() builds flow batches")
    };
    b.hops = 1;
    Message::FlowBatch(b)
}

#[test]
fn a_peer_re_sending_flows_we_hold_gets_its_ack_after_our_sync_and_no_second_copy() {
    let mut core = ready_core(START);
    let now = UnixMillis(START + 4_000);
    let flows = || {
        vec![
            flow(1, "10.1.0.9", START + 4_000),
            flow(2, "10.1.0.9", START + 4_000),
        ]
    };
    let mut out = Vec::new();
    core.handle_message(7, forwarded(70, flows()), now, &mut out);
    let ops = journal(&out);
    let [JournalOp::Append { id, .. }] = ops.as_slice() else {
        panic!("one append: {ops:?}");
    };
    let id = *id;

    // The peer's ack timed out; it sends the same flows again (a new batch id), and once
    // more with a new flow among them.
    let mut out = Vec::new();
    core.handle_message(7, forwarded(71, flows()), now, &mut out);
    assert!(journal(&out).is_empty(), "nothing new to journal");
    assert!(acks(&out).is_empty(), "the first append is not durable yet");
    let mut more = flows();
    more.push(flow(3, "10.1.0.9", START + 4_000));
    core.handle_message(7, forwarded(72, more), now, &mut out);
    let ops = journal(&out);
    let [JournalOp::Append { id: id3, record }] = ops.as_slice() else {
        panic!("one append for the new flow: {ops:?}");
    };
    assert_eq!(
        decoded(record)
            .iter()
            .map(|f| f.flow_id)
            .collect::<Vec<_>>(),
        vec![3]
    );
    assert_eq!(core.stats().flows_already_held, 4);

    // The first sync acks the original and its copy; the mixed batch waits for its own.
    let mut out = Vec::new();
    core.journal_synced(id, now, &mut out);
    assert_eq!(acks(&out), vec![AckStatus::Accepted, AckStatus::Accepted]);
    let mut out = Vec::new();
    core.journal_synced(*id3, now, &mut out);
    assert_eq!(acks(&out), vec![AckStatus::Accepted]);

    // A copy arriving once everything is durable is acked at once.
    let mut out = Vec::new();
    core.handle_message(7, forwarded(73, flows()), now, &mut out);
    assert_eq!(acks(&out), vec![AckStatus::Accepted]);
    assert!(journal(&out).is_empty());

    // Each flow goes out once, at its deadline.
    let mut out = Vec::new();
    core.tick(UnixMillis(START + 7_000), &mut out);
    let mut ids: Vec<u128> = emitted(&out).into_iter().map(|(id, _)| id).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2, 3]);

    // An exporter's batch is never matched against what peers sent: it is taken.
    let mut out = Vec::new();
    core.handle_message(8, batch(80, "a", flows(), Vec::new()), now, &mut out);
    assert_eq!(journal(&out).len(), 1, "an exporter's flows are journaled");
}

/// Two collectors of region `a` (R = 1: each owns about half of the IPs) joined through
/// their gossip, which this carries by hand; data-plane frames are kept for the test.
struct Pair {
    cores: [NodeCore; 2],
    now: u64,
    timers: Vec<(u64, usize, tenure_gossip::membership::Timer)>,
}

impl Pair {
    fn joined() -> Pair {
        let addrs: [SocketAddr; 2] = [
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.2:1".parse().unwrap(),
        ];
        let mut pair = Pair {
            cores: [
                core_of("a0", addrs[0], vec![addrs[1]], 7),
                core_of("a1", addrs[1], vec![addrs[0]], 8),
            ],
            now: START,
            timers: Vec::new(),
        };
        for i in 0..2 {
            let mut out = Vec::new();
            pair.cores[i].start(UnixMillis(START), &mut out);
            pair.carry(i, out);
        }
        while pair.cores.iter().any(|c| c.ring().members().len() < 2) {
            assert!(
                pair.now < START + 30_000,
                "the two cores never saw each other"
            );
            pair.advance(10);
        }
        pair
    }

    /// Carries core `from`'s gossip and timers; returns its other outputs.
    fn carry(&mut self, from: usize, out: Vec<Output>) -> Vec<Output> {
        let mut rest = Vec::new();
        let mut queue: Vec<(usize, Vec<Output>)> = vec![(from, out)];
        while let Some((from, out)) = queue.pop() {
            for o in out {
                match o {
                    Output::Datagram { to, bytes } => {
                        let Some(to) = self
                            .cores
                            .iter()
                            .position(|c| c.identity().gossip_addr() == to)
                        else {
                            continue;
                        };
                        let sender = self.cores[from].identity().gossip_addr();
                        let mut reply = Vec::new();
                        let _ = self.cores[to].handle_datagram(
                            sender,
                            &bytes,
                            UnixMillis(self.now),
                            &mut reply,
                        );
                        queue.push((to, reply));
                    }
                    Output::Timer { after_ms, timer } => {
                        self.timers.push((self.now + after_ms, from, timer))
                    }
                    // The test looks at core 0's other outputs only.
                    other @ (Output::Frame { .. }
                    | Output::Emit(_)
                    | Output::Notice(_)
                    | Output::Journal(_)) => {
                        if from == 0 {
                            rest.push(other);
                        }
                    }
                }
            }
        }
        rest
    }

    /// Moves the clock `ms` on: fires due timers and ticks both cores each 100 ms. Returns
    /// core 0's outputs other than gossip.
    fn advance(&mut self, ms: u64) -> Vec<Output> {
        let mut rest = Vec::new();
        let end = self.now + ms;
        while self.now < end {
            self.now += 10;
            let (due, later) = std::mem::take(&mut self.timers)
                .into_iter()
                .partition(|(at, _, _)| *at <= self.now);
            self.timers = later;
            for (_, i, timer) in due {
                let mut out = Vec::new();
                self.cores[i].handle_timer(timer, UnixMillis(self.now), &mut out);
                rest.extend(self.carry(i, out));
            }
            if self.now.is_multiple_of(super::TICK_INTERVAL_MS) {
                for i in 0..2 {
                    let mut out = Vec::new();
                    self.cores[i].tick(UnixMillis(self.now), &mut out);
                    rest.extend(self.carry(i, out));
                }
            }
        }
        rest
    }
}

/// The flow batches in `out` sent to node `to`: (exporter, flow ids).
fn batches_to(out: &[Output], to: &str) -> Vec<(u64, Vec<u128>)> {
    out.iter()
        .filter_map(|o| {
            let Output::Frame {
                to: super::Dest::Peer { node_id, .. },
                message: Message::FlowBatch(b),
            } = o
            else {
                return None;
            };
            (node_id == to).then(|| (b.exporter_id, b.flows.iter().map(|f| f.flow_id).collect()))
        })
        .collect()
}

#[test]
fn flows_for_a_peer_are_gathered_until_the_tick_and_routed_again_when_it_leaves() {
    let mut pair = Pair::joined();
    // Remote IPs the other core owns.
    let theirs: Vec<String> = (0..=255)
        .map(|i| format!("10.1.3.{i}"))
        .filter(|ip| pair.cores[0].owners_of(ip.parse().unwrap())[0].node_id() == "a1")
        .take(6)
        .collect();
    assert_eq!(theirs.len(), 6, "a1 owns some of 10.1.3.0/24");
    let at = pair.now;
    let flows_to = |ids: std::ops::Range<u128>| -> Vec<wire::Flow> {
        ids.map(|id| flow(id, &theirs[id as usize % theirs.len()], at))
            .collect()
    };

    // Three exporter batches in one tick interval: nothing goes to a1 yet; the flows are
    // unsettled, not lost.
    let mut out = Vec::new();
    let unsettled = pair.cores[0].unsettled_flows();
    for (n, ids) in [(1, 0..4), (2, 4..8), (3, 8..12)] {
        pair.cores[0].handle_message_from(
            n,
            Sender::Exporter,
            batch(n, "a", flows_to(ids), Vec::new()),
            UnixMillis(at),
            &mut out,
        );
    }
    assert!(
        batches_to(&out, "a1").is_empty(),
        "{:?}",
        batches_to(&out, "a1")
    );
    assert_eq!(pair.cores[0].outbox_len(), 12);
    assert_eq!(pair.cores[0].unsettled_flows(), unsettled + 12);

    // At the next tick: one batch (they share an exporter) with all twelve.
    let out = pair.advance(super::TICK_INTERVAL_MS);
    let sent = batches_to(&out, "a1");
    assert_eq!(sent.len(), 1, "{sent:?}");
    let mut ids = sent[0].1.clone();
    ids.sort_unstable();
    assert_eq!(ids, (0..12).collect::<Vec<u128>>());
    assert_eq!(pair.cores[0].outbox_len(), 0);
    assert_eq!(
        pair.cores[0].inflight_len(),
        12,
        "in flight until a1 acknowledges"
    );

    // Gathered again, then a1 leaves before the tick: a0 owns every IP now, keeps the
    // flows and sends a1 nothing.
    let mut out = Vec::new();
    pair.cores[0].handle_message_from(
        4,
        Sender::Exporter,
        batch(4, "a", flows_to(12..18), Vec::new()),
        UnixMillis(pair.now),
        &mut out,
    );
    assert_eq!(pair.cores[0].outbox_len(), 6);
    let mut left = Vec::new();
    pair.cores[1].leave(UnixMillis(pair.now), &mut left);
    pair.carry(1, left);
    let out = pair.advance(10 * super::TICK_INTERVAL_MS);
    assert_eq!(pair.cores[0].ring().members().len(), 1, "a1 left a0's ring");
    assert_eq!(pair.cores[0].outbox_len(), 0);
    assert!(
        batches_to(&out, "a1")
            .iter()
            .all(|(_, ids)| ids.iter().all(|id| *id < 12)),
        "flows gathered for a1 after it left were routed again: {:?}",
        batches_to(&out, "a1")
    );
}

#[test]
fn a_clock_stepped_forward_and_back_does_not_hold_forwarded_flows_for_the_step() {
    let mut pair = Pair::joined();
    let theirs: Vec<String> = (0..=255)
        .map(|i| format!("10.1.3.{i}"))
        .filter(|ip| pair.cores[0].owners_of(ip.parse().unwrap())[0].node_id() == "a1")
        .take(4)
        .collect();
    assert_eq!(theirs.len(), 4, "a1 owns some of 10.1.3.0/24");
    let real = pair.now;
    let flows: Vec<wire::Flow> = (0..4u128)
        .map(|id| flow(id, &theirs[id as usize], real))
        .collect();
    // a0's clock runs 100 s ahead while it takes the batch and forwards it to a1.
    let ahead = UnixMillis(real + 100_000);
    let mut out = Vec::new();
    pair.cores[0].handle_message_from(
        1,
        Sender::Exporter,
        batch(1, "a", flows, Vec::new()),
        ahead,
        &mut out,
    );
    pair.cores[0].tick(ahead, &mut out);
    let out = pair.carry(0, out);
    assert_eq!(batches_to(&out, "a1").len(), 1, "forwarded to a1");
    assert_eq!(pair.cores[0].inflight_len(), 4);
    // The clock is set right; a1 never acknowledges. The ack timeout (1 s) counts the
    // time that passed since the send, not the wrong clock's reading of it.
    let out = pair.advance(2_000);
    let again = batches_to(&out, "a1");
    assert!(
        again.iter().any(|(_, ids)| ids.len() == 4),
        "sent again within 2 s of real time: {again:?}"
    );
}

/// An exporter batch of `exporter_id` stamped `sent_ms`.
fn stamped(
    id: u64,
    exporter_id: u64,
    sent_ms: u64,
    flows: Vec<wire::Flow>,
    claims: Vec<wire::Claim>,
) -> Message {
    let Message::FlowBatch(mut b) = batch(id, "a", flows, claims) else {
        unreachable!("batch builds a flow batch")
    };
    b.exporter_id = exporter_id;
    b.sent_ms = sent_ms;
    Message::FlowBatch(b)
}

#[test]
fn an_exporter_whose_clock_is_far_off_the_fleets_has_its_claims_refused_and_flows_unattributed() {
    let (mut core, now) = ready_core_with_an_owner();
    let ip = "10.1.0.7".parse().unwrap();
    let before = core.history(ip);
    let n = now.0;
    // Three exporters agree (within δ, 100 ms here; the collector's own clock is
    // irrelevant).
    for (exporter, off) in [(11u64, 0i64), (12, 60), (13, -40)] {
        let mut out = Vec::new();
        core.handle_message_from(
            exporter,
            Sender::Exporter,
            stamped(
                exporter,
                exporter,
                n.saturating_add_signed(off),
                Vec::new(),
                Vec::new(),
            ),
            now,
            &mut out,
        );
        assert_eq!(acks(&out), vec![AckStatus::Accepted]);
        assert_eq!(
            core.stats().batches_clock_off,
            0,
            "exporter {exporter} agrees"
        );
    }
    // A fourth, whose clock was stepped back 90 s: its flow to the owner's IP would be
    // looked up 90 s early, and its claim restates a tenure on the wrong clock.
    let back = n - 90_000;
    let mut out = Vec::new();
    core.handle_message_from(
        14,
        Sender::Exporter,
        stamped(
            14,
            14,
            back,
            vec![flow(21, "10.1.0.7", START + 2_000)],
            vec![claim("10.1.0.7", 1, back - 1_000, back)],
        ),
        now,
        &mut out,
    );
    assert_eq!(
        emitted(&out),
        vec![(21, Verdict::Unattributed(Reason::ExporterClock))]
    );
    assert_eq!(core.history(ip), before, "its claim reached no range");
    assert_eq!(
        core.admission_stats()
            .claims_rejected
            .get(&Rejection::ExporterClock),
        Some(&1)
    );
    assert_eq!(core.stats().batches_clock_off, 1);
    // Journaled and acknowledged like any other: nothing is lost.
    assert!(
        matches!(journal(&out).first(), Some(JournalOp::Append { .. })),
        "{:?}",
        journal(&out)
    );
    let mut out = Vec::new();
    core.journal_synced(u64::MAX, now, &mut out);
    assert_eq!(acks(&out), vec![AckStatus::Accepted]);
}
