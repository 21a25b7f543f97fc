//! Sealing scenarios: replay, epochs, channels, unknown keys and rotation without downtime.

use rand::rngs::StdRng;
use rand::SeedableRng;
use tenure_gossip::seal::{
    Channel, Keyring, KeyringError, Opener, OpenerConfig, SealError, Sealer, SecretKey,
    REPLAY_WINDOW_COUNTERS,
};
use tenure_gossip::wire::AlignedVec;

fn key(byte: u8) -> SecretKey {
    SecretKey::from_bytes([byte; 32])
}

fn seal(sealer: &mut Sealer, ring: &Keyring, rng: &mut StdRng, plaintext: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    sealer.seal(ring, rng, plaintext, &mut out).expect("seal");
    out
}

fn open(opener: &mut Opener, ring: &Keyring, envelope: &[u8]) -> Result<Vec<u8>, SealError> {
    let mut plain = AlignedVec::new();
    opener.open(ring, Channel::Data, envelope, &mut plain)?;
    Ok(plain.to_vec())
}

#[test]
fn an_envelope_opens_once_and_its_replay_is_refused() {
    let ring = Keyring::new(1, &key(1));
    let mut rng = StdRng::seed_from_u64(1);
    let mut sealer = Sealer::new(Channel::Data, 42, 7);
    let mut opener = Opener::new(OpenerConfig::default());
    let envelope = seal(&mut sealer, &ring, &mut rng, b"flows");
    assert_eq!(open(&mut opener, &ring, &envelope), Ok(b"flows".to_vec()));
    assert_eq!(
        open(&mut opener, &ring, &envelope),
        Err(SealError::Replayed {
            sender_id: 42,
            epoch: 7,
            counter: 0
        })
    );
}

#[test]
fn reordered_envelopes_within_the_window_open_and_older_ones_are_too_old() {
    let ring = Keyring::new(1, &key(1));
    let mut rng = StdRng::seed_from_u64(2);
    let mut sealer = Sealer::new(Channel::Data, 1, 1);
    let mut opener = Opener::new(OpenerConfig::default());
    let envelopes: Vec<Vec<u8>> = (0..=REPLAY_WINDOW_COUNTERS + 1)
        .map(|_| seal(&mut sealer, &ring, &mut rng, b"x"))
        .collect();
    let newest = envelopes.len() - 1;
    open(&mut opener, &ring, &envelopes[newest]).expect("newest");
    open(&mut opener, &ring, &envelopes[2]).expect("1023 behind: inside the window");
    assert!(matches!(
        open(&mut opener, &ring, &envelopes[1]),
        Err(SealError::TooOld { counter: 1, .. })
    ));
}

#[test]
fn a_restarted_sender_starts_a_new_window_and_its_old_epoch_is_refused() {
    let ring = Keyring::new(1, &key(1));
    let mut rng = StdRng::seed_from_u64(3);
    let mut opener = Opener::new(OpenerConfig::default());
    let mut before = Sealer::new(Channel::Data, 5, 100);
    let old = seal(&mut before, &ring, &mut rng, b"old");
    let old_unseen = seal(&mut before, &ring, &mut rng, b"old, never delivered");
    open(&mut opener, &ring, &old).expect("first epoch");

    let mut after = Sealer::new(Channel::Data, 5, 101);
    let new = seal(&mut after, &ring, &mut rng, b"new");
    assert_eq!(
        open(&mut opener, &ring, &new),
        Ok(b"new".to_vec()),
        "counter 0 again, new epoch"
    );
    assert_eq!(
        open(&mut opener, &ring, &old_unseen),
        Err(SealError::StaleEpoch {
            sender_id: 5,
            epoch: 100,
            current_epoch: 101
        })
    );
}

#[test]
fn a_datagram_cannot_be_opened_as_a_stream_frame() {
    let ring = Keyring::new(1, &key(1));
    let mut rng = StdRng::seed_from_u64(4);
    let mut gossip = Sealer::new(Channel::Gossip, 9, 1);
    let datagram = seal(&mut gossip, &ring, &mut rng, b"ping");
    let mut opener = Opener::new(OpenerConfig::default());
    assert_eq!(
        open(&mut opener, &ring, &datagram),
        Err(SealError::WrongChannel {
            expected: Channel::Data,
            found: 0
        })
    );
    let mut plain = AlignedVec::new();
    opener
        .open(&ring, Channel::Gossip, &datagram, &mut plain)
        .expect("opens on its own channel");
}

#[test]
fn a_key_outside_the_ring_is_refused_and_a_wrong_key_under_a_known_id_fails_authentication() {
    let ring = Keyring::new(1, &key(1));
    let mut rng = StdRng::seed_from_u64(5);
    let mut opener = Opener::new(OpenerConfig::default());
    let mut sealer = Sealer::new(Channel::Data, 3, 1);

    let other_cluster = Keyring::new(2, &key(2));
    let foreign = seal(&mut sealer, &other_cluster, &mut rng, b"x");
    assert_eq!(
        open(&mut opener, &ring, &foreign),
        Err(SealError::UnknownKey { key_id: 2 })
    );

    let impostor = Keyring::new(1, &key(99));
    let forged = seal(&mut sealer, &impostor, &mut rng, b"x");
    assert_eq!(
        open(&mut opener, &ring, &forged),
        Err(SealError::AuthenticationFailed { key_id: 1 })
    );
    assert_eq!(
        opener.senders_tracked(),
        0,
        "refused envelopes leave no replay state"
    );
}

#[test]
fn rotation_accepts_both_keys_then_refuses_the_retired_one() {
    let mut rng = StdRng::seed_from_u64(6);
    let old_key = key(1);
    let new_key = key(2);
    let mut sender_ring = Keyring::new(1, &old_key);
    let mut receiver_ring = Keyring::new(1, &old_key);
    let mut sealer = Sealer::new(Channel::Data, 1, 1);
    let mut opener = Opener::new(OpenerConfig::default());

    // Step 1: everyone accepts the new key.
    sender_ring
        .accept(2, &new_key)
        .expect("room for a second key");
    receiver_ring
        .accept(2, &new_key)
        .expect("room for a second key");
    assert_eq!(
        receiver_ring.accept(3, &key(3)),
        Err(KeyringError::Full { key_id: 3 })
    );
    assert_eq!(
        receiver_ring.accept(2, &new_key),
        Err(KeyringError::DuplicateKeyId { key_id: 2 })
    );
    let under_old = seal(&mut sealer, &sender_ring, &mut rng, b"old");
    let under_old_late = seal(&mut sealer, &sender_ring, &mut rng, b"old, late");

    // Step 2: the sender switches; the receiver opens both.
    sender_ring.send_with(2).expect("accepted");
    let under_new = seal(&mut sealer, &sender_ring, &mut rng, b"new");
    assert_eq!(
        open(&mut opener, &receiver_ring, &under_old),
        Ok(b"old".to_vec())
    );
    assert_eq!(
        open(&mut opener, &receiver_ring, &under_new),
        Ok(b"new".to_vec())
    );

    // Step 3: the old key is retired; what was sealed under it is refused.
    receiver_ring.send_with(2).expect("accepted");
    assert_eq!(
        receiver_ring.retire(2),
        Err(KeyringError::IsSendKey { key_id: 2 })
    );
    receiver_ring.retire(1).expect("not the send key");
    assert_eq!(
        receiver_ring.retire(1),
        Err(KeyringError::NotAccepted { key_id: 1 })
    );
    assert_eq!(
        receiver_ring.accepted_key_ids().collect::<Vec<_>>(),
        vec![2]
    );
    assert_eq!(
        open(&mut opener, &receiver_ring, &under_old_late),
        Err(SealError::UnknownKey { key_id: 1 })
    );
}

#[test]
fn sealing_over_the_limit_fails_without_using_a_counter() {
    let ring = Keyring::new(1, &key(1));
    let mut rng = StdRng::seed_from_u64(7);
    let mut sealer = Sealer::new(Channel::Gossip, 1, 1).with_sealed_bytes_max(100);
    let mut out = Vec::new();
    assert!(matches!(
        sealer.seal(&ring, &mut rng, &[0; 31], &mut out),
        Err(SealError::Oversized {
            sealed_bytes: 101,
            sealed_bytes_max: 100
        })
    ));
    assert!(out.is_empty());
    assert_eq!(sealer.next_counter(), 0);
    sealer
        .seal(&ring, &mut rng, &[0; 30], &mut out)
        .expect("exactly at the limit");
    assert_eq!(out.len(), 100);
}

#[test]
fn the_keyring_debug_output_names_ids_but_not_keys() {
    let ring = Keyring::new(1, &key(0xAB));
    let shown = format!("{ring:?} {:?}", key(0xAB));
    assert!(shown.contains("send_key_id: 1"), "{shown}");
    assert!(!shown.contains("171"), "{shown}");
    assert!(!shown.to_lowercase().contains("abab"), "{shown}");
}
