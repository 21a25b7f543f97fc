//! Cluster membership: two SWIM pools (foca) over one UDP socket, as a sans-io state
//! machine.
//!
//! * The **LAN pool** holds the members of the node's own region. It detects failures
//!   fast (one-second probes) because it drives the region's hash ring.
//! * The **WAN pool** holds every collector of every region. It is slower and cheaper
//!   (five-second probes) and drives cross-region forwarding; it also carries the region
//!   directory as foca custom broadcasts.
//!
//! Every datagram starts with one tag byte that says which pool (or which side protocol)
//! it belongs to; the rest is foca's postcard encoding or a small postcard message. The
//! datagrams are plaintext: the caller seals them before sending and opens them before
//! handing them in, so that this module never sees a key.
//!
//! Nothing here reads a clock or draws OS randomness. The caller feeds datagrams and
//! expired timers in, and acts on the [`Output`]s that come back: send these bytes, set
//! this timer, a member came up or went down, a region's record changed. Time exists only
//! as the delays of [`Output::SetTimer`], which the caller turns back into
//! [`Membership::handle_timer`] calls when they expire.
//!
//! Joining takes addresses only: [`Membership::join`] sends a *hello* to each seed, the
//! seed answers with its identity, and the node announces itself to that identity in the
//! WAN pool (and the LAN pool when the seed is of the same region). The LAN pool also
//! fills itself from the WAN pool: a WAN member of our region that the LAN pool does not
//! know yet is announced to in the LAN pool.
//!
//! foca does nothing on its own while a pool is not connected (no live member, or just
//! after it renewed our identity because the cluster declared us down). Such a pool
//! announces itself to a few members it knows, at once after a renewal and then every
//! [`JOIN_RETRY_INTERVAL_MS`], until one answers (see [`RECONNECT_FANOUT`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use foca::{
    BroadcastHandler, Config, Foca, Invalidates, NoCustomBroadcast, OwnedNotification,
    PostcardCodec,
};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use tenure_attribution::region::{RegionError, RegionMap};

use crate::directory::{Directory, DirectoryError, Merge, RegionRecord, DIRECTORY_REGIONS_MAX};
use crate::identity::NodeIdentity;
use crate::ring::{Ring, RingConfig};

/// The largest plaintext datagram this module emits or accepts, in bytes: a 1400-byte UDP
/// payload (safe under common MTUs, as foca recommends) minus room for the seal (key id,
/// nonce, tag and replay counter, well under 100 bytes).
pub const DATAGRAM_MAX_BYTES: usize = 1300;

/// The largest foca packet, in bytes: a datagram less its tag byte.
pub const FOCA_PACKET_MAX_BYTES: usize = DATAGRAM_MAX_BYTES - 1;

/// The most seed addresses kept for (re)joining.
pub const JOIN_SEEDS_MAX: usize = 16;

/// How often a node with no WAN peer says hello to its seeds again, and a pool that is not
/// connected announces itself to members it knows (see [`RECONNECT_FANOUT`]).
pub const JOIN_RETRY_INTERVAL_MS: u64 = 5_000;

/// How many known members (live or down, picked at random) a pool that is not connected
/// announces itself to at once: right after it renewed its identity, then every
/// [`JOIN_RETRY_INTERVAL_MS`] until one of them answers.
///
/// foca stops every periodic task (probes, announces, announces to down members) while an
/// instance is not connected, and an instance that renews its identity after being told it
/// is down stays disconnected until someone sends it a message. When every member of a
/// region renews at about the same time (a burst of delay or loss makes them suspect and
/// declare each other down), each one's news goes to the others' *old* identities, which
/// foca drops, and the whole LAN pool falls silent for good. An announce is the one foca
/// message accepted under a stale identity (same node id), so announcing breaks the
/// silence; the answer reconnects the pool and foca's own machinery takes over again.
pub const RECONNECT_FANOUT: usize = 3;

/// How often a node pulls the whole region directory from a random WAN peer. Broadcasts
/// carry changes; the pull repairs what a partition or a late join missed.
pub const DIRECTORY_PULL_INTERVAL_MS: u64 = 30_000;

/// The LAN pool's probe period, in milliseconds (memberlist's LAN default).
pub const LAN_PROBE_PERIOD_MS: u64 = 1_000;

/// How often the LAN pool asks a peer for more peers, in milliseconds. Shorter than foca's
/// 30 s preset: regions are small and a full roster drives the ring.
pub const LAN_ANNOUNCE_INTERVAL_MS: u64 = 10_000;

/// How often the WAN pool announces itself to members it believes down, in milliseconds.
/// This is what heals a partition between regions; foca's preset says 125 s, we prefer
/// cross-region forwarding back within about a minute.
pub const WAN_ANNOUNCE_TO_DOWN_INTERVAL_MS: u64 = 30_000;

/// How often the LAN pool announces itself to members it holds as down, in milliseconds.
/// After a partition both sides hold the other as down, and only these announcements bring
/// them back (the side told it is down renews its incarnation and rejoins). foca's LAN
/// default is 65 s; a region's ring is incomplete until then, so it is shorter here, at the
/// cost of a few datagrams to long-dead members.
pub const LAN_ANNOUNCE_TO_DOWN_INTERVAL_MS: u64 = 15_000;

/// The datagram tags. One byte ahead of every datagram says who reads it.
mod tag {
    /// A foca packet of the LAN pool.
    pub(super) const LAN: u8 = b'L';
    /// A foca packet of the WAN pool.
    pub(super) const WAN: u8 = b'W';
    /// "Who are you?", sent to a seed address. No body.
    pub(super) const HELLO: u8 = b'H';
    /// The answer to a hello: the sender's WAN identity (postcard).
    pub(super) const HELLO_REPLY: u8 = b'h';
    /// "Send me your region directory." No body.
    pub(super) const DIRECTORY_REQUEST: u8 = b'D';
    /// One region record (postcard), in answer to a directory request.
    pub(super) const DIRECTORY_RECORD: u8 = b'd';
}

/// Which SWIM pool.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Pool {
    /// The members of our own region.
    Lan,
    /// Every collector of every region.
    Wan,
}

impl Pool {
    fn index(self) -> usize {
        match self {
            Pool::Lan => 0,
            Pool::Wan => 1,
        }
    }
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pool::Lan => f.write_str("LAN"),
            Pool::Wan => f.write_str("WAN"),
        }
    }
}

/// A foca instance's connection state, mirrored from its notifications (foca does not
/// expose it).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum PoolState {
    /// No live member yet or any more (`Idle`), or our identity was just renewed
    /// (`Rejoin`): foca runs no periodic task until a message reaches it.
    Disconnected,
    /// `Active`: probing, gossiping and announcing on its own.
    Connected,
    /// `Defunct`: we left, or were declared down and could not renew.
    Undead,
}

/// A timer the caller must hand back through [`Membership::handle_timer`] once its delay
/// has passed. Late delivery is tolerated; lost timers stall the protocol.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Timer {
    /// A timer of the LAN foca instance.
    Lan(foca::Timer<NodeIdentity>),
    /// A timer of the WAN foca instance.
    Wan(foca::Timer<NodeIdentity>),
    /// Say hello to the seeds again if we have no WAN peer.
    JoinRetry,
    /// Pull the region directory from a random WAN peer.
    DirectoryPull,
}

/// What the caller must do or may want to know after an input.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Output {
    /// Seal `bytes` and send them to `to` over the gossip socket.
    Send { to: SocketAddr, bytes: Vec<u8> },
    /// Call [`Membership::handle_timer`] with `timer` after `after`.
    SetTimer { after: Duration, timer: Timer },
    /// A member became live in `pool`.
    MemberUp { member: NodeIdentity, pool: Pool },
    /// A member was declared down (or left) in `pool`; it is no longer listed.
    MemberDown { member: NodeIdentity, pool: Pool },
    /// A live member came back under a newer identity (same node id).
    MemberRenamed {
        before: NodeIdentity,
        after: NodeIdentity,
        pool: Pool,
    },
    /// The cluster had declared us down in `pool`; we rejoined under `identity`.
    Rejoined { identity: NodeIdentity, pool: Pool },
    /// We were declared down in `pool` and could not renew our identity; the node needs a
    /// restart with a new incarnation.
    Defunct { pool: Pool },
    /// A region's record is new or changed.
    RegionUpdated { record: RegionRecord },
}

/// Errors handling an input. Outputs pushed before the error are valid and must still be
/// acted on; a rejected datagram changes no state.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// A datagram with no bytes at all.
    #[error("empty datagram")]
    Empty,
    /// A datagram larger than [`DATAGRAM_MAX_BYTES`].
    #[error("datagram of {len} bytes exceeds {DATAGRAM_MAX_BYTES}")]
    TooLarge { len: usize },
    /// The first byte names no pool or side protocol.
    #[error("unknown datagram tag {0:#04x}")]
    UnknownTag(u8),
    /// A LAN datagram from a node of another region (misconfiguration or a stray packet).
    #[error("LAN datagram from {node} of region {region:?}")]
    ForeignRegion { node: String, region: String },
    /// A malformed side-protocol message (hello reply).
    #[error("malformed {what}")]
    Decode {
        what: &'static str,
        #[source]
        source: postcard::Error,
    },
    /// foca refused the input (malformed, too big, from ourselves, ...). foca leaves its
    /// state unchanged on decode errors.
    #[error("{pool} pool refused the input")]
    Foca {
        pool: Pool,
        #[source]
        source: foca::Error,
    },
    /// A region record was malformed or over a limit.
    #[error(transparent)]
    Directory(#[from] DirectoryError),
}

/// How a [`Membership`] is set up.
#[derive(Clone, Debug)]
pub struct MembershipConfig {
    /// Who we are.
    pub identity: NodeIdentity,
    /// The seed of every random choice (probe order, gossip targets, pull targets). One
    /// seed, one run.
    pub rng_seed: u64,
    /// The LAN pool's foca configuration; see [`MembershipConfig::new`] for the tuning.
    pub lan: Config,
    /// The WAN pool's foca configuration.
    pub wan: Config,
    /// Our region's record (from configuration), published to the cluster on join.
    pub region_record: Option<RegionRecord>,
}

impl MembershipConfig {
    /// A configuration tuned for a region of about `region_size` collectors in a fleet of
    /// about `fleet_size`.
    ///
    /// LAN: foca's `new_lan` (memberlist's LAN defaults: 1 s probes, 500 ms probe RTT,
    /// suspicion of 4 s for up to 10 nodes, growing with log10 of the size), with packets
    /// capped at [`FOCA_PACKET_MAX_BYTES`] to leave room for the seal and the tag, and
    /// peers asked for more peers every [`LAN_ANNOUNCE_INTERVAL_MS`] and members held as
    /// down announced to every [`LAN_ANNOUNCE_TO_DOWN_INTERVAL_MS`].
    ///
    /// WAN: foca's `new_wan` (5 s probes, 3 s probe RTT, suspicion 30 s for up to 10 nodes),
    /// the same packet cap, and announces to down members every
    /// [`WAN_ANNOUNCE_TO_DOWN_INTERVAL_MS`] so that partitions heal within a minute.
    ///
    /// Both keep down members for foca's default 24 h: with identities keyed by node id a
    /// restart replaces the old entry, so this costs one entry per node ever seen, and it
    /// keeps a stale identity from being resurrected by delayed gossip.
    pub fn new(
        identity: NodeIdentity,
        rng_seed: u64,
        region_size: NonZeroU32,
        fleet_size: NonZeroU32,
    ) -> MembershipConfig {
        let packet = NonZeroUsize::new(FOCA_PACKET_MAX_BYTES).unwrap_or(NonZeroUsize::MIN);

        let mut lan = Config::new_lan(region_size);
        lan.probe_period = Duration::from_millis(LAN_PROBE_PERIOD_MS);
        lan.max_packet_size = packet;
        if let Some(announce) = lan.periodic_announce.as_mut() {
            announce.frequency = Duration::from_millis(LAN_ANNOUNCE_INTERVAL_MS);
        }
        if let Some(announce) = lan.periodic_announce_to_down_members.as_mut() {
            announce.frequency = Duration::from_millis(LAN_ANNOUNCE_TO_DOWN_INTERVAL_MS);
        }

        let mut wan = Config::new_wan(fleet_size);
        wan.max_packet_size = packet;
        if let Some(announce) = wan.periodic_announce_to_down_members.as_mut() {
            announce.frequency = Duration::from_millis(WAN_ANNOUNCE_TO_DOWN_INTERVAL_MS);
        }

        MembershipConfig {
            identity,
            rng_seed,
            lan,
            wan,
            region_record: None,
        }
    }
}

/// The part of the directory that the WAN pool's broadcast handler and the membership
/// both reach. foca owns its broadcast handler and offers no way back to it, so the two
/// share this behind a mutex; it is never contended (the state machine is driven by one
/// caller at a time), and it keeps [`Membership`] `Send` for the tokio shell.
#[derive(Debug, Default)]
struct Shared {
    directory: Directory,
    /// Records that changed since the last drain, in the order they changed.
    updated: Vec<RegionRecord>,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A poisoned lock means a panic elsewhere while merging; the directory is still a
    // valid map of records, so carry on with it.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The key of a region record in foca's broadcast backlog: a newer version of a region's
/// record makes foca stop spreading the older one.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct RecordKey {
    region: String,
    version: u64,
}

impl Invalidates for RecordKey {
    fn invalidates(&self, other: &RecordKey) -> bool {
        self.region == other.region && self.version >= other.version
    }
}

/// Receives region records from foca broadcasts and merges them into the directory.
#[derive(Debug)]
struct DirectoryBroadcasts {
    shared: Arc<Mutex<Shared>>,
}

impl BroadcastHandler<NodeIdentity> for DirectoryBroadcasts {
    type Key = RecordKey;
    type Error = DirectoryError;

    fn receive_item(
        &mut self,
        data: &[u8],
        _sender: Option<&NodeIdentity>,
    ) -> Result<Option<RecordKey>, DirectoryError> {
        let record = RegionRecord::decode(data)?;
        let mut shared = lock(&self.shared);
        let spread = match shared.directory.merge(record.clone())? {
            Merge::Updated | Merge::Conflict { replaced: true } => true,
            Merge::Stale | Merge::Conflict { replaced: false } => false,
        };
        if !spread {
            return Ok(None);
        }
        let key = RecordKey {
            region: record.region.clone(),
            version: record.version,
        };
        shared.updated.push(record);
        Ok(Some(key))
    }
}

type Rng = Xoshiro256PlusPlus;
type LanFoca = Foca<NodeIdentity, PostcardCodec, Rng, NoCustomBroadcast>;
type WanFoca = Foca<NodeIdentity, PostcardCodec, Rng, DirectoryBroadcasts>;

/// foca's runtime for one call: sends and timers go straight to the outputs, and
/// notifications wait until foca returns, since handling them needs the membership.
struct Collect<'a> {
    pool: Pool,
    out: &'a mut Vec<Output>,
    notifications: Vec<OwnedNotification<NodeIdentity>>,
}

impl foca::Runtime<NodeIdentity> for Collect<'_> {
    fn notify(&mut self, notification: foca::Notification<'_, NodeIdentity>) {
        self.notifications.push(notification.to_owned());
    }

    fn send_to(&mut self, to: NodeIdentity, data: &[u8]) {
        let mut bytes = Vec::with_capacity(data.len() + 1);
        bytes.push(match self.pool {
            Pool::Lan => tag::LAN,
            Pool::Wan => tag::WAN,
        });
        bytes.extend_from_slice(data);
        self.out.push(Output::Send {
            to: to.gossip_addr(),
            bytes,
        });
    }

    fn submit_after(&mut self, event: foca::Timer<NodeIdentity>, after: Duration) {
        let timer = match self.pool {
            Pool::Lan => Timer::Lan(event),
            Pool::Wan => Timer::Wan(event),
        };
        self.out.push(Output::SetTimer { after, timer });
    }
}

/// The membership state machine of one node. See the module documentation.
pub struct Membership {
    identity: NodeIdentity,
    lan: LanFoca,
    wan: WanFoca,
    /// Live LAN members by node id (never ourselves).
    lan_members: BTreeMap<String, NodeIdentity>,
    /// Live WAN members by node id (never ourselves).
    wan_members: BTreeMap<String, NodeIdentity>,
    shared: Arc<Mutex<Shared>>,
    seeds: Vec<SocketAddr>,
    /// Each foca instance's connection state, as its notifications told it. Indexed by
    /// [`Pool::index`].
    state: [PoolState; 2],
    /// Picks directory pull targets and reconnect targets.
    rng: Rng,
    /// Whether the periodic timers (join retry, directory pull) are armed.
    timers_armed: bool,
    own_record: Option<RegionRecord>,
}

impl fmt::Debug for Membership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Membership")
            .field("identity", &self.identity)
            .field("lan_members", &self.lan_members.len())
            .field("wan_members", &self.wan_members.len())
            .finish()
    }
}

impl Membership {
    /// A node that has not joined anything yet. Call [`Membership::join`] next.
    pub fn new(config: MembershipConfig) -> Membership {
        // Three independent streams from one seed, so that the LAN pool's choices do not
        // shift when the WAN pool draws more or fewer numbers.
        let mut seeder = Rng::seed_from_u64(config.rng_seed);
        let lan_rng = Rng::seed_from_u64(seeder.random::<u64>());
        let wan_rng = Rng::seed_from_u64(seeder.random::<u64>());
        let rng = Rng::seed_from_u64(seeder.random::<u64>());
        let shared = Arc::new(Mutex::new(Shared::default()));
        let lan = Foca::new(config.identity.clone(), config.lan, lan_rng, PostcardCodec);
        let wan = Foca::with_custom_broadcast(
            config.identity.clone(),
            config.wan,
            wan_rng,
            PostcardCodec,
            DirectoryBroadcasts {
                shared: Arc::clone(&shared),
            },
        );
        Membership {
            identity: config.identity,
            lan,
            wan,
            lan_members: BTreeMap::new(),
            wan_members: BTreeMap::new(),
            shared,
            seeds: Vec::new(),
            state: [PoolState::Disconnected; 2],
            rng,
            timers_armed: false,
            own_record: config.region_record,
        }
    }

    /// Our identity as the LAN pool knows it (the WAN pool may hold a newer incarnation
    /// after a rejoin there; node id, region and addresses are always the same).
    pub fn identity(&self) -> &NodeIdentity {
        self.lan.identity()
    }

    /// Joins the cluster through `seeds` (gossip addresses of any collectors, of any
    /// region; our own address is harmless). Publishes our region's record, arms the
    /// periodic timers and says hello to each seed. Calling it again replaces the seeds.
    pub fn join(
        &mut self,
        seeds: &[SocketAddr],
        out: &mut Vec<Output>,
    ) -> Result<(), MembershipError> {
        self.seeds = seeds
            .iter()
            .copied()
            .filter(|s| *s != self.identity.gossip_addr())
            .take(JOIN_SEEDS_MAX)
            .collect();
        if let Some(record) = self.own_record.take() {
            self.publish_region(&record, out)?;
        }
        if !self.timers_armed {
            self.timers_armed = true;
            out.push(Output::SetTimer {
                after: Duration::from_millis(JOIN_RETRY_INTERVAL_MS),
                timer: Timer::JoinRetry,
            });
            out.push(Output::SetTimer {
                after: Duration::from_millis(DIRECTORY_PULL_INTERVAL_MS),
                timer: Timer::DirectoryPull,
            });
        }
        self.say_hello(out);
        Ok(())
    }

    /// Publishes (a new version of) a region's record: merged here, then spread by WAN
    /// broadcasts. A record no newer than the one known is ignored.
    pub fn publish_region(
        &mut self,
        record: &RegionRecord,
        out: &mut Vec<Output>,
    ) -> Result<(), MembershipError> {
        let bytes = record.encode()?;
        let result = self.wan.add_broadcast(&bytes);
        self.drain_directory(out);
        match result {
            Ok(_) => Ok(()),
            Err(source) => Err(MembershipError::Foca {
                pool: Pool::Wan,
                source,
            }),
        }
    }

    /// Leaves both pools: peers learn at once instead of after a failure detection.
    pub fn leave(&mut self, out: &mut Vec<Output>) -> Result<(), MembershipError> {
        let lan = self.with_lan(out, |foca, rt| foca.leave_cluster(rt));
        let wan = self.with_wan(out, |foca, rt| foca.leave_cluster(rt));
        self.lan_members.clear();
        self.wan_members.clear();
        lan.and(wan)
    }

    /// Handles one opened datagram received from `from` on the gossip socket.
    pub fn handle_datagram(
        &mut self,
        bytes: &[u8],
        from: SocketAddr,
        out: &mut Vec<Output>,
    ) -> Result<(), MembershipError> {
        if bytes.len() > DATAGRAM_MAX_BYTES {
            return Err(MembershipError::TooLarge { len: bytes.len() });
        }
        let Some((&first, body)) = bytes.split_first() else {
            return Err(MembershipError::Empty);
        };
        match first {
            tag::LAN => {
                self.check_lan_sender(body)?;
                self.with_lan(out, |foca, rt| foca.handle_data(body, rt))
            }
            tag::WAN => self.with_wan(out, |foca, rt| foca.handle_data(body, rt)),
            tag::HELLO => {
                let identity = postcard::to_allocvec(self.wan.identity()).map_err(|source| {
                    MembershipError::Decode {
                        what: "own identity",
                        source,
                    }
                })?;
                out.push(Output::Send {
                    to: from,
                    bytes: tagged(tag::HELLO_REPLY, &identity),
                });
                Ok(())
            }
            tag::HELLO_REPLY => {
                let peer: NodeIdentity =
                    postcard::from_bytes(body).map_err(|source| MembershipError::Decode {
                        what: "hello reply",
                        source,
                    })?;
                self.greet(peer, out)
            }
            tag::DIRECTORY_REQUEST => {
                let shared = lock(&self.shared);
                for record in shared
                    .directory
                    .encoded_records()
                    .take(DIRECTORY_REGIONS_MAX)
                {
                    out.push(Output::Send {
                        to: from,
                        bytes: tagged(tag::DIRECTORY_RECORD, record),
                    });
                }
                Ok(())
            }
            tag::DIRECTORY_RECORD => {
                // Through foca, so that a record new to us is also spread further.
                RegionRecord::decode(body)?;
                let result = self.wan.add_broadcast(body);
                self.drain_directory(out);
                result.map(|_| ()).map_err(|source| MembershipError::Foca {
                    pool: Pool::Wan,
                    source,
                })
            }
            other => Err(MembershipError::UnknownTag(other)),
        }
    }

    /// Handles a timer set by an earlier [`Output::SetTimer`].
    pub fn handle_timer(
        &mut self,
        timer: Timer,
        out: &mut Vec<Output>,
    ) -> Result<(), MembershipError> {
        match timer {
            Timer::Lan(event) => self.with_lan(out, |foca, rt| foca.handle_timer(event, rt)),
            Timer::Wan(event) => self.with_wan(out, |foca, rt| foca.handle_timer(event, rt)),
            Timer::JoinRetry => {
                if self.state == [PoolState::Undead; 2] {
                    // We left (or can renew in neither pool): nothing to retry.
                    return Ok(());
                }
                if self.wan_members.is_empty() && self.state[Pool::Wan.index()] != PoolState::Undead
                {
                    self.say_hello(out);
                }
                let lan = self.reconnect(Pool::Lan, out);
                let wan = self.reconnect(Pool::Wan, out);
                out.push(Output::SetTimer {
                    after: Duration::from_millis(JOIN_RETRY_INTERVAL_MS),
                    timer: Timer::JoinRetry,
                });
                lan.and(wan)
            }
            Timer::DirectoryPull => {
                if !self.wan_members.is_empty() {
                    let pick = self.rng.random_range(0..self.wan_members.len());
                    if let Some(peer) = self.wan_members.values().nth(pick) {
                        out.push(Output::Send {
                            to: peer.gossip_addr(),
                            bytes: vec![tag::DIRECTORY_REQUEST],
                        });
                    }
                }
                out.push(Output::SetTimer {
                    after: Duration::from_millis(DIRECTORY_PULL_INTERVAL_MS),
                    timer: Timer::DirectoryPull,
                });
                Ok(())
            }
        }
    }

    /// Live members of our region, by node id (ourselves excluded).
    pub fn lan_members(&self) -> impl Iterator<Item = &NodeIdentity> {
        self.lan_members.values()
    }

    /// Live members of every region, by node id (ourselves excluded).
    pub fn wan_members(&self) -> impl Iterator<Item = &NodeIdentity> {
        self.wan_members.values()
    }

    /// Live WAN members of `region`, by node id.
    pub fn wan_members_of<'a>(
        &'a self,
        region: &'a str,
    ) -> impl Iterator<Item = &'a NodeIdentity> + 'a {
        self.wan_members
            .values()
            .filter(move |m| m.region() == region)
    }

    /// Every known region's record, by region name.
    pub fn regions(&self) -> Vec<RegionRecord> {
        lock(&self.shared).directory.records().cloned().collect()
    }

    /// The CIDR trie of all known regions.
    pub fn region_map(&self) -> Result<RegionMap, RegionError> {
        lock(&self.shared).directory.region_map()
    }

    /// The hash ring of our region: the live LAN members and ourselves.
    pub fn local_ring(&self, config: RingConfig) -> Ring {
        Ring::new(self.lan_members.values().chain([self.identity()]), config)
    }

    /// For each other region, a ring over its live WAN members: where a forwarded flow or
    /// claim is sent (see [`crate::route`]).
    pub fn remote_rings(&self, config: RingConfig) -> BTreeMap<String, Ring> {
        let mut by_region: BTreeMap<&str, Vec<&NodeIdentity>> = BTreeMap::new();
        for member in self.wan_members.values() {
            if member.region() != self.identity.region() {
                by_region.entry(member.region()).or_default().push(member);
            }
        }
        by_region
            .into_iter()
            .map(|(region, members)| (region.to_owned(), Ring::new(members, config)))
            .collect()
    }

    fn say_hello(&self, out: &mut Vec<Output>) {
        for seed in &self.seeds {
            out.push(Output::Send {
                to: *seed,
                bytes: vec![tag::HELLO],
            });
        }
    }

    /// A seed told us who it is: announce ourselves to it and pull the directory.
    fn greet(&mut self, peer: NodeIdentity, out: &mut Vec<Output>) -> Result<(), MembershipError> {
        if peer.node_id() == self.identity.node_id() {
            return Ok(());
        }
        out.push(Output::Send {
            to: peer.gossip_addr(),
            bytes: vec![tag::DIRECTORY_REQUEST],
        });
        let wan = self.with_wan(out, |foca, rt| foca.announce(peer.clone(), rt));
        let lan = if peer.region() == self.identity.region() {
            self.with_lan(out, |foca, rt| foca.announce(peer, rt))
        } else {
            Ok(())
        };
        wan.and(lan)
    }

    /// If `pool` is not connected, announces ourselves to up to [`RECONNECT_FANOUT`]
    /// members it knows, live or down, under whatever identity it knows them by (foca
    /// accepts an announce addressed to any identity with the receiver's node id). For the
    /// LAN pool, the live WAN members of our region count as known too.
    fn reconnect(&mut self, pool: Pool, out: &mut Vec<Output>) -> Result<(), MembershipError> {
        if self.state[pool.index()] != PoolState::Disconnected {
            return Ok(());
        }
        let own = self.identity.node_id();
        let mut known: BTreeMap<&str, &NodeIdentity> = BTreeMap::new();
        let state: Vec<&foca::Member<NodeIdentity>> = match pool {
            Pool::Lan => self.lan.iter_membership_state().collect(),
            Pool::Wan => self.wan.iter_membership_state().collect(),
        };
        for member in state {
            if pool == Pool::Wan || member.id().region() == self.identity.region() {
                known.insert(member.id().node_id(), member.id());
            }
        }
        if pool == Pool::Lan {
            for member in self.wan_members_of(self.identity.region()) {
                known.entry(member.node_id()).or_insert(member);
            }
        }
        known.remove(own);
        // A random pick without replacement, in node id order so one seed gives one run.
        let mut candidates: Vec<NodeIdentity> = known.into_values().cloned().collect();
        let mut chosen = Vec::with_capacity(RECONNECT_FANOUT);
        while chosen.len() < RECONNECT_FANOUT && !candidates.is_empty() {
            let pick = self.rng.random_range(0..candidates.len());
            chosen.push(candidates.swap_remove(pick));
        }
        let mut result = Ok(());
        for member in chosen {
            let announced = match pool {
                Pool::Lan => self.with_lan(out, |foca, rt| foca.announce(member, rt)),
                Pool::Wan => self.with_wan(out, |foca, rt| foca.announce(member, rt)),
            };
            result = result.and(announced);
        }
        result
    }

    /// Refuses LAN packets whose sender is of another region before foca adds it.
    fn check_lan_sender(&self, body: &[u8]) -> Result<(), MembershipError> {
        let (header, _): (foca::Header<NodeIdentity>, _) = postcard::take_from_bytes(body)
            .map_err(|source| MembershipError::Decode {
                what: "LAN header",
                source,
            })?;
        if header.src.region() != self.identity.region() {
            return Err(MembershipError::ForeignRegion {
                node: header.src.node_id().to_owned(),
                region: header.src.region().to_owned(),
            });
        }
        Ok(())
    }

    fn with_lan(
        &mut self,
        out: &mut Vec<Output>,
        call: impl FnOnce(&mut LanFoca, &mut Collect<'_>) -> Result<(), foca::Error>,
    ) -> Result<(), MembershipError> {
        let mut rt = Collect {
            pool: Pool::Lan,
            out,
            notifications: Vec::new(),
        };
        let result = call(&mut self.lan, &mut rt);
        let notifications = std::mem::take(&mut rt.notifications);
        self.apply_all(Pool::Lan, notifications, out);
        result.map_err(|source| MembershipError::Foca {
            pool: Pool::Lan,
            source,
        })
    }

    fn with_wan(
        &mut self,
        out: &mut Vec<Output>,
        call: impl FnOnce(&mut WanFoca, &mut Collect<'_>) -> Result<(), foca::Error>,
    ) -> Result<(), MembershipError> {
        let mut rt = Collect {
            pool: Pool::Wan,
            out,
            notifications: Vec::new(),
        };
        let result = call(&mut self.wan, &mut rt);
        let notifications = std::mem::take(&mut rt.notifications);
        self.apply_all(Pool::Wan, notifications, out);
        self.drain_directory(out);
        result.map_err(|source| MembershipError::Foca {
            pool: Pool::Wan,
            source,
        })
    }

    fn drain_directory(&mut self, out: &mut Vec<Output>) {
        let updated = std::mem::take(&mut lock(&self.shared).updated);
        out.extend(
            updated
                .into_iter()
                .map(|record| Output::RegionUpdated { record }),
        );
    }

    /// Applies the notifications of one foca call in order. If we renewed our identity in
    /// `pool` and the pool is still not connected at the end, announces the new identity
    /// at once (see [`RECONNECT_FANOUT`]) instead of waiting for the next retry.
    fn apply_all(
        &mut self,
        pool: Pool,
        notifications: Vec<OwnedNotification<NodeIdentity>>,
        out: &mut Vec<Output>,
    ) {
        let mut rejoined = false;
        for notification in notifications {
            rejoined |= matches!(notification, OwnedNotification::Rejoin(_));
            self.apply(pool, notification, out);
        }
        if rejoined {
            // An announce produces no notification, so this does not recurse further. A
            // failure is a foca encoding error on our own message; the retry timer tries
            // again.
            let _ = self.reconnect(pool, out);
        }
    }

    /// Applies one foca notification to the member lists and reports it.
    fn apply(
        &mut self,
        pool: Pool,
        notification: OwnedNotification<NodeIdentity>,
        out: &mut Vec<Output>,
    ) {
        match notification {
            OwnedNotification::MemberUp(member) => {
                if pool == Pool::Lan && member.region() != self.identity.region() {
                    // check_lan_sender keeps senders out; this keeps out foreign members
                    // gossiped by a misconfigured peer.
                    return;
                }
                let first_wan_peer = pool == Pool::Wan && self.wan_members.is_empty();
                self.members_mut(pool)
                    .insert(member.node_id().to_owned(), member.clone());
                if pool == Pool::Wan {
                    if first_wan_peer {
                        out.push(Output::Send {
                            to: member.gossip_addr(),
                            bytes: vec![tag::DIRECTORY_REQUEST],
                        });
                    }
                    if member.region() == self.identity.region()
                        && !self.lan_members.contains_key(member.node_id())
                    {
                        // Fill the LAN pool from the WAN pool. A failure here is a foca
                        // encoding error on our own message, reported by the next input.
                        let _ = self.with_lan(out, |foca, rt| foca.announce(member.clone(), rt));
                    }
                }
                out.push(Output::MemberUp { member, pool });
            }
            OwnedNotification::MemberDown(member) => {
                let members = self.members_mut(pool);
                // Only forget the entry if it is this identity, not a newer one.
                if members.get(member.node_id()) == Some(&member) {
                    members.remove(member.node_id());
                }
                out.push(Output::MemberDown { member, pool });
            }
            OwnedNotification::Rename(before, after) => {
                let members = self.members_mut(pool);
                if members.contains_key(before.node_id()) {
                    members.insert(after.node_id().to_owned(), after.clone());
                }
                out.push(Output::MemberRenamed {
                    before,
                    after,
                    pool,
                });
            }
            OwnedNotification::Rejoin(identity) => {
                // foca renews by `change_identity`, which leaves the instance disconnected
                // (and its timers cancelled) until a message reaches the new identity; an
                // `Active` follows in the same call when it is connected again at once.
                self.state[pool.index()] = PoolState::Disconnected;
                out.push(Output::Rejoined { identity, pool });
            }
            OwnedNotification::Defunct => {
                // Terminal: after a leave, or when our identity cannot be renewed.
                self.state[pool.index()] = PoolState::Undead;
                out.push(Output::Defunct { pool });
            }
            OwnedNotification::Active => self.state[pool.index()] = PoolState::Connected,
            OwnedNotification::Idle => self.state[pool.index()] = PoolState::Disconnected,
        }
    }

    fn members_mut(&mut self, pool: Pool) -> &mut BTreeMap<String, NodeIdentity> {
        match pool {
            Pool::Lan => &mut self.lan_members,
            Pool::Wan => &mut self.wan_members,
        }
    }
}

fn tagged(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(body.len() + 1);
    bytes.push(tag);
    bytes.extend_from_slice(body);
    bytes
}
