//! Crash tests of the journal: a failpoint at every step, then a restart.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tenure_gossip::wire::{Direction, LocalReason};

use super::codec::{self, DecodeError, Record};
use super::{Journal, JournalError, Step};
use crate::core::{FlowRecord, Local};
use crate::report::Chain;

fn flow(id: u128, v6: bool) -> FlowRecord {
    FlowRecord {
        flow_id: id,
        local_ip: "10.1.0.1".parse().unwrap(),
        local_port: 40_000,
        remote_ip: if v6 {
            "fd00::7".parse().unwrap()
        } else {
            "10.1.0.7".parse().unwrap()
        },
        remote_port: 443,
        local: if id % 3 == 1 {
            Local::Unattributed(LocalReason::ALL[(id as usize / 3) % LocalReason::ALL.len()])
        } else {
            Local::Workload(Arc::from("gateway"))
        },
        start_ms: 1_700_000_000_000 + id as u64,
        end_ms: 1_700_000_000_100 + id as u64,
        bytes_sent: 10,
        bytes_received: 20,
        segs_in: 1,
        segs_out: 2,
        retransmits: 1,
        rtt_us: 0,
        direction: if v6 {
            Direction::Inbound
        } else {
            Direction::Outbound
        },
        ongoing: v6,
        exporter_id: 9,
        exporter_region: Arc::from("us-east"),
        hops: 1,
    }
}

/// Writes append `id` of `flows` as the core hands it over: encoded.
fn append(journal: &mut Journal, id: u64, flows: &[FlowRecord]) -> Result<(), JournalError> {
    let mut record = Vec::new();
    codec::encode_append(id, flows.iter(), &mut record);
    journal.append_record(id, &record)
}

fn flows_of(id: u64) -> Vec<FlowRecord> {
    (0..3)
        .map(|i| flow(u128::from(id) * 10 + i, i == 1))
        .collect()
}

#[test]
fn records_round_trip_and_every_truncation_is_torn() {
    let records = [
        Record::Append {
            id: 7,
            flows: flows_of(7),
        },
        Record::Release { ids: vec![1, 5, 7] },
    ];
    for record in records {
        let mut bytes = Vec::new();
        codec::encode(&record, &mut bytes);
        assert_eq!(codec::decode(&bytes), Ok((record.clone(), bytes.len())));
        for cut in 0..bytes.len() {
            assert!(
                matches!(codec::decode(&bytes[..cut]), Err(DecodeError::Torn { .. })),
                "a record cut at {cut} is torn"
            );
        }
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(
                codec::decode(&bad).is_err(),
                "a bit flip at {i} is detected"
            );
        }
    }
}

/// One run of a script against a journal whose failpoint fires at check number `crash_at`.
/// Returns the ids acknowledged (synced) and those released before the crash.
fn run_until_crash(dir: &std::path::Path, crash_at: usize) -> (BTreeSet<u64>, BTreeSet<u64>, bool) {
    let (mut journal, replay) = Journal::open(dir).unwrap();
    assert!(replay.entries.is_empty());
    let checks = Arc::new(AtomicUsize::new(0));
    let counter = checks.clone();
    journal.set_failpoint(Box::new(move |_step: Step| {
        counter.fetch_add(1, Ordering::SeqCst) == crash_at
    }));
    let mut acked = BTreeSet::new();
    let mut released = BTreeSet::new();
    let mut crashed = false;
    // append 1, 2; sync (ack); release 1; append 3; sync; release 2, 3; append 4; sync.
    let mut script = || -> Result<(), JournalError> {
        append(&mut journal, 1, &flows_of(1))?;
        append(&mut journal, 2, &flows_of(2))?;
        let upto = journal.sync()?;
        acked.extend((1..=upto).filter(|i| *i <= 2));
        journal.release(&[1])?;
        released.insert(1);
        append(&mut journal, 3, &flows_of(3))?;
        let upto = journal.sync()?;
        acked.extend((1..=upto).filter(|i| *i <= 3));
        journal.release(&[2, 3])?;
        released.extend([2, 3]);
        append(&mut journal, 4, &flows_of(4))?;
        let upto = journal.sync()?;
        acked.extend((1..=upto).filter(|i| *i <= 4));
        Ok(())
    };
    match script() {
        Ok(()) => {}
        Err(JournalError::Crashed(_)) => crashed = true,
        Err(e) => panic!("unexpected journal error: {}", Chain(&e)),
    }
    // The process dies here: the journal is dropped without any further write.
    (acked, released, crashed)
}

#[test]
fn a_crash_at_any_step_loses_no_acknowledged_flow() {
    let mut crashes = 0;
    for crash_at in 0.. {
        let dir = tempfile::tempdir().unwrap();
        let (acked, released, crashed) = run_until_crash(dir.path(), crash_at);
        let (_journal, replay) = Journal::open(dir.path()).unwrap();
        let live: BTreeSet<u64> = replay.entries.iter().map(|(id, _)| *id).collect();
        for id in acked.difference(&released) {
            assert!(
                live.contains(id),
                "crash at check {crash_at}: acknowledged append {id} lost; replayed {live:?}"
            );
        }
        for (id, flows) in &replay.entries {
            assert_eq!(flows, &flows_of(*id), "append {id} replayed intact");
        }
        if !crashed {
            assert_eq!(live, BTreeSet::from([4]));
            break;
        }
        crashes += 1;
    }
    assert!(crashes >= 8, "every step was crashed at: {crashes}");
}

#[test]
fn a_torn_tail_is_counted_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut journal, _) = Journal::open(dir.path()).unwrap();
        append(&mut journal, 1, &flows_of(1)).unwrap();
        journal.sync().unwrap();
        journal.set_failpoint(Box::new(|step| step == Step::AppendTorn));
        assert!(matches!(
            append(&mut journal, 2, &flows_of(2)),
            Err(JournalError::Crashed(Step::AppendTorn))
        ));
    }
    let (mut journal, replay) = Journal::open(dir.path()).unwrap();
    assert_eq!(replay.corrupt_records, 1);
    assert_eq!(replay.entries, vec![(1, flows_of(1))]);
    // The journal goes on in a new segment; the torn one stays until 1 is released.
    append(&mut journal, 2, &flows_of(2)).unwrap();
    journal.sync().unwrap();
    journal.release(&[1]).unwrap();
    assert_eq!(
        journal.segments(),
        1,
        "the fully released segment is deleted"
    );
    drop(journal);
    let (_journal, replay) = Journal::open(dir.path()).unwrap();
    assert_eq!(replay.corrupt_records, 0);
    assert_eq!(replay.entries, vec![(2, flows_of(2))]);
    assert_eq!(replay.max_id, 2);
}

#[test]
fn a_corrupted_segment_is_detected_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut journal, _) = Journal::open(dir.path()).unwrap();
        for id in 1..=3 {
            append(&mut journal, id, &flows_of(id)).unwrap();
        }
        journal.sync().unwrap();
    }
    let segment = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::metadata(p).unwrap().len() > 8)
        .unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&segment, &bytes).unwrap();
    let (_journal, replay) = Journal::open(dir.path()).unwrap();
    assert_eq!(replay.corrupt_records, 1, "the corruption is detected");
    assert!(
        replay.entries.iter().all(|(id, f)| *f == flows_of(*id)),
        "nothing corrupt is replayed"
    );
    assert_eq!(
        replay.entries.first().map(|e| e.0),
        Some(1),
        "records before it survive"
    );
}

/// Records of older segments still decode: version 2 (the local workload a plain name,
/// no tag) and version 1 (also a packet total where segment counts and RTT are now), whose
/// flows come back with their retransmits, zero segments and no RTT.
#[test]
fn version_1_and_2_records_still_decode() {
    let mut current = flow(3, false);
    current.rtt_us = 777;
    let mut v3 = Vec::new();
    codec::encode(
        &Record::Append {
            id: 4,
            flows: vec![current.clone()],
        },
        &mut v3,
    );
    let reseal = |mut bytes: Vec<u8>| {
        let len = u32::try_from(bytes.len() - 9).unwrap();
        bytes[..4].copy_from_slice(&len.to_le_bytes());
        let crc = crc32fast::hash(&bytes[8..]);
        bytes[4..8].copy_from_slice(&crc.to_le_bytes());
        bytes
    };
    // Payload: id u64, count u32, then the flow: flow_id (16), two IPv4 ends with ports
    // (2 × 7), the local end's tag (1, absent before version 3), the workload name (2 + 7)
    // and four u64 (32) before the counters.
    let tag = 9 + 12 + 16 + 14;
    assert_eq!(v3[tag], 0, "a stamped local end");
    let mut v2 = v3[..tag].to_vec();
    v2.extend_from_slice(&v3[tag + 1..]);
    let v2 = reseal(v2);
    let (record, used) = codec::decode_version(&v2, 2).expect("a version-2 record");
    assert_eq!(used, v2.len());
    assert_eq!(
        record,
        Record::Append {
            id: 4,
            flows: vec![current.clone()]
        }
    );

    let counters = tag + 9 + 32;
    let mut v1 = v2[..counters].to_vec();
    v1.extend_from_slice(&3u64.to_le_bytes()); // packets
    v1.extend_from_slice(&current.retransmits.to_le_bytes());
    v1.extend_from_slice(&v2[counters + 28..]);
    let v1 = reseal(v1);
    let (record, used) = codec::decode_version(&v1, 1).expect("a version-1 record");
    assert_eq!(used, v1.len());
    let mut expected = current;
    (expected.segs_in, expected.segs_out, expected.rtt_us) = (0, 0, 0);
    assert_eq!(
        record,
        Record::Append {
            id: 4,
            flows: vec![expected]
        }
    );
    assert!(codec::decode(&v1).is_err(), "not a version-3 record");
}
