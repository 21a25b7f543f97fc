//! Property tests over the whole path a message takes: encode → seal → frame → unframe →
//! open → validate → read. Every message kind round-trips to an equal value; any flipped
//! bit, any truncation, any replay and any foreign key is refused, and a refused frame
//! leaves the receiver able to accept the genuine one.
//!
//! Case counts: `PROPTEST_CASES` (default 1,000 per property).

use std::net::IpAddr;

use proptest::collection::vec;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tenure_attribution::{IpRanges, SegmentOwner, SegmentSnapshot, UnixMillis};
use tenure_gossip::frame::{encode_frame_with, FrameDecoder, FrameError, FrameLimits};
use tenure_gossip::seal::{Channel, Keyring, Opener, OpenerConfig, SealError, Sealer, SecretKey};
use tenure_gossip::wire::{
    self, Ack, AckStatus, AlignedVec, Claim, ClaimBatch, Direction, Flow, FlowBatch, HashSpan,
    IpEvent, IpEventBatch, IpEventKind, LocalEnd, LocalReason, Message, Prefix, RangeRequest,
    RangeSnapshot, RegionDirectory, RegionPrefixes, RejectReason, SnapshotIp, SnapshotOwner,
    SnapshotSegment, WireError, WireLimits,
};

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000);
    ProptestConfig::with_cases(cases)
}

// ---- strategies -------------------------------------------------------------------------

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u8; 16]>().prop_map(IpAddr::from),
    ]
}

fn name() -> impl Strategy<Value = String> {
    // Any printable text, multi-byte included, within every name limit (40 chars × 4 bytes).
    "\\PC{0,40}"
}

fn region() -> impl Strategy<Value = String> {
    "[a-z0-9-]{0,64}"
}

fn window() -> impl Strategy<Value = (u64, u64)> {
    (any::<u64>(), any::<u64>()).prop_map(|(a, b)| (a.min(b), a.max(b)))
}

fn dictionary() -> impl Strategy<Value = Vec<String>> {
    vec(name(), 1..6)
}

fn claim(entries: u32) -> impl Strategy<Value = Claim> {
    (ip(), 0..entries, any::<u64>(), window()).prop_map(
        |(ip, workload, instance, (since_ms, until_ms))| Claim {
            ip,
            workload,
            instance,
            since_ms,
            until_ms,
        },
    )
}

fn flow(entries: u32) -> impl Strategy<Value = Flow> {
    (
        (
            any::<u128>(),
            window(),
            any::<[u64; 5]>(),
            prop_oneof![
                (0..entries).prop_map(LocalEnd::Workload),
                proptest::sample::select(LocalReason::ALL.to_vec())
                    .prop_map(LocalEnd::Unattributed),
            ],
            any::<u32>(),
        ),
        (ip(), ip(), any::<[u16; 2]>(), any::<bool>(), any::<bool>()),
    )
        .prop_map(
            |(
                (flow_id, (start_ms, end_ms), counts, local, rtt_us),
                (local_ip, remote_ip, ports, inbound, ongoing),
            )| {
                Flow {
                    flow_id,
                    start_ms,
                    end_ms,
                    bytes_sent: counts[0],
                    bytes_received: counts[1],
                    segs_in: counts[2],
                    segs_out: counts[3],
                    retransmits: counts[4],
                    local,
                    rtt_us,
                    local_ip,
                    remote_ip,
                    local_port: ports[0],
                    remote_port: ports[1],
                    direction: if inbound {
                        Direction::Inbound
                    } else {
                        Direction::Outbound
                    },
                    ongoing,
                }
            },
        )
}

fn claim_batch() -> impl Strategy<Value = Message> {
    (any::<u64>(), dictionary()).prop_flat_map(|(batch_id, dictionary)| {
        let entries = dictionary.len() as u32;
        vec(claim(entries), 0..12).prop_map(move |claims| {
            Message::ClaimBatch(ClaimBatch {
                batch_id,
                dictionary: dictionary.clone(),
                claims,
            })
        })
    })
}

fn flow_batch() -> impl Strategy<Value = Message> {
    (any::<(u64, u64, u8, u64)>(), region(), dictionary()).prop_flat_map(
        |((batch_id, exporter_id, hops, sent_ms), region, dictionary)| {
            let entries = dictionary.len() as u32;
            (vec(flow(entries), 0..12), vec(claim(entries), 0..6)).prop_map(
                move |(flows, claims)| {
                    Message::FlowBatch(FlowBatch {
                        batch_id,
                        exporter_id,
                        hops,
                        sent_ms,
                        region: region.clone(),
                        dictionary: dictionary.clone(),
                        flows,
                        claims,
                    })
                },
            )
        },
    )
}

fn ip_event_batch() -> impl Strategy<Value = Message> {
    let event =
        (any::<u64>(), ip(), any::<bool>(), name()).prop_map(|(at_ms, ip, assign, owner)| {
            IpEvent {
                at_ms,
                ip,
                kind: if assign {
                    IpEventKind::Assign
                } else {
                    IpEventKind::Unassign
                },
                owner,
            }
        });
    (any::<u64>(), any::<u64>(), vec(event, 0..12)).prop_map(|(batch_id, watermark_ms, events)| {
        Message::IpEventBatch(IpEventBatch {
            batch_id,
            watermark_ms,
            events,
        })
    })
}

/// Segments sorted and disjoint, built from gaps and lengths.
fn segments() -> impl Strategy<Value = Vec<SnapshotSegment>> {
    (
        0u64..1 << 50,
        vec(
            (1u64..1 << 30, 0u64..1 << 30, proptest::option::of(name())),
            0..8,
        ),
    )
        .prop_map(|(mut at, parts)| {
            parts
                .into_iter()
                .map(|(gap, len, owner)| {
                    let start_ms = at + gap;
                    at = start_ms + len;
                    SnapshotSegment {
                        start_ms,
                        end_ms: at,
                        owner: owner.map_or(SnapshotOwner::Conflict, SnapshotOwner::Workload),
                    }
                })
                .collect()
        })
}

fn snapshot_ip() -> impl Strategy<Value = SnapshotIp> {
    (proptest::option::of(any::<u64>()), ip(), segments()).prop_map(|(floor_ms, ip, segments)| {
        SnapshotIp {
            floor_ms,
            ip,
            segments,
        }
    })
}

fn range_snapshot() -> impl Strategy<Value = Message> {
    (
        any::<u64>(),
        region(),
        any::<bool>(),
        vec(snapshot_ip(), 0..6),
    )
        .prop_map(|(request_id, region, last, ips)| {
            Message::RangeSnapshot(RangeSnapshot {
                request_id,
                region,
                last,
                ips,
            })
        })
}

fn range_request() -> impl Strategy<Value = Message> {
    let span = any::<(u64, u64)>().prop_map(|(start_hash, end_hash)| HashSpan {
        start_hash,
        end_hash,
    });
    (any::<u64>(), region(), vec(span, 0..12)).prop_map(|(request_id, region, spans)| {
        Message::RangeRequest(RangeRequest {
            request_id,
            region,
            spans,
        })
    })
}

fn ack() -> impl Strategy<Value = Message> {
    let status = prop_oneof![
        Just(AckStatus::Accepted),
        Just(AckStatus::Rejected(RejectReason::Invalid)),
        Just(AckStatus::Rejected(RejectReason::WrongRegion)),
        Just(AckStatus::Rejected(RejectReason::TooManyHops)),
        Just(AckStatus::Rejected(RejectReason::Revoked)),
        any::<u64>().prop_map(|retry_after_ms| AckStatus::Busy { retry_after_ms }),
    ];
    (any::<u64>(), status).prop_map(|(batch_id, status)| Message::Ack(Ack { batch_id, status }))
}

fn region_directory() -> impl Strategy<Value = Message> {
    let prefix = prop_oneof![
        (any::<[u8; 4]>(), 0u8..=32).prop_map(|(a, len)| Prefix {
            addr: IpAddr::from(a),
            len
        }),
        (any::<[u8; 16]>(), 0u8..=128).prop_map(|(a, len)| Prefix {
            addr: IpAddr::from(a),
            len
        }),
    ];
    let entry =
        (any::<u64>(), region(), vec(prefix, 0..6)).prop_map(|(version, region, prefixes)| {
            RegionPrefixes {
                version,
                region,
                prefixes,
            }
        });
    (any::<u64>(), vec(entry, 0..5)).prop_map(|(version, regions)| {
        Message::RegionDirectory(RegionDirectory { version, regions })
    })
}

fn any_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        claim_batch(),
        flow_batch(),
        ip_event_batch(),
        range_snapshot(),
        range_request(),
        ack(),
        region_directory(),
    ]
}

// ---- the path ---------------------------------------------------------------------------

const SENDER_ID: u64 = 77;
const EPOCH: u64 = 3;

struct Peer {
    sender_ring: Keyring,
    receiver_ring: Keyring,
    sealer: Sealer,
    opener: Opener,
    rng: StdRng,
}

impl Peer {
    fn new(seed: u64) -> Self {
        let key = SecretKey::from_bytes([0x5A; 32]);
        Peer {
            sender_ring: Keyring::new(1, &key),
            receiver_ring: Keyring::new(1, &key),
            sealer: Sealer::new(Channel::Data, SENDER_ID, EPOCH),
            opener: Opener::new(OpenerConfig::default()),
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// encode → seal → frame.
    fn send(&mut self, message: &Message) -> Vec<u8> {
        let plain = wire::encode(message).expect("a generated message is within the limits");
        let mut frame = Vec::new();
        encode_frame_with::<Refused, _>(
            &mut frame,
            FrameLimits::default().frame_bytes_max,
            |out| {
                self.sealer
                    .seal(&self.sender_ring, &mut self.rng, &plain, out)
                    .map_err(Refused::Seal)
            },
        )
        .expect("sealing fits a frame");
        frame
    }

    /// unframe → open → validate → copy out. `Ok(None)` when the bytes hold no complete
    /// frame; an error from whichever layer refused them.
    fn receive(&mut self, bytes: &[u8]) -> Result<Option<Message>, Refused> {
        let mut decoder = FrameDecoder::new(FrameLimits::default());
        let mut input = bytes;
        let Some(body) = decoder.decode(&mut input).map_err(Refused::Frame)? else {
            return Ok(None);
        };
        let mut plain = AlignedVec::new();
        self.opener
            .open(&self.receiver_ring, Channel::Data, body, &mut plain)
            .map_err(Refused::Seal)?;
        let archived = wire::decode(&plain, &WireLimits::default()).map_err(Refused::Wire)?;
        Ok(Some(wire::to_owned(archived).map_err(Refused::Wire)?))
    }
}

impl From<FrameError> for Refused {
    fn from(e: FrameError) -> Self {
        Refused::Frame(e)
    }
}

#[derive(Debug)]
#[allow(
    dead_code,
    reason = "the fields are read through Debug in failure messages"
)]
enum Refused {
    Frame(FrameError),
    Seal(SealError),
    Wire(WireError),
}

fn round_trips(message: Message, seed: u64) -> Result<(), TestCaseError> {
    let mut peer = Peer::new(seed);
    let frame = peer.send(&message);
    let received = peer.receive(&frame).expect("a genuine frame is accepted");
    prop_assert_eq!(received, Some(message));
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn claim_batches_round_trip(message in claim_batch(), seed in any::<u64>()) {
        round_trips(message, seed)?;
    }

    #[test]
    fn flow_batches_round_trip(message in flow_batch(), seed in any::<u64>()) {
        round_trips(message, seed)?;
    }

    #[test]
    fn ip_event_batches_round_trip(message in ip_event_batch(), seed in any::<u64>()) {
        round_trips(message, seed)?;
    }

    #[test]
    fn range_snapshots_round_trip(message in range_snapshot(), seed in any::<u64>()) {
        round_trips(message, seed)?;
    }

    #[test]
    fn range_requests_round_trip(message in range_request(), seed in any::<u64>()) {
        round_trips(message, seed)?;
    }

    #[test]
    fn acks_round_trip(message in ack(), seed in any::<u64>()) {
        round_trips(message, seed)?;
    }

    #[test]
    fn region_directories_round_trip(message in region_directory(), seed in any::<u64>()) {
        round_trips(message, seed)?;
    }

    #[test]
    fn any_flipped_bit_is_refused_and_changes_nothing(
        message in any_message(),
        seed in any::<u64>(),
        bit in any::<proptest::sample::Index>(),
    ) {
        let mut peer = Peer::new(seed);
        let frame = peer.send(&message);
        let mut flipped = frame.clone();
        let bit = bit.index(frame.len() * 8);
        flipped[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(
            !matches!(peer.receive(&flipped), Ok(Some(_))),
            "bit {} of {} flipped and accepted", bit, frame.len() * 8
        );
        // The refusal left no trace: the genuine frame is still accepted (not a replay).
        prop_assert_eq!(peer.receive(&frame).expect("genuine"), Some(message));
    }

    #[test]
    fn any_truncation_is_refused_and_changes_nothing(
        message in any_message(),
        seed in any::<u64>(),
        cut in any::<proptest::sample::Index>(),
    ) {
        let mut peer = Peer::new(seed);
        let frame = peer.send(&message);
        let cut = cut.index(frame.len());
        // As a stream: the decoder waits for the rest and yields nothing.
        prop_assert!(matches!(peer.receive(&frame[..cut]), Ok(None)));
        // As an envelope cut anywhere (its own length unknown to the opener): refused.
        let body = &frame[tenure_gossip::frame::FRAME_HEADER_BYTES..];
        let body_cut = cut.min(body.len() - 1);
        let mut plain = AlignedVec::new();
        prop_assert!(peer.opener.open(&peer.receiver_ring, Channel::Data, &body[..body_cut], &mut plain).is_err());
        prop_assert_eq!(peer.receive(&frame).expect("genuine"), Some(message));
    }

    #[test]
    fn a_replayed_frame_is_refused(message in any_message(), seed in any::<u64>()) {
        let mut peer = Peer::new(seed);
        let frame = peer.send(&message);
        prop_assert_eq!(peer.receive(&frame).expect("first delivery"), Some(message));
        let replay = peer.receive(&frame);
        prop_assert!(
            matches!(replay, Err(Refused::Seal(SealError::Replayed { sender_id: SENDER_ID, epoch: EPOCH, counter: 0 }))),
            "{:?}", replay
        );
    }

    #[test]
    fn a_frame_sealed_with_a_key_outside_the_ring_is_refused(
        message in any_message(),
        seed in any::<u64>(),
        key_id in 2u32..,
        key in any::<[u8; 32]>(),
    ) {
        let mut peer = Peer::new(seed);
        peer.sender_ring = Keyring::new(key_id, &SecretKey::from_bytes(key));
        let frame = peer.send(&message);
        let refused = peer.receive(&frame);
        prop_assert!(matches!(refused, Err(Refused::Seal(SealError::UnknownKey { key_id: k })) if k == key_id), "{:?}", refused);
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in vec(any::<u8>(), 0..512)) {
        let mut aligned = AlignedVec::new();
        aligned.extend_from_slice(&bytes);
        let _ = wire::decode(&aligned, &WireLimits::default());
    }

    #[test]
    fn decoding_a_corrupted_archive_never_panics(
        message in any_message(),
        edits in vec((any::<proptest::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = wire::encode(&message).expect("valid");
        for (at, value) in edits {
            let at = at.index(bytes.len());
            bytes.as_mut_slice()[at] = value;
        }
        if let Ok(archived) = wire::decode(&bytes, &WireLimits::default()) {
            // Whatever passed validation must be readable in full.
            let _ = wire::to_owned(archived).expect("a validated archive deserializes");
        }
    }

    #[test]
    fn snapshots_convert_to_engine_ranges_and_back(ip in snapshot_ip()) {
        let ranges = IpRanges::try_from(ip.clone()).expect("generated segments are ordered");
        prop_assert_eq!(SnapshotIp::from(&ranges), ip);
    }
}

// ---- limits and semantic checks ---------------------------------------------------------

fn flow_batch_with(flows: usize, dictionary: usize) -> FlowBatch {
    FlowBatch {
        batch_id: 1,
        exporter_id: 2,
        hops: 0,
        sent_ms: 0,
        region: "eu-west-1".to_owned(),
        dictionary: (0..dictionary).map(|i| format!("workload-{i}")).collect(),
        flows: (0..flows)
            .map(|i| Flow {
                flow_id: i as u128,
                start_ms: 1,
                end_ms: 2,
                bytes_sent: 3,
                bytes_received: 4,
                segs_in: 2,
                segs_out: 3,
                retransmits: 0,
                local: LocalEnd::Workload(0),
                rtt_us: 0,
                local_ip: IpAddr::from([10, 0, 0, 1]),
                remote_ip: IpAddr::from([10, 0, 0, 2]),
                local_port: 1234,
                remote_port: 443,
                direction: Direction::Outbound,
                ongoing: false,
            })
            .collect(),
        claims: Vec::new(),
    }
}

#[test]
fn oversized_batches_are_refused_on_encode_and_on_decode() {
    let strict = WireLimits {
        flows_per_batch_max: 3,
        ..WireLimits::default()
    };
    let message = Message::FlowBatch(flow_batch_with(4, 1));
    let mut buffer = AlignedVec::new();
    assert!(matches!(
        wire::encode_into(&message, &strict, &mut buffer),
        Err(WireError::OverLimit {
            limit: wire::Limit::FlowsPerBatch,
            value: 4,
            max: 3
        })
    ));
    assert!(buffer.is_empty());
    let bytes = wire::encode(&message).expect("within the default limits");
    assert!(matches!(
        wire::decode(&bytes, &strict),
        Err(WireError::OverLimit {
            limit: wire::Limit::FlowsPerBatch,
            ..
        })
    ));
}

#[test]
fn each_named_limit_is_enforced() {
    let long = "x".repeat(300);
    let cases: Vec<(Message, wire::Limit)> = vec![
        (
            Message::FlowBatch(flow_batch_with(1, 4097)),
            wire::Limit::DictionaryEntries,
        ),
        (
            Message::FlowBatch(FlowBatch {
                dictionary: vec![long.clone()],
                ..flow_batch_with(1, 1)
            }),
            wire::Limit::WorkloadNameBytes,
        ),
        (
            Message::FlowBatch(FlowBatch {
                region: long.clone(),
                ..flow_batch_with(1, 1)
            }),
            wire::Limit::RegionNameBytes,
        ),
        (
            Message::IpEventBatch(IpEventBatch {
                batch_id: 0,
                watermark_ms: 0,
                events: vec![IpEvent {
                    at_ms: 0,
                    ip: IpAddr::from([1, 1, 1, 1]),
                    kind: IpEventKind::Assign,
                    owner: long.clone(),
                }],
            }),
            wire::Limit::OwnerNameBytes,
        ),
        (
            Message::RangeRequest(RangeRequest {
                request_id: 0,
                region: String::new(),
                spans: vec![
                    HashSpan {
                        start_hash: 0,
                        end_hash: 1
                    };
                    4097
                ],
            }),
            wire::Limit::SpansPerRequest,
        ),
    ];
    for (message, limit) in cases {
        match wire::encode(&message) {
            Err(WireError::OverLimit { limit: found, .. }) => assert_eq!(found, limit),
            other => panic!("expected {limit} to be exceeded, got {other:?}"),
        }
    }
}

#[test]
fn bad_indices_windows_segments_and_prefixes_are_refused() {
    let mut bad_index = flow_batch_with(1, 1);
    bad_index.flows[0].local = LocalEnd::Workload(1);
    assert!(matches!(
        wire::encode(&Message::FlowBatch(bad_index)),
        Err(WireError::BadIndex {
            index: 1,
            entries: 1
        })
    ));

    let mut inverted = flow_batch_with(1, 1);
    inverted.claims.push(Claim {
        ip: IpAddr::from([1, 2, 3, 4]),
        workload: 0,
        instance: 1,
        since_ms: 10,
        until_ms: 9,
    });
    assert!(matches!(
        wire::encode(&Message::FlowBatch(inverted)),
        Err(WireError::InvertedWindow {
            start_ms: 10,
            end_ms: 9
        })
    ));

    let overlapping = SnapshotIp {
        floor_ms: None,
        ip: IpAddr::from([1, 2, 3, 4]),
        segments: vec![
            SnapshotSegment {
                start_ms: 0,
                end_ms: 10,
                owner: SnapshotOwner::Conflict,
            },
            SnapshotSegment {
                start_ms: 10,
                end_ms: 20,
                owner: SnapshotOwner::Workload("w".to_owned()),
            },
        ],
    };
    assert!(matches!(
        IpRanges::try_from(overlapping.clone()),
        Err(WireError::UnsortedSegments { start_ms: 10, .. })
    ));
    assert!(matches!(
        wire::encode(&Message::RangeSnapshot(RangeSnapshot {
            request_id: 0,
            region: String::new(),
            last: true,
            ips: vec![overlapping],
        })),
        Err(WireError::UnsortedSegments { .. })
    ));

    let too_long = Prefix {
        addr: IpAddr::from([10, 0, 0, 0]),
        len: 33,
    };
    assert!(matches!(
        ipnet::IpNet::try_from(too_long),
        Err(WireError::BadPrefix { len: 33, .. })
    ));
    assert!(matches!(
        wire::encode(&Message::RegionDirectory(RegionDirectory {
            version: 1,
            regions: vec![RegionPrefixes {
                version: 1,
                region: "r".to_owned(),
                prefixes: vec![too_long],
            }],
        })),
        Err(WireError::BadPrefix { .. })
    ));
}

#[test]
fn misaligned_input_is_refused_not_copied() {
    let bytes = wire::encode(&Message::Ack(Ack {
        batch_id: 1,
        status: AckStatus::Accepted,
    }))
    .expect("valid");
    let mut shifted = AlignedVec::new();
    shifted.push(0);
    shifted.extend_from_slice(&bytes);
    assert!(matches!(
        wire::decode(&shifted[1..], &WireLimits::default()),
        Err(WireError::Misaligned { offset_bytes: 1 })
    ));
}

#[test]
fn engine_ranges_convert_to_the_wire_and_back() {
    let ranges = IpRanges {
        ip: IpAddr::from([10, 1, 2, 3]),
        floor: Some(UnixMillis(5)),
        segments: vec![
            SegmentSnapshot {
                owner: SegmentOwner::Workload("checkout".to_owned()),
                start: UnixMillis(10),
                end: UnixMillis(20),
            },
            SegmentSnapshot {
                owner: SegmentOwner::Conflict,
                start: UnixMillis(21),
                end: UnixMillis(30),
            },
        ],
    };
    let message = Message::RangeSnapshot(RangeSnapshot {
        request_id: 9,
        region: "us-east-1".to_owned(),
        last: true,
        ips: vec![SnapshotIp::from(&ranges)],
    });
    let bytes = wire::encode(&message).expect("valid");
    let archived = wire::decode(&bytes, &WireLimits::default()).expect("valid");
    let wire::ArchivedMessage::RangeSnapshot(snapshot) = archived else {
        panic!("a range snapshot was sent, got {archived:?}");
    };
    let read = IpRanges::try_from(&snapshot.ips[0]).expect("validated");
    assert_eq!(read, ranges);
    assert_eq!(
        IpRanges::try_from(SnapshotIp::from(ranges.clone())).expect("ordered"),
        ranges
    );
}
