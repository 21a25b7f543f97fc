//! Encoding and validated decoding of a realistic exporter batch (1,000 flows, a 50-entry
//! dictionary, 200 claims) with rkyv, beside serde_json and postcard decoding the same batch
//! into an owned mirror. "Decode" always includes reading every flow's fields, so rkyv's
//! zero-copy read is compared with the others' full deserialization on equal terms.
//!
//! After criterion's groups, each operation is timed again in a plain loop and one line is
//! printed: `RESULT frame_decode_ns=… frame_encode_ns=… flows_per_frame=…
//! serde_json_decode_ns=… postcard_decode_ns=…` (nanoseconds per frame, best of 5 rounds).

#![allow(
    clippy::disallowed_methods,
    reason = "a benchmark measures wall time; the crate's cores still never read the clock"
)]

use std::hint::black_box;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tenure_gossip::frame::{encode_frame_with, FrameDecoder, FrameError, FrameLimits};
use tenure_gossip::seal::{Channel, Keyring, Opener, OpenerConfig, SealError, Sealer, SecretKey};
use tenure_gossip::wire::{
    self, AlignedVec, ArchivedLocalEnd, ArchivedMessage, Claim, Direction, Flow, FlowBatch,
    LocalEnd, Message, WireLimits,
};

const FLOWS: usize = 1_000;
const DICTIONARY_ENTRIES: usize = 50;
const CLAIMS: usize = 200;

/// A deterministic xorshift, so every run benchmarks the same batch.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn batch() -> FlowBatch {
    let mut r = Xorshift(0x2545_F491_4F6C_DD1D);
    let dictionary: Vec<String> = (0..DICTIONARY_ENTRIES)
        .map(|i| {
            format!(
                "prod/namespace-{}/deployment-{i}-{:x}",
                i % 7,
                r.next() % 0xFFFF
            )
        })
        .collect();
    let ip = |r: &mut Xorshift| -> IpAddr {
        if r.next().is_multiple_of(10) {
            IpAddr::from((u128::from(r.next()) << 64 | u128::from(r.next())).to_be_bytes())
        } else {
            IpAddr::from([
                10,
                (r.next() % 256) as u8,
                (r.next() % 256) as u8,
                (r.next() % 256) as u8,
            ])
        }
    };
    let now_ms = 1_760_000_000_000u64;
    let flows = (0..FLOWS)
        .map(|_| {
            let start_ms = now_ms - r.next() % 600_000;
            Flow {
                flow_id: u128::from(r.next()) << 64 | u128::from(r.next()),
                start_ms,
                end_ms: start_ms + r.next() % 60_000,
                bytes_sent: r.next() % 10_000_000,
                bytes_received: r.next() % 10_000_000,
                segs_in: r.next() % 50_000,
                segs_out: r.next() % 50_000,
                retransmits: r.next() % 10,
                rtt_us: (r.next() % 200_000) as u32,
                local: LocalEnd::Workload((r.next() % DICTIONARY_ENTRIES as u64) as u32),
                local_ip: ip(&mut r),
                remote_ip: ip(&mut r),
                local_port: (r.next() % 65_536) as u16,
                remote_port: 443,
                direction: if r.next().is_multiple_of(2) {
                    Direction::Outbound
                } else {
                    Direction::Inbound
                },
                ongoing: r.next().is_multiple_of(5),
            }
        })
        .collect();
    let claims = (0..CLAIMS)
        .map(|_| Claim {
            ip: ip(&mut r),
            workload: (r.next() % DICTIONARY_ENTRIES as u64) as u32,
            instance: r.next(),
            since_ms: now_ms - 3_600_000,
            until_ms: now_ms,
        })
        .collect();
    FlowBatch {
        batch_id: 17,
        exporter_id: 0xE0,
        hops: 0,
        sent_ms: 0,
        region: "eu-west-1".to_owned(),
        dictionary,
        flows,
        claims,
    }
}

// ---- the owned mirror for serde ---------------------------------------------------------

#[derive(Serialize, Deserialize)]
struct SerdeFlow {
    flow_id: u128,
    start_ms: u64,
    end_ms: u64,
    bytes_sent: u64,
    bytes_received: u64,
    segs_in: u64,
    segs_out: u64,
    retransmits: u64,
    local_workload: u32,
    rtt_us: u32,
    local_ip: IpAddr,
    remote_ip: IpAddr,
    local_port: u16,
    remote_port: u16,
    outbound: bool,
    ongoing: bool,
}

#[derive(Serialize, Deserialize)]
struct SerdeClaim {
    ip: IpAddr,
    workload: u32,
    instance: u64,
    since_ms: u64,
    until_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct SerdeFlowBatch {
    batch_id: u64,
    exporter_id: u64,
    hops: u8,
    sent_ms: u64,
    region: String,
    dictionary: Vec<String>,
    flows: Vec<SerdeFlow>,
    claims: Vec<SerdeClaim>,
}

impl From<&FlowBatch> for SerdeFlowBatch {
    fn from(b: &FlowBatch) -> Self {
        SerdeFlowBatch {
            batch_id: b.batch_id,
            exporter_id: b.exporter_id,
            hops: b.hops,
            sent_ms: b.sent_ms,
            region: b.region.clone(),
            dictionary: b.dictionary.clone(),
            flows: b
                .flows
                .iter()
                .map(|f| SerdeFlow {
                    flow_id: f.flow_id,
                    start_ms: f.start_ms,
                    end_ms: f.end_ms,
                    bytes_sent: f.bytes_sent,
                    bytes_received: f.bytes_received,
                    segs_in: f.segs_in,
                    segs_out: f.segs_out,
                    retransmits: f.retransmits,
                    local_workload: match f.local {
                        LocalEnd::Workload(i) => i,
                        LocalEnd::Unattributed(_) => u32::MAX,
                    },
                    rtt_us: f.rtt_us,
                    local_ip: f.local_ip,
                    remote_ip: f.remote_ip,
                    local_port: f.local_port,
                    remote_port: f.remote_port,
                    outbound: f.direction == Direction::Outbound,
                    ongoing: f.ongoing,
                })
                .collect(),
            claims: b
                .claims
                .iter()
                .map(|c| SerdeClaim {
                    ip: c.ip,
                    workload: c.workload,
                    instance: c.instance,
                    since_ms: c.since_ms,
                    until_ms: c.until_ms,
                })
                .collect(),
        }
    }
}

// ---- reading every field ----------------------------------------------------------------

fn ip_bits(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => u64::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6) as u64,
    }
}

/// Validates the frame's archive and folds every flow's fields (and its workload's name).
fn rkyv_decode_and_read(bytes: &[u8], limits: &WireLimits) -> u64 {
    let message = wire::decode(bytes, limits).expect("the batch is valid");
    let ArchivedMessage::FlowBatch(batch) = message else {
        panic!("a flow batch was encoded");
    };
    let mut sum = 0u64;
    for f in batch.flows.iter() {
        sum = sum
            .wrapping_add(f.flow_id.to_native() as u64)
            .wrapping_add(f.start_ms.to_native() ^ f.end_ms.to_native())
            .wrapping_add(f.bytes_sent.to_native() + f.bytes_received.to_native())
            .wrapping_add(
                f.segs_in.to_native() + f.segs_out.to_native() + f.retransmits.to_native(),
            )
            .wrapping_add(u64::from(f.rtt_us.to_native()))
            .wrapping_add(ip_bits(f.local_ip.as_ipaddr()) ^ ip_bits(f.remote_ip.as_ipaddr()))
            .wrapping_add(
                u64::from(f.local_port.to_native()) << 16 | u64::from(f.remote_port.to_native()),
            )
            .wrapping_add(
                u64::from(f.direction.to_native() == Direction::Outbound) + u64::from(f.ongoing),
            )
            .wrapping_add(
                batch
                    .workload(match f.local {
                        ArchivedLocalEnd::Workload(i) => i.to_native(),
                        ArchivedLocalEnd::Unattributed(_) => u32::MAX,
                    })
                    .map_or(0, str::len) as u64,
            );
    }
    sum
}

fn serde_read(batch: &SerdeFlowBatch) -> u64 {
    let mut sum = 0u64;
    for f in &batch.flows {
        sum = sum
            .wrapping_add(f.flow_id as u64)
            .wrapping_add(f.start_ms ^ f.end_ms)
            .wrapping_add(f.bytes_sent + f.bytes_received)
            .wrapping_add(f.segs_in + f.segs_out + f.retransmits)
            .wrapping_add(u64::from(f.rtt_us))
            .wrapping_add(ip_bits(f.local_ip) ^ ip_bits(f.remote_ip))
            .wrapping_add(u64::from(f.local_port) << 16 | u64::from(f.remote_port))
            .wrapping_add(u64::from(f.outbound) + u64::from(f.ongoing))
            .wrapping_add(
                batch
                    .dictionary
                    .get(f.local_workload as usize)
                    .map_or(0, String::len) as u64,
            );
    }
    sum
}

fn json_decode_and_read(bytes: &[u8]) -> u64 {
    serde_read(&serde_json::from_slice::<SerdeFlowBatch>(bytes).expect("valid json"))
}

fn postcard_decode_and_read(bytes: &[u8]) -> u64 {
    serde_read(&postcard::from_bytes::<SerdeFlowBatch>(bytes).expect("valid postcard"))
}

// ---- the full receive path, for reference -----------------------------------------------

#[derive(Debug)]
#[allow(
    dead_code,
    reason = "the fields are shown through Debug when a send fails"
)]
enum SendError {
    Frame(FrameError),
    Seal(SealError),
}

impl From<FrameError> for SendError {
    fn from(e: FrameError) -> Self {
        SendError::Frame(e)
    }
}

fn sealed_frame(plain: &[u8], sealer: &mut Sealer, ring: &Keyring) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(1);
    let mut frame = Vec::new();
    encode_frame_with::<SendError, _>(&mut frame, FrameLimits::default().frame_bytes_max, |out| {
        sealer
            .seal(ring, &mut rng, plain, out)
            .map_err(SendError::Seal)
    })
    .expect("fits a frame");
    frame
}

/// Best of five rounds of `iterations` calls, in nanoseconds per call.
fn time_ns(iterations: u32, mut f: impl FnMut() -> u64) -> u128 {
    (0..5)
        .map(|_| {
            let start = Instant::now();
            let mut sink = 0u64;
            for _ in 0..iterations {
                sink = sink.wrapping_add(f());
            }
            black_box(sink);
            start.elapsed().as_nanos() / u128::from(iterations)
        })
        .min()
        .expect("five rounds")
}

fn main() {
    let owned = batch();
    let message = Message::FlowBatch(owned.clone());
    let limits = WireLimits::default();
    let encoded = wire::encode(&message).expect("valid batch");
    let mirror = SerdeFlowBatch::from(&owned);
    let json = serde_json::to_vec(&mirror).expect("serializable");
    let post = postcard::to_allocvec(&mirror).expect("serializable");
    let expected = rkyv_decode_and_read(&encoded, &limits);
    assert_eq!(
        json_decode_and_read(&json),
        expected,
        "json reads the same batch"
    );
    assert_eq!(
        postcard_decode_and_read(&post),
        expected,
        "postcard reads the same batch"
    );

    let ring = Keyring::new(1, &SecretKey::from_bytes([9; 32]));
    let mut sealer = Sealer::new(Channel::Data, 1, 1);
    let frame = sealed_frame(&encoded, &mut sealer, &ring);
    println!(
        "batch: {FLOWS} flows, {DICTIONARY_ENTRIES} dictionary entries, {CLAIMS} claims; rkyv {} bytes, sealed frame {} bytes, json {} bytes, postcard {} bytes",
        encoded.len(),
        frame.len(),
        json.len(),
        post.len()
    );

    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        .configure_from_args();
    {
        let mut group = c.benchmark_group("flow_batch");
        group.throughput(Throughput::Elements(FLOWS as u64));
        let mut buffer = AlignedVec::new();
        group.bench_function("rkyv_encode", |b| {
            b.iter(|| {
                wire::encode_into(black_box(&message), &limits, &mut buffer).expect("valid");
                buffer.len()
            })
        });
        group.bench_function("rkyv_decode_read", |b| {
            b.iter(|| rkyv_decode_and_read(black_box(&encoded), &limits))
        });
        group.bench_function("serde_json_decode_read", |b| {
            b.iter(|| json_decode_and_read(black_box(&json)))
        });
        group.bench_function("postcard_decode_read", |b| {
            b.iter(|| postcard_decode_and_read(black_box(&post)))
        });
        group.bench_function("unframe_open_decode_read", |b| {
            let mut decoder = FrameDecoder::new(FrameLimits::default());
            let mut plain = AlignedVec::new();
            b.iter(|| {
                // A fresh opener each time: the same frame would otherwise be a replay.
                let mut opener = Opener::new(OpenerConfig::default());
                let mut input = &frame[..];
                let body = decoder
                    .decode(&mut input)
                    .expect("valid")
                    .expect("complete");
                opener
                    .open(&ring, Channel::Data, body, &mut plain)
                    .expect("genuine");
                rkyv_decode_and_read(&plain, &limits)
            })
        });
        group.finish();
    }
    c.final_summary();

    let mut buffer = AlignedVec::new();
    let encode_ns = time_ns(200, || {
        wire::encode_into(black_box(&message), &limits, &mut buffer).expect("valid");
        buffer.len() as u64
    });
    let decode_ns = time_ns(500, || rkyv_decode_and_read(black_box(&encoded), &limits));
    let json_ns = time_ns(50, || json_decode_and_read(black_box(&json)));
    let postcard_ns = time_ns(200, || postcard_decode_and_read(black_box(&post)));
    println!(
        "RESULT frame_decode_ns={decode_ns} frame_encode_ns={encode_ns} flows_per_frame={FLOWS} serde_json_decode_ns={json_ns} postcard_decode_ns={postcard_ns}"
    );
}
