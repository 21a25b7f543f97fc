//! `Opener::open` over arbitrary envelopes, and over real envelopes with arbitrary bit
//! flips: a forged or corrupted envelope is refused and changes no replay state.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use tenure_gossip::seal::{
    BoundKeys, Channel, Keyring, Opener, OpenerConfig, SecretKey, Sealer,
};
use tenure_gossip::wire::AlignedVec;

fuzz_target!(|data: &[u8]| {
    let key = SecretKey::from_bytes([7; 32]);
    let ring = Keyring::new(1, &key);
    let mut opener = Opener::new(OpenerConfig::default());
    let mut plain = AlignedVec::new();
    // Arbitrary bytes on both channels.
    let _ = opener.open(&ring, Channel::Data, data, &mut plain);
    let _ = opener.open(&ring, Channel::Gossip, data, &mut plain);
    assert_eq!(opener.senders_tracked(), 0, "random bytes never authenticate");

    // A real envelope, then the input XORed over it: only the original opens.
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut sealer = Sealer::new(Channel::Data, 9, 1);
    let mut envelope = Vec::new();
    sealer
        .seal(&ring, &mut rng, b"payload", &mut envelope)
        .expect("sealing a small payload");
    let mut flipped = envelope.clone();
    for (i, b) in data.iter().enumerate() {
        if let Some(x) = flipped.get_mut(i % envelope.len().max(1)) {
            *x ^= b;
        }
    }
    let changed = flipped != envelope;
    let result = opener.open(&ring, Channel::Data, &flipped, &mut plain);
    if changed {
        assert!(result.is_err(), "a changed envelope must not open");
        assert_eq!(opener.senders_tracked(), 0);
    }
    // The original opens now only if the changed copy did not (else it is a replay).
    let again = opener.open(&ring, Channel::Data, &envelope, &mut plain);
    assert_eq!(again.is_ok(), changed, "{again:?}");

    // Under keys bound to one sender each (exporter credentials): arbitrary bytes never
    // open, and the real envelope, whatever sender it states (9), opens as its key's
    // owner (3), once.
    let mut bound = BoundKeys::new(4);
    bound.bind(1, 3, &key).expect("binding one key");
    let mut bound_opener = Opener::new(OpenerConfig::default());
    let _ = bound_opener.open(&bound, Channel::Data, data, &mut plain);
    assert_eq!(bound_opener.senders_tracked(), 0, "random bytes never authenticate");
    let result = bound_opener.open(&bound, Channel::Data, &flipped, &mut plain);
    if changed {
        assert!(result.is_err(), "a changed envelope must not open");
    }
    let opened = bound_opener.open(&bound, Channel::Data, &envelope, &mut plain);
    match opened {
        Ok(o) => assert_eq!(o.sender_id, 3, "a bound key speaks for its owner"),
        Err(e) => assert!(!changed, "{e:?}"),
    }
});
