//! Scenarios of the core driven by hand: no sockets, no clock.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};

use tenure_attribution::{Attribution, EngineConfig, Reason, UnixMillis, Verdict};
use tenure_gossip::handoff::HandoffConfig;
use tenure_gossip::identity::NodeIdentity;
use tenure_gossip::ring::RingConfig;
use tenure_gossip::wire::{self, AckStatus, Direction, Message, RejectReason};

use super::{CoreConfig, NodeCore, Output};

const START: u64 = 1_700_000_000_000;

fn core() -> NodeCore {
    let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let identity = NodeIdentity::new("a0", "a", addr, addr, 1).unwrap();
    let config = CoreConfig {
        identity,
        seeds: Vec::new(),
        rng_seed: 7,
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
    NodeCore::new(config, UnixMillis(START)).unwrap()
}

fn flow(id: u128, remote: &str, start_ms: u64) -> wire::Flow {
    wire::Flow {
        flow_id: id,
        start_ms,
        end_ms: start_ms + 10,
        bytes_sent: 1,
        bytes_received: 1,
        packets: 2,
        retransmits: 0,
        local_workload: 0,
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
            | Output::Notice(_) => None,
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
            | Output::Notice(_) => None,
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
