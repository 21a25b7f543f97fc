//! The sender epoch, kept on disk so that it grows across restarts whatever the wall clock
//! says.
//!
//! Receivers refuse an epoch lower than one they accepted from the same sender (see
//! `tenure_gossip::seal`), so a restarted sender must state a higher one. The start time
//! alone is not enough: a node whose clock was stepped back (an operator, NTP, a VM
//! restored from a snapshot) and that restarts would state a lower epoch and be refused
//! by every peer until real time caught up with its previous start. Here the epoch is
//! `max(previous + 1, now_ms)`, written durably (a temporary file, fsynced, renamed over
//! the old one, the folder fsynced) before the first frame is sealed with it.

use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Why no epoch could be chosen. Nothing was sealed with an epoch yet.
#[derive(Debug, thiserror::Error)]
pub enum EpochError {
    #[error("reading the epoch file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the epoch file {path} holds {content:?}, not a number")]
    Malformed { path: PathBuf, content: String },
    #[error("writing the epoch file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The epoch file's name in a node's state folder.
pub const EPOCH_FILE: &str = "epoch";

/// Chooses this run's epoch: above the one stored in `dir` (if any) and at least `now_ms`,
/// and stores it before returning. `dir` is created if missing.
pub fn next(dir: &Path, now_ms: u64) -> Result<u64, EpochError> {
    let path = dir.join(EPOCH_FILE);
    let previous = match fs::read_to_string(&path) {
        Ok(text) => Some(
            text.trim()
                .parse::<u64>()
                .map_err(|_| EpochError::Malformed {
                    path: path.clone(),
                    content: text.chars().take(64).collect(),
                })?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => return Err(EpochError::Read { path, source }),
    };
    let epoch = match previous {
        Some(p) => p.saturating_add(1).max(now_ms),
        None => now_ms,
    };
    store(dir, &path, epoch).map_err(|source| EpochError::Write {
        path: path.clone(),
        source,
    })?;
    if previous.is_some_and(|p| p >= now_ms) {
        tracing::warn!(
            epoch,
            now_ms,
            "the clock reads earlier than the previous run's epoch: it was stepped back; continuing from the stored epoch"
        );
    }
    Ok(epoch)
}

fn store(dir: &Path, path: &Path, epoch: u64) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{EPOCH_FILE}.tmp"));
    let mut file = File::create(&tmp)?;
    writeln!(file, "{epoch}")?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_epoch_grows_across_runs_even_when_the_clock_went_back() {
        let dir = tempfile::tempdir().unwrap();
        let first = next(dir.path(), 1_000_000).unwrap();
        assert_eq!(first, 1_000_000);
        // The clock was stepped back by ten minutes before the restart.
        let second = next(dir.path(), 400_000).unwrap();
        assert_eq!(second, 1_000_001);
        // And forward again: the clock leads once it is ahead.
        let third = next(dir.path(), 2_000_000).unwrap();
        assert_eq!(third, 2_000_000);
        assert_eq!(
            fs::read_to_string(dir.path().join(EPOCH_FILE))
                .unwrap()
                .trim(),
            "2000000"
        );
    }

    #[test]
    fn a_malformed_epoch_file_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(EPOCH_FILE), "yesterday\n").unwrap();
        let e = next(dir.path(), 5).unwrap_err();
        assert!(matches!(e, EpochError::Malformed { .. }), "{e}");
        assert!(e.to_string().contains("yesterday"), "{e}");
    }

    /// A sender that restarts after its clock was stepped back five minutes: with its
    /// epoch on disk its frames are accepted at once, and replays of either run's frames
    /// are still refused. Without it, the restarted sender is locked out.
    #[test]
    fn a_sender_restarted_with_its_clock_stepped_back_is_accepted_and_replays_are_not() {
        use crate::shell::transport::{Crypto, TransportError};
        use tenure_gossip::seal::{SealError, SecretKey, KEY_BYTES};
        use tenure_gossip::wire::{Ack, AckStatus, AlignedVec, Message};

        let key = SecretKey::from_bytes([3; KEY_BYTES]);
        let t = 1_800_000_000_000u64;
        let receiver = Crypto::new(1, &key, None, 7, t);
        let open = |frame: &[u8]| {
            let mut input = frame;
            let mut decoder = receiver.decoder();
            let body = decoder
                .decode(&mut input)
                .expect("a whole frame")
                .expect("one frame");
            receiver.open_frame(body, &mut AlignedVec::new())
        };
        let ack = |batch_id| {
            Message::Ack(Ack {
                batch_id,
                status: AckStatus::Accepted,
            })
        };
        let dir = tempfile::tempdir().unwrap();

        let first = Crypto::new(1, &key, None, 42, next(dir.path(), t).unwrap());
        let f1 = first.frame(&ack(1)).unwrap();
        open(&f1).expect("the first run's frame");

        let back = t - 300_000;
        let second = Crypto::new(1, &key, None, 42, next(dir.path(), back).unwrap());
        let f2 = second.frame(&ack(2)).unwrap();
        open(&f2).expect("the restarted sender's frame is accepted at once");
        assert!(
            matches!(
                open(&f2),
                Err(TransportError::Seal(SealError::Replayed { .. }))
            ),
            "a replay of the new run's frame is refused"
        );
        assert!(
            matches!(
                open(&f1),
                Err(TransportError::Seal(SealError::StaleEpoch { .. }))
            ),
            "a replay of the old run's frame is refused"
        );

        // The same restart with the start time as its epoch: refused until the clock
        // passes the first run's start.
        let clocked = Crypto::new(1, &key, None, 42, back);
        assert!(matches!(
            open(&clocked.frame(&ack(3)).unwrap()),
            Err(TransportError::Seal(SealError::StaleEpoch { .. }))
        ));
    }
}
