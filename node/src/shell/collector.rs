//! The collector's tokio shell: sockets, timers, the sink writer and HTTP around one
//! [`NodeCore`]. Thin by design: every decision is the core's; this module moves bytes,
//! reads the clock (through `clock::now`) and bounds every queue.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use tenure_attribution::{EngineConfig, UnixMillis};
use tenure_gossip::handoff::HandoffConfig;
use tenure_gossip::identity::NodeIdentity;
use tenure_gossip::membership::{self, Pool};
use tenure_gossip::ring::RingConfig;
use tenure_gossip::wire::{self, AckStatus, AlignedVec, Message};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};

use super::clock;
use super::metrics as m;
use super::transport::{read_messages, Crypto, FrameOrigin, Keys, ReadTimeouts, TransportError};
use crate::config::{CollectorConfig, SinkConfig};
use crate::core::{
    ConnId, CoreConfig, Dest, EmittedFlow, Entitlements, JournalOp, NodeCore, Notice, Output,
    Rejection, TICK_INTERVAL_MS,
};
use crate::deps::Dependencies;
use crate::journal::Journal;
use crate::report::Chain;
use crate::sink;

/// Frames queued for one connection; past it frames to it are dropped and counted (the
/// sender's ack timeout re-sends them).
pub const CONN_QUEUE_FRAMES_MAX: usize = 1_024;
/// Timers queued between the core and the timer task.
pub const TIMER_QUEUE_MAX: usize = 16_384;
/// How long connecting to a peer may take, in ms.
pub const CONNECT_TIMEOUT_MS: u64 = 2_000;
/// Datagrams received at once.
const DATAGRAM_BUFFER_BYTES: usize = 9_000;
/// How often the sink writer flushes (and rolls Parquet files whose time is up), in ms.
const SINK_FLUSH_INTERVAL_MS: u64 = 500;
/// Flows handed to the sink writer in one batch.
const SINK_BATCH_FLOWS_MAX: usize = 1_024;
/// The largest outputs vector kept for the next core call (a few MB).
const SPARE_OUTPUTS_MAX: usize = 16_384;
/// Connections held at once (inbound plus outbound); past it new inbound ones are closed.
pub const CONNECTIONS_MAX: usize = 4_096;

/// What a running collector tells its starter.
#[derive(Clone, Debug)]
pub struct Bound {
    pub node_id: String,
    pub region: String,
    pub gossip_addr: SocketAddr,
    pub data_addr: SocketAddr,
    pub http_addr: SocketAddr,
}

/// State shared by the collector's tasks.
pub(crate) struct Shared {
    pub(crate) core: Mutex<NodeCore>,
    pub(crate) crypto: Crypto,
    conns: Mutex<BTreeMap<ConnId, mpsc::Sender<Vec<u8>>>>,
    /// Who sealed the frames of each inbound connection, and with which key: replies to an
    /// exporter go out under its own key.
    origins: Mutex<BTreeMap<ConnId, FrameOrigin>>,
    /// Inbound connections per remote IP, bounded by `connections_per_ip_max`.
    per_ip: Mutex<BTreeMap<std::net::IpAddr, usize>>,
    connections_per_ip_max: usize,
    timeouts: ReadTimeouts,
    pub(crate) http_request_timeout_ms: u64,
    peers: Mutex<BTreeMap<SocketAddr, ConnId>>,
    next_conn: AtomicU64,
    udp: Arc<UdpSocket>,
    timers: mpsc::Sender<(u64, membership::Timer)>,
    /// Batches of at most [`SINK_BATCH_FLOWS_MAX`] flows.
    sink: mpsc::Sender<Vec<EmittedFlow>>,
    tap: Option<mpsc::Sender<EmittedFlow>>,
    pub(crate) deps: Mutex<Dependencies>,
    pub(crate) node: String,
    pub(crate) bound: Bound,
    pub(crate) event_token: Option<String>,
    /// This collector's clock: the system clock plus the admin-set offset.
    pub(crate) clock: clock::Clock,
    /// The bearer token of `/admin/*`; `None` when fault injection is disabled.
    pub(crate) admin_token: Option<String>,
    /// node id → (region, up), from membership notices, for metrics and /v1/cluster.
    pub(crate) roster: Mutex<BTreeMap<String, (String, bool)>>,
    pub(crate) started: UnixMillis,
    /// Where peers serve HTTP, for cluster-wide queries.
    pub(crate) peer_http: super::fanout::PeerHttp,
    durability: Durability,
    /// [`refusals`] when the gauges were last refreshed after a message.
    refusals_published: AtomicU64,
    /// The outputs vector of an earlier core call, emptied, for the next one: a claim
    /// batch emits thousands of flows, which a vector grown from nothing copies over and
    /// over as it doubles.
    spare_outputs: Mutex<Vec<Output>>,
}

/// Claims and exporter messages refused so far, every reason together.
fn refusals(core: &NodeCore) -> u64 {
    let admission = core.admission_stats();
    admission.claims_rejected.values().sum::<u64>()
        + admission.messages_rejected.values().sum::<u64>()
        + core.engine().stats().claims_rejected
}

/// The journal and what orders its releases after the sink.
struct Durability {
    journal: Mutex<Journal>,
    /// Flows handed to the sink queue so far.
    emitted: AtomicU64,
    /// Flows the sink writer has written and flushed (the first `n` queued).
    sink_durable: Arc<AtomicU64>,
    /// Releases waiting until `sink_durable` reaches the count of flows emitted before
    /// them: a release must not outlive a flow the sink has not written.
    releases: Mutex<Vec<(u64, Vec<u64>)>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("node", &self.node).finish()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Runs `f` on the core with the current time, then acts on its outputs.
    pub(crate) async fn with_core<R>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut NodeCore, UnixMillis, &mut Vec<Output>) -> R,
    ) -> R {
        let mut out = std::mem::take(&mut *lock(&self.spare_outputs));
        let result = {
            let mut core = lock(&self.core);
            f(&mut core, self.clock.now(), &mut out)
        };
        self.dispatch(out).await;
        result
    }

    async fn dispatch(self: &Arc<Self>, mut outputs: Vec<Output>) {
        let mut tally = EmitTally::default();
        // Emitted flows go to the sink in batches: one queue slot, one lock of the
        // dependency table and one count per batch, not per flow. A release waits for every
        // flow emitted before it, so the batch is handed over before a release is noted.
        let room = outputs.len().min(SINK_BATCH_FLOWS_MAX);
        let mut emitted: Vec<EmittedFlow> = Vec::with_capacity(room);
        for output in outputs.drain(..) {
            match output {
                Output::Frame { to, message } => self.send_frame(to, &message),
                Output::Datagram { to, bytes } => match self.crypto.datagram(&bytes) {
                    Ok(sealed) => {
                        if let Err(e) = self.udp.try_send_to(&sealed, to) {
                            tracing::debug!(%to, error = %e, "gossip send");
                        }
                    }
                    Err(e) => tracing::warn!(error = %Chain(&e), "sealing a datagram"),
                },
                Output::Timer { after_ms, timer } => {
                    if self.timers.try_send((after_ms, timer)).is_err() {
                        tracing::warn!("timer queue full; a membership timer was lost");
                    }
                }
                Output::Emit(flow) => {
                    tally.count(&self.node, &flow);
                    emitted.push(flow);
                    if emitted.len() >= SINK_BATCH_FLOWS_MAX {
                        self.emit(std::mem::replace(&mut emitted, Vec::with_capacity(room)))
                            .await;
                    }
                }
                Output::Notice(notice) => self.notice(notice),
                Output::Journal(JournalOp::Append { id, record }) => {
                    if let Err(e) = lock(&self.durability.journal).append_record(id, &record) {
                        // Its ack is never sent: the exporter re-sends the batch.
                        metrics::counter!("tenure_journal_errors_total", "node" => self.node.clone()).increment(1);
                        tracing::error!(node = %self.node, error = %Chain(&e), "journal append failed");
                    }
                }
                Output::Journal(JournalOp::Release { ids }) => {
                    if !emitted.is_empty() {
                        self.emit(std::mem::replace(&mut emitted, Vec::with_capacity(room)))
                            .await;
                    }
                    // Released once the sink holds every flow emitted up to now.
                    let emitted = self.durability.emitted.load(Ordering::SeqCst);
                    lock(&self.durability.releases).push((emitted, ids));
                }
            }
        }
        self.emit(emitted).await;
        tally.flush(&self.node);
        let mut spare = lock(&self.spare_outputs);
        if outputs.capacity() <= SPARE_OUTPUTS_MAX && outputs.capacity() > spare.capacity() {
            *spare = outputs;
        }
    }

    /// Hands a batch of emitted flows to the dependency table, the tap and the sink.
    async fn emit(&self, flows: Vec<EmittedFlow>) {
        if flows.is_empty() {
            return;
        }
        {
            let mut deps = lock(&self.deps);
            for flow in &flows {
                deps.record(flow);
            }
        }
        if let Some(tap) = &self.tap {
            // The demo's tally: it must see every flow, so wait for room.
            for flow in &flows {
                let _ = tap.send(flow.clone()).await;
            }
        }
        let n = flows.len() as u64;
        // Waiting here is the backpressure: connection readers stop reading.
        if self.sink.send(flows).await.is_err() {
            tracing::error!("sink writer is gone; flows could not be written");
        }
        self.durability.emitted.fetch_add(n, Ordering::SeqCst);
    }

    fn notice(&self, notice: Notice) {
        match notice {
            Notice::MemberUp {
                node_id,
                region,
                pool,
            } => {
                tracing::info!(node = %self.node, member = %node_id, %region, %pool, "member up");
                if pool == Pool::Wan {
                    lock(&self.roster).insert(node_id, (region, true));
                    self.member_gauges();
                }
            }
            Notice::MemberDown {
                node_id,
                region,
                pool,
            } => {
                tracing::info!(node = %self.node, member = %node_id, %region, %pool, "member down");
                if pool == Pool::Wan {
                    lock(&self.roster).insert(node_id, (region, false));
                    self.member_gauges();
                }
            }
            Notice::RingChanged {
                members,
                pending_spans,
            } => {
                tracing::info!(node = %self.node, members, pending_spans, "ring changed");
            }
            Notice::RegionUpdated { region, version } => {
                tracing::info!(node = %self.node, %region, version, "region record updated");
            }
            Notice::Conflict(c) => {
                metrics::counter!(m::CONFLICTS, "node" => self.node.clone()).increment(1);
                tracing::warn!(node = %self.node, ip = %c.ip, existing = %c.existing, claimant = %c.claimant, "conflicting ownership claims");
            }
            Notice::ClaimDropped { ip, why } => {
                tracing::debug!(node = %self.node, %ip, %why, "claim dropped");
            }
            Notice::Defunct => {
                tracing::error!(node = %self.node, "declared down and cannot renew; restart this node")
            }
        }
    }

    fn member_gauges(&self) {
        let roster = lock(&self.roster);
        let mut counts: BTreeMap<(String, bool), u64> = BTreeMap::new();
        for (region, up) in roster.values() {
            // Both states of every region seen, so that a count that fell to 0 reads 0.
            counts.entry((region.clone(), !*up)).or_default();
            *counts.entry((region.clone(), *up)).or_default() += 1;
        }
        for ((region, up), n) in counts {
            let state = if up { "alive" } else { "down" };
            metrics::gauge!(m::MEMBERS, "node" => self.node.clone(), "region" => region, "state" => state).set(n as f64);
        }
    }

    fn send_frame(self: &Arc<Self>, to: Dest, message: &Message) {
        // A reply goes out under the key its connection's frames came with (an exporter's
        // own); everything else under the cluster key. Sealed once.
        let origin = match &to {
            Dest::Conn(id) => lock(&self.origins).get(id).copied(),
            Dest::Peer { .. } => None,
        };
        let bytes = match self.crypto.frame_to(message, origin) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %Chain(&e), "encoding a frame");
                return;
            }
        };
        if let (Dest::Peer { region, .. }, Message::FlowBatch(batch)) = (&to, message) {
            metrics::counter!(m::FLOWS_FORWARDED, "node" => self.node.clone(), "region" => region.clone()).increment(batch.flows.len() as u64);
        }
        if let Dest::Peer { .. } = &to {
            let kind = message_kind(message);
            debug_assert!(m::PEER_MESSAGE_KINDS.contains(&kind), "{kind}");
            metrics::counter!(m::PEER_BYTES_SENT, "node" => self.node.clone(), "message" => kind)
                .increment(bytes.len() as u64);
            metrics::counter!(m::PEER_FRAMES_SENT, "node" => self.node.clone(), "message" => kind)
                .increment(1);
        }
        let conn = match &to {
            Dest::Conn(id) => *id,
            Dest::Peer { data_addr, .. } => self.peer_conn(*data_addr),
        };
        let sender = lock(&self.conns).get(&conn).cloned();
        match sender {
            Some(s) if s.try_send(bytes).is_ok() => {}
            Some(_) | None => {
                metrics::counter!(m::FRAMES_DROPPED, "node" => self.node.clone()).increment(1);
                tracing::debug!(?to, "connection gone or full; frame dropped");
            }
        }
    }

    /// The outbound connection to `addr`, started if there is none.
    fn peer_conn(self: &Arc<Self>, addr: SocketAddr) -> ConnId {
        if let Some(id) = lock(&self.peers).get(&addr) {
            return *id;
        }
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(CONN_QUEUE_FRAMES_MAX);
        lock(&self.conns).insert(id, tx);
        lock(&self.peers).insert(addr, id);
        let shared = self.clone();
        tokio::spawn(async move {
            let connect = tokio::time::timeout(
                Duration::from_millis(CONNECT_TIMEOUT_MS),
                TcpStream::connect(addr),
            )
            .await;
            match connect {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    shared.clone().serve(id, stream, rx).await;
                }
                Ok(Err(e)) => tracing::debug!(%addr, error = %e, "connecting to a peer"),
                Err(_) => tracing::debug!(%addr, "connecting to a peer timed out"),
            }
            lock(&shared.peers).remove(&addr);
            lock(&shared.conns).remove(&id);
        });
        id
    }

    /// Serves one connection (either direction): writes queued frames, reads messages
    /// into the core.
    async fn serve(
        self: Arc<Self>,
        id: ConnId,
        stream: TcpStream,
        mut rx: mpsc::Receiver<Vec<u8>>,
    ) {
        let (reader, mut writer) = stream.into_split();
        let write = async move {
            while let Some(bytes) = rx.recv().await {
                if writer.write_all(&bytes).await.is_err() {
                    break;
                }
            }
        };
        let shared = self.clone();
        let read = read_messages(
            &self.crypto,
            reader,
            self.timeouts,
            |origin, message| {
                let shared = shared.clone();
                lock(&shared.origins).insert(id, origin);
                async move { shared.on_message(id, origin, message).await }
            },
            |e| {
                if let TransportError::Timeout {
                    partial_frame: false,
                } = e
                {
                    metrics::counter!(m::CONNECTIONS_IDLE_CLOSED, "node" => self.node.clone())
                        .increment(1);
                    tracing::debug!(node = %self.node, error = %Chain(e), "idle connection closed");
                    return;
                }
                metrics::counter!(m::FRAMES_REJECTED, "node" => self.node.clone(), "reason" => e.reason()).increment(1);
                tracing::warn!(node = %self.node, error = %Chain(e), "frame rejected; closing the connection");
            },
        );
        tokio::select! {
            _ = write => {}
            end = read => {
                if !matches!(end, TransportError::Closed) {
                    tracing::debug!(error = %Chain(&end), "connection ended");
                }
            }
        }
    }

    async fn on_message(self: &Arc<Self>, conn: ConnId, origin: FrameOrigin, message: Message) {
        if let Message::FlowBatch(batch) = &message {
            metrics::counter!(m::FLOWS_IN, "node" => self.node.clone())
                .increment(batch.flows.len() as u64);
            // The sink queue is the last queue: when it is nearly full, exporters wait.
            if batch.hops == 0 && self.sink.capacity() < self.sink.max_capacity() / 8 {
                metrics::counter!(m::BATCHES, "node" => self.node.clone(), "status" => "busy")
                    .increment(1);
                self.send_frame(
                    Dest::Conn(conn),
                    &Message::Ack(wire::Ack {
                        batch_id: batch.batch_id,
                        status: AckStatus::Busy {
                            retry_after_ms: 1_000,
                        },
                    }),
                );
                return;
            }
        }
        let refusals = self
            .with_core(|core, now, out| {
                core.handle_message_from(conn, origin.sender, message, now, out);
                refusals(core)
            })
            .await;
        // Refusals show in /metrics at once; everything else waits for the next tick.
        if self.refusals_published.swap(refusals, Ordering::Relaxed) != refusals {
            self.update_gauges();
        }
    }

    /// Refreshes the engine and admission gauges; the timer task calls it every tick
    /// (`TICK_INTERVAL_MS`), and a message only when it was refused or had claims refused:
    /// it takes the core's lock and looks up a dozen metrics.
    fn update_gauges(&self) {
        let core = lock(&self.core);
        let memory = core.engine().memory();
        let stats = core.engine().stats();
        let node = self.node.clone();
        metrics::gauge!(m::FLOWS_PENDING, "node" => node.clone())
            .set((memory.pending_flows + core.held_len()) as f64);
        metrics::gauge!(m::FLOWS_SETTLING, "node" => node.clone())
            .set(core.engine().settling_len() as f64);
        metrics::gauge!(m::RANGES, "node" => node.clone()).set(memory.segments as f64);
        metrics::gauge!(m::IPS_TRACKED, "node" => node.clone()).set(memory.ips as f64);
        metrics::gauge!(m::ENGINE_TABLE_BYTES, "node" => node.clone())
            .set(memory.table_bytes as f64);
        metrics::counter!(m::CLAIMS_APPLIED, "node" => node.clone()).absolute(stats.claims_applied);
        metrics::counter!(m::FLOWS_ALREADY_HELD, "node" => node.clone())
            .absolute(core.stats().flows_already_held);
        metrics::counter!(m::EXPORTER_CLOCK_OFF_BATCHES, "node" => node.clone())
            .absolute(core.stats().batches_clock_off);
        metrics::counter!(m::CLAIMS_REJECTED, "node" => node.clone(), "reason" => "engine")
            .absolute(stats.claims_rejected);
        let admission = core.admission_stats();
        for reason in Rejection::ALL {
            let claims = admission.claims_rejected.get(&reason).copied().unwrap_or(0);
            let messages = admission
                .messages_rejected
                .get(&reason)
                .copied()
                .unwrap_or(0);
            metrics::counter!(m::CLAIMS_REJECTED, "node" => node.clone(), "reason" => reason.as_str())
                .absolute(claims);
            metrics::counter!(m::EXPORTER_MESSAGES_REJECTED, "node" => node.clone(), "reason" => reason.as_str())
                .absolute(messages);
        }
        metrics::gauge!(m::EXPORTERS_TRACKED, "node" => node)
            .set(admission.exporters_tracked as f64);
    }
}

/// Runs a collector until `shutdown` resolves, then leaves gracefully. `bound` receives
/// the addresses once every socket is bound. `tap` receives a copy of every emitted flow
/// (the demo's tally).
pub async fn run(
    config: CollectorConfig,
    shutdown: impl Future<Output = ()>,
    bound_tx: Option<tokio::sync::oneshot::Sender<Bound>>,
    tap: Option<mpsc::Sender<EmittedFlow>>,
) -> anyhow::Result<()> {
    run_reloadable(config, None, shutdown, bound_tx, tap).await
}

/// Like [`run`]; with `config_path`, a SIGHUP re-reads that file and replaces the keys
/// (cluster and exporter keys and their second accepted keys) without a restart, which is
/// how keys rotate. Other changes in the file wait for a restart. A file that does not
/// parse, or keys that do not load, are logged and counted, and the running keys stay.
pub async fn run_reloadable(
    config: CollectorConfig,
    config_path: Option<std::path::PathBuf>,
    shutdown: impl Future<Output = ()>,
    bound_tx: Option<tokio::sync::oneshot::Sender<Bound>>,
    tap: Option<mpsc::Sender<EmittedFlow>>,
) -> anyhow::Result<()> {
    config.validate()?;
    let (keys, entitlements) = load_keys(&config).context("keys")?;
    let admin_token = config.admin.resolve_token().context("[admin]")?;
    if admin_token.is_some() {
        tracing::warn!(node = %config.node_id, "admin fault injection is enabled (/admin/clock); do not run this in production");
    }
    if config.dev_exporters_use_cluster_key
        && config.exporter_key.is_none()
        && config.exporter_registry.is_none()
    {
        tracing::warn!(node = %config.node_id, "development mode: exporters use the cluster key, so any exporter can speak as a collector and claim any IP of the region under any name; do not run this in production");
    } else if config.exporter_key.is_some() {
        tracing::warn!(node = %config.node_id, "exporters share one key (exporter_key): any exporter can claim any IP of the region under any exporter id; give each its own credential (exporter_registry)");
    }

    let udp = Arc::new(
        UdpSocket::bind(config.gossip_addr)
            .await
            .with_context(|| format!("binding gossip {}", config.gossip_addr))?,
    );
    let data = TcpListener::bind(config.data_addr)
        .await
        .with_context(|| format!("binding data {}", config.data_addr))?;
    let http = TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding http {}", config.http_addr))?;
    let advertise = |addr: SocketAddr| match config.advertise_host {
        Some(host) => SocketAddr::new(host, addr.port()),
        None => addr,
    };
    let gossip_addr = advertise(udp.local_addr()?);
    let data_addr = advertise(data.local_addr()?);
    let http_addr = http.local_addr()?;

    let start = clock::now();
    let identity = NodeIdentity::new(
        &config.node_id,
        &config.region,
        gossip_addr,
        data_addr,
        start.0,
    )?;
    let sender_id = fnv64(config.node_id.as_bytes());
    let state_dir = config.data_dir.join(&config.node_id);
    let epoch = super::epoch::next(&state_dir, start.0).context("choosing the sender epoch")?;
    let crypto = Crypto::with_keys(keys, sender_id, epoch);
    // The engine's and the core's hash tables are keyed by what exporters send (IPs, flow
    // ids, workload names): seeded from the OS, so that nobody can aim keys at one bucket.
    let mut os_seeded: rand::rngs::StdRng = rand::make_rng();
    let engine = EngineConfig {
        hash_seed: rand::RngExt::random(&mut os_seeded),
        ..config.engine_config()
    };
    let core_config = CoreConfig {
        identity,
        seeds: config.seeds.clone(),
        rng_seed: start.0 ^ sender_id,
        region_size_hint: NonZeroU32::new(config.region_size_hint.max(1))
            .unwrap_or(NonZeroU32::MIN),
        fleet_size_hint: NonZeroU32::new(config.fleet_size_hint.max(1)).unwrap_or(NonZeroU32::MIN),
        region_prefixes: config.prefixes.clone(),
        region_version: config.region_version,
        static_regions: config
            .regions
            .iter()
            .flat_map(|(region, nets)| nets.iter().map(move |n| (*n, region.clone())))
            .collect(),
        ring: RingConfig {
            replication: NonZeroUsize::new(config.replication).unwrap_or(NonZeroUsize::MIN),
            ..RingConfig::default()
        },
        handoff: HandoffConfig {
            heartbeat_interval_ms: config.heartbeat_interval_ms,
            retention_ms: engine.retention_ms,
            ..HandoffConfig::default()
        },
        engine,
        forward_ack_timeout_ms: config.forward_ack_timeout_ms,
        held_flows_max: config.held_flows_max,
        inflight_flows_max: config.inflight_flows_max,
        busy_flows_threshold: config.busy_flows_threshold,
        busy_retry_after_ms: config.heartbeat_interval_ms.min(5_000),
    };
    let mut core = NodeCore::new(core_config, start)?;
    core.set_admission(config.admission());
    core.set_entitlements(entitlements);
    m::init_collector(
        &config.node_id,
        &config.region,
        config
            .regions
            .keys()
            .filter(|r| **r != config.region)
            .map(String::as_str),
    );
    let journal_dir = config.data_dir.join(&config.node_id).join("journal");
    let (journal, replay) = Journal::open(&journal_dir)
        .with_context(|| format!("opening the journal in {}", journal_dir.display()))?;
    metrics::counter!("tenure_journal_corrupt_records_total", "node" => config.node_id.clone())
        .increment(replay.corrupt_records);
    let recovered_flows: usize = replay.entries.iter().map(|(_, f)| f.len()).sum();
    metrics::counter!("tenure_journal_recovered_flows_total", "node" => config.node_id.clone())
        .increment(recovered_flows as u64);
    if replay.corrupt_records > 0 || recovered_flows > 0 {
        tracing::warn!(node = %config.node_id, flows = recovered_flows, appends = replay.entries.len(), corrupt = replay.corrupt_records, "replaying the journal");
    }
    let sink_durable = Arc::new(AtomicU64::new(0));

    // The queue holds batches; its bound in flows stays about `sink_queue_flows_max`.
    let (sink_tx, sink_rx) =
        mpsc::channel(config.sink_queue_flows_max.div_ceil(SINK_BATCH_FLOWS_MAX));
    let (timer_tx, timer_rx) = mpsc::channel(TIMER_QUEUE_MAX);
    let bound = Bound {
        node_id: config.node_id.clone(),
        region: config.region.clone(),
        gossip_addr,
        data_addr,
        http_addr,
    };
    let hash_seed = core.engine().config().hash_seed;
    let shared = Arc::new(Shared {
        core: Mutex::new(core),
        crypto,
        conns: Mutex::new(BTreeMap::new()),
        origins: Mutex::new(BTreeMap::new()),
        per_ip: Mutex::new(BTreeMap::new()),
        connections_per_ip_max: config.connections_per_ip_max,
        timeouts: ReadTimeouts {
            idle_ms: config.conn_idle_timeout_ms,
            frame_ms: config.frame_read_timeout_ms,
        },
        http_request_timeout_ms: config.http_request_timeout_ms,
        peers: Mutex::new(BTreeMap::new()),
        next_conn: AtomicU64::new(1),
        udp: udp.clone(),
        timers: timer_tx,
        sink: sink_tx,
        tap,
        deps: Mutex::new(Dependencies::new(hash_seed)),
        node: config.node_id.clone(),
        bound: bound.clone(),
        event_token: config.event_feed_token.clone(),
        clock: clock::Clock::new(),
        admin_token,
        roster: Mutex::new(BTreeMap::new()),
        started: start,
        peer_http: super::fanout::PeerHttp::new(
            config.peer_http_addrs.clone(),
            config.peer_http_port.unwrap_or(http_addr.port()),
        ),
        durability: Durability {
            journal: Mutex::new(journal),
            emitted: AtomicU64::new(0),
            sink_durable: sink_durable.clone(),
            releases: Mutex::new(Vec::new()),
        },
        refusals_published: AtomicU64::new(0),
        spare_outputs: Mutex::new(Vec::new()),
    });
    let _ = m::handle();

    let (stop_tx, stop_rx) = watch::channel(false);
    // The sink writer has a thread (and a one-thread runtime) of its own: its writes and
    // fsyncs block, and must not hold up the workers that serve connections.
    let (sink_done_tx, sink_task) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
    {
        let (sink_config, stop) = (config.sink.clone(), stop_rx.clone());
        std::thread::Builder::new()
            .name("tenure-sink".into())
            .spawn(move || {
                let written = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .context("starting the sink writer's runtime")
                    .and_then(|rt| {
                        rt.block_on(sink_writer(sink_config, sink_rx, stop, sink_durable))
                    });
                let _ = sink_done_tx.send(written);
            })
            .context("starting the sink writer's thread")?;
    }
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(gossip_reader(
        shared.clone(),
        udp,
        stop_rx.clone(),
    )));
    tasks.push(tokio::spawn(accept_loop(
        shared.clone(),
        data,
        stop_rx.clone(),
    )));
    if let Some(path) = config_path {
        tasks.push(tokio::spawn(reload_on_hangup(
            shared.clone(),
            path,
            stop_rx.clone(),
        )));
    }
    tasks.push(tokio::spawn(timer_loop(
        shared.clone(),
        timer_rx,
        stop_rx.clone(),
    )));
    let http_shared = shared.clone();
    let http_timeout_ms = shared.http_request_timeout_ms;
    let mut http_stop = stop_rx.clone();
    tasks.push(tokio::spawn(async move {
        let app = super::http::router(http_shared);
        // Headers get the same deadline as the whole request.
        let header_read_timeout = Duration::from_millis(http_timeout_ms);
        super::http::serve(http, app, header_read_timeout, async move {
            stopped(&mut http_stop).await;
        })
        .await;
    }));

    shared
        .with_core(|core, now, out| core.start(now, out))
        .await;
    // Flows journaled before a restart go out again; the largest id seen keeps new
    // appends from reusing an id the journal still holds.
    let mut entries = replay.entries;
    entries.push((replay.max_id, Vec::new()));
    shared
        .with_core(|core, now, out| core.recover(entries, now, out))
        .await;
    tasks.push(tokio::spawn(group_commit(
        shared.clone(),
        config.journal_fsync_interval_ms,
        stop_rx.clone(),
    )));
    tracing::info!(node = %bound.node_id, region = %bound.region, gossip = %gossip_addr, data = %data_addr, http = %http_addr, "collector started");
    if let Some(tx) = bound_tx {
        let _ = tx.send(bound.clone());
    }

    shutdown.await;
    tracing::info!(node = %bound.node_id, "leaving the cluster");
    shared
        .with_core(|core, now, out| core.leave(now, out))
        .await;
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline {
        let unsettled = lock(&shared.core).unsettled_flows();
        if unsettled == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(TICK_INTERVAL_MS)).await;
        shared.with_core(|core, now, out| core.tick(now, out)).await;
    }
    shared
        .with_core(|core, now, out| core.abandon_inflight(now, out))
        .await;
    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    drop(shared);
    match tokio::time::timeout(Duration::from_secs(10), sink_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::error!(error = %Chain(&*e), "sink"),
        Ok(Err(e)) => tracing::error!(error = %e, "sink task"),
        Err(_) => tracing::error!("sink did not drain within 10 s"),
    }
    tracing::info!(node = %bound.node_id, "stopped");
    Ok(())
}

/// The metrics of the flows one batch of outputs emits: counted here and added once per
/// label set, with one histogram handle, instead of a registry lookup (and its label
/// allocations) per flow.
#[derive(Default)]
struct EmitTally {
    /// (result, detail) → flows.
    counts: Vec<(&'static str, &'static str, u64)>,
    delay: Option<metrics::Histogram>,
}

impl EmitTally {
    fn count(&mut self, node: &str, flow: &EmittedFlow) {
        let result = flow.result();
        let detail = match (flow.source(), flow.reason()) {
            (Some(source), _) => source,
            (None, Some(reason)) => reason.as_str(),
            (None, None) => "none",
        };
        match self
            .counts
            .iter_mut()
            .find(|(r, d, _)| *r == result && *d == detail)
        {
            Some((_, _, n)) => *n += 1,
            None => self.counts.push((result, detail, 1)),
        }
        self.delay
            .get_or_insert_with(
                || metrics::histogram!(m::ATTRIBUTION_DELAY, "node" => node.to_owned()),
            )
            .record(flow.delay_ms() as f64 / 1_000.0);
    }

    fn flush(self, node: &str) {
        for (result, detail, n) in self.counts {
            metrics::counter!(m::FLOWS_OUT, "node" => node.to_owned(), "result" => result, "detail" => detail).increment(n);
        }
    }
}

/// The `message` label of the peer traffic metrics.
fn message_kind(message: &Message) -> &'static str {
    match message {
        Message::FlowBatch(_) => "flows",
        Message::ClaimBatch(_) => "claims",
        Message::IpEventBatch(_) => "events",
        Message::RangeRequest(_) => "range_requests",
        Message::RangeSnapshot(_) => "ranges",
        Message::Ack(_) => "acks",
        Message::RegionDirectory(_) => "directory",
    }
}

/// Resolves once the stop flag is set (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// FNV-1a, for a stable sender id from a node id.
pub(crate) fn fnv64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

async fn gossip_reader(shared: Arc<Shared>, udp: Arc<UdpSocket>, mut stop: watch::Receiver<bool>) {
    let mut buf = vec![0u8; DATAGRAM_BUFFER_BYTES];
    let mut plaintext = AlignedVec::new();
    loop {
        let (n, from) = tokio::select! {
            r = udp.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "gossip receive");
                    continue;
                }
            },
            _ = stopped(&mut stop) => return,
        };
        if let Err(e) = shared.crypto.open_datagram(&buf[..n], &mut plaintext) {
            metrics::counter!(m::FRAMES_REJECTED, "node" => shared.node.clone(), "reason" => e.reason()).increment(1);
            continue;
        }
        let bytes = plaintext.to_vec();
        let result = shared
            .with_core(|core, now, out| core.handle_datagram(from, &bytes, now, out))
            .await;
        if let Err(e) = result {
            metrics::counter!(m::FRAMES_REJECTED, "node" => shared.node.clone(), "reason" => "gossip").increment(1);
            tracing::debug!(%from, error = %Chain(&e), "gossip datagram refused");
        }
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => return,
        };
        if lock(&shared.conns).len() >= CONNECTIONS_MAX {
            metrics::counter!(m::CONNECTIONS_REFUSED, "node" => shared.node.clone(), "reason" => "total").increment(1);
            tracing::warn!(%peer, "too many connections; closing a new one");
            continue;
        }
        let ip = peer.ip();
        {
            let mut per_ip = lock(&shared.per_ip);
            let held = per_ip.entry(ip).or_insert(0);
            if *held >= shared.connections_per_ip_max {
                drop(per_ip);
                metrics::counter!(m::CONNECTIONS_REFUSED, "node" => shared.node.clone(), "reason" => "per_ip").increment(1);
                tracing::debug!(%peer, "too many connections from one address; closing a new one");
                continue;
            }
            *held += 1;
        }
        let _ = stream.set_nodelay(true);
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(CONN_QUEUE_FRAMES_MAX);
        lock(&shared.conns).insert(id, tx);
        let s = shared.clone();
        tokio::spawn(async move {
            s.clone().serve(id, stream, rx).await;
            lock(&s.conns).remove(&id);
            lock(&s.origins).remove(&id);
            let mut per_ip = lock(&s.per_ip);
            if let Some(held) = per_ip.get_mut(&ip) {
                *held = held.saturating_sub(1);
                if *held == 0 {
                    per_ip.remove(&ip);
                }
            }
        });
    }
}

/// The keyrings and, with an exporter registry, each exporter's bound keys and
/// entitlements, as `config` asks for them. `TENURE_CLUSTER_KEY` overrides the cluster key.
fn load_keys(config: &CollectorConfig) -> anyhow::Result<(Keys, Option<Entitlements>)> {
    let cluster_env = std::env::var("TENURE_CLUSTER_KEY").ok();
    let (cluster, exporter) = config.keyrings(cluster_env.as_deref())?;
    let Some(path) = &config.exporter_registry else {
        return Ok((
            Keys {
                cluster,
                exporter,
                registry: None,
            },
            None,
        ));
    };
    let cluster_key = config.cluster_key.resolve(cluster_env.as_deref())?;
    let registry = crate::registry::Registry::load(path, &cluster_key)?;
    let (listed, revoked) = registry.counts();
    tracing::info!(node = %config.node_id, registry = %path.display(), exporters = listed, revoked, "exporter registry loaded");
    Ok((
        Keys {
            cluster,
            exporter,
            registry: Some(registry.keys),
        },
        Some(registry.entitlements),
    ))
}

/// Re-reads the configuration on SIGHUP and replaces the keys and the exporter registry. A
/// bad file changes nothing.
async fn reload_on_hangup(
    shared: Arc<Shared>,
    path: std::path::PathBuf,
    mut stop: watch::Receiver<bool>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; keys cannot be reloaded");
            return;
        }
    };
    loop {
        tokio::select! {
            got = hangups.recv() => if got.is_none() { return },
            _ = stopped(&mut stop) => return,
        }
        let loaded = crate::config::load::<CollectorConfig>(&path)
            .map_err(anyhow::Error::from)
            .and_then(|config| {
                config.validate()?;
                load_keys(&config)
            });
        match loaded {
            Ok((keys, entitlements)) => {
                // Under the core's lock: no batch is judged while one is replaced and not
                // the other. A batch opened under the old keys is judged by the new
                // entitlements, so a revocation applies to it too.
                {
                    let mut core = lock(&shared.core);
                    shared.crypto.replace_keys(keys);
                    core.set_entitlements(entitlements);
                }
                let (send, accepted, exporter_send, exporter_accepted) = shared.crypto.key_ids();
                let (exporters, exporter_keys) = shared.crypto.registry_size();
                metrics::counter!(m::KEY_RELOADS, "node" => shared.node.clone(), "result" => "ok")
                    .increment(1);
                tracing::info!(node = %shared.node, cluster_send = send, ?accepted, ?exporter_send, ?exporter_accepted, exporters, exporter_keys, "keys reloaded");
            }
            Err(e) => {
                metrics::counter!(m::KEY_RELOADS, "node" => shared.node.clone(), "result" => "error").increment(1);
                tracing::error!(node = %shared.node, error = format!("{e:#}"), "reloading the configuration failed; the running keys stay");
            }
        }
    }
}

async fn timer_loop(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<(u64, membership::Timer)>,
    mut stop: watch::Receiver<bool>,
) {
    let mut queue: BTreeMap<(tokio::time::Instant, u64), membership::Timer> = BTreeMap::new();
    let mut seq = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(TICK_INTERVAL_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = queue.keys().next().map(|(at, _)| *at);
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = rx.recv() => match r {
                Some((after_ms, timer)) => {
                    seq += 1;
                    queue.insert((tokio::time::Instant::now() + Duration::from_millis(after_ms), seq), timer);
                }
                None => return,
            },
            _ = sleep => {
                let now = tokio::time::Instant::now();
                let due: Vec<_> = queue.keys().take_while(|(at, _)| *at <= now).copied().collect();
                for key in due {
                    if let Some(timer) = queue.remove(&key) {
                        shared.with_core(|core, now, out| core.handle_timer(timer, now, out)).await;
                    }
                }
            }
            _ = tick.tick() => {
                shared.with_core(|core, now, out| core.tick(now, out)).await;
                shared.update_gauges();
            }
            _ = stopped(&mut stop) => return,
        }
    }
}

/// The journal's group commit: every `interval_ms`, one fsync covers every append written
/// since the last, then the acks they were holding go out; releases whose flows the sink
/// has flushed are written.
async fn group_commit(shared: Arc<Shared>, interval_ms: u64, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut acked_upto = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped(&mut stop) => return,
        }
        // fsync blocks: keep it off the threads that serve connections.
        let s = shared.clone();
        let synced = tokio::task::spawn_blocking(move || lock(&s.durability.journal).sync()).await;
        match synced {
            Ok(Ok(upto)) if upto > acked_upto => {
                acked_upto = upto;
                shared
                    .with_core(|core, now, out| core.journal_synced(upto, now, out))
                    .await;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                metrics::counter!("tenure_journal_errors_total", "node" => shared.node.clone())
                    .increment(1);
                tracing::error!(node = %shared.node, error = %Chain(&e), "journal fsync failed; acknowledgements stop");
            }
            Err(e) => tracing::error!(node = %shared.node, error = %e, "journal fsync task"),
        }
        let d = &shared.durability;
        let durable = d.sink_durable.load(Ordering::SeqCst);
        let ready: Vec<u64> = {
            let mut releases = lock(&d.releases);
            let cut = releases.partition_point(|(emitted, _)| *emitted <= durable);
            releases.drain(..cut).flat_map(|(_, ids)| ids).collect()
        };
        if !ready.is_empty() {
            let s = shared.clone();
            let released =
                tokio::task::spawn_blocking(move || lock(&s.durability.journal).release(&ready))
                    .await;
            if let Ok(Err(e)) = released {
                tracing::warn!(node = %shared.node, error = %Chain(&e), "journal release failed");
            }
        }
    }
}

/// Writes emitted flows to the configured sink until every sender is gone. After every
/// flush it publishes how many flows are written (`durable`), which orders journal
/// releases after the sink.
async fn sink_writer(
    config: SinkConfig,
    mut rx: mpsc::Receiver<Vec<EmittedFlow>>,
    mut stop: watch::Receiver<bool>,
    durable: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let mut written: u64 = 0;
    let mut writer = sink::Writer::open(&config)?;
    let mut flush = tokio::time::interval(Duration::from_millis(SINK_FLUSH_INTERVAL_MS));
    loop {
        tokio::select! {
            received = rx.recv() => {
                // Batches come whole from the dispatcher (up to SINK_BATCH_FLOWS_MAX flows):
                // written as they are, not copied into a bigger one.
                let Some(batch) = received else { break };
                writer.write(&batch, clock::now().0)?;
                written += batch.len() as u64;
            }
            _ = flush.tick() => {
                writer.tick(clock::now().0)?;
                // On disk, and readable: survives `kill -9` and a power loss. Rows of an
                // open Parquet file are not (it has no footer yet): they wait for its roll.
                durable.store(written.saturating_sub(writer.unsettled_flows()), Ordering::SeqCst);
            }
            _ = stopped(&mut stop) => {
                // Everything was emitted before the stop: write what is queued and end.
                while let Ok(batch) = rx.try_recv() {
                    writer.write(&batch, clock::now().0)?;
                }
                break;
            }
        }
    }
    writer.close()?;
    Ok(())
}
