//! The exporter role: flows from a source (eBPF capture or a synthetic fleet), one
//! heartbeat per local IP every interval, batches sent to a collector of the region and
//! kept until acknowledged, retried with backoff against the next collector.
//!
//! The deciding logic is sans-io ([`core`], [`history`], [`batcher`]); this module is the
//! tokio shell that reads the clock, the identity file and the capture channel, and
//! talks to collectors.

pub mod batcher;
pub mod containers;
pub mod core;
pub mod frames;
pub mod history;
pub mod identity;
pub mod kubernetes;

use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use anyhow::Context as _;
use tenure_gossip::wire::{AckStatus, AlignedVec, Direction, FlowBatch, LocalReason, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use self::core::{ExporterCore, Retry};
use crate::config::{ExporterConfig, SourceConfig};
use crate::fleet::{Fleet, FleetConfig};
use crate::report::Chain;
use crate::shell::clock;
use crate::shell::metrics as m;
use crate::shell::transport::{Crypto, TransportError, READ_CHUNK_BYTES};
use batcher::{Batcher, LocalClaim, LocalFlow, LocalOwner, Socket};
use identity::IdentitySource;

/// Captured flow batches waiting for the next heartbeat; past it capture batches are
/// dropped and counted.
pub const CAPTURE_QUEUE_BATCHES_MAX: usize = 1_024;

/// A data-plane client: one TCP connection to a collector, sealed frames out, acks in.
#[derive(Debug)]
pub struct Client {
    stream: TcpStream,
    decoder: tenure_gossip::frame::FrameDecoder,
    buf: Vec<u8>,
    pending: Vec<u8>,
}

impl Client {
    pub async fn connect(
        addr: SocketAddr,
        crypto: &Crypto,
        timeout: Duration,
    ) -> Result<Client, TransportError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                TransportError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect timed out",
                ))
            })??;
        let _ = stream.set_nodelay(true);
        Ok(Client {
            stream,
            decoder: crypto.decoder(),
            buf: vec![0; READ_CHUNK_BYTES],
            pending: Vec::new(),
        })
    }

    pub async fn send(&mut self, crypto: &Crypto, message: &Message) -> Result<(), TransportError> {
        let frame = crypto.frame(message)?;
        self.stream.write_all(&frame).await?;
        Ok(())
    }

    /// The next message from the collector.
    pub async fn recv(&mut self, crypto: &Crypto) -> Result<Message, TransportError> {
        let mut plaintext = AlignedVec::new();
        loop {
            if !self.pending.is_empty() {
                let mut input: &[u8] = &self.pending;
                let decoded = self.decoder.decode(&mut input)?;
                let rest = input.to_vec();
                if let Some(body) = decoded {
                    let (_, message) = crypto.open_frame(body, &mut plaintext)?;
                    self.pending = rest;
                    return Ok(message);
                }
                self.pending = rest;
            }
            let n = self.stream.read(&mut self.buf).await?;
            if n == 0 {
                return Err(TransportError::Closed);
            }
            self.pending.extend_from_slice(&self.buf[..n]);
        }
    }

    /// Sends a flow batch and waits up to `timeout` for its acknowledgement, passing over
    /// anything else the collector sends meanwhile.
    pub async fn send_batch(
        &mut self,
        crypto: &Crypto,
        batch: FlowBatch,
        timeout: Duration,
    ) -> Result<AckStatus, TransportError> {
        let batch_id = batch.batch_id;
        self.send(crypto, &Message::FlowBatch(batch)).await?;
        let wait = async {
            loop {
                match self.recv(crypto).await? {
                    Message::Ack(a) if a.batch_id == batch_id => return Ok(a.status),
                    Message::Ack(_)
                    | Message::ClaimBatch(_)
                    | Message::FlowBatch(_)
                    | Message::IpEventBatch(_)
                    | Message::RangeSnapshot(_)
                    | Message::RangeRequest(_)
                    | Message::RegionDirectory(_) => continue,
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(r) => r,
            Err(_) => Err(TransportError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no ack in time",
            ))),
        }
    }
}

/// Where this interval's flows and claims come from.
enum Source {
    Synthetic {
        fleet: Box<Fleet>,
        region_index: usize,
    },
    Capture {
        rx: mpsc::Receiver<Vec<tenure_node_ebpf::CapturedFlow>>,
        /// `None`: no identity source (`--output stdout` only), every local end unknown.
        identity: Option<IdentitySource>,
        core: Box<ExporterCore>,
    },
}

/// Runs an exporter until `shutdown` resolves. With `to_stdout`, flows are printed as
/// NDJSON and nothing is sent.
pub async fn run(
    config: ExporterConfig,
    to_stdout: bool,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    config.validate(to_stdout)?;
    let start = clock::now();
    let mut source = match &config.source {
        SourceConfig::Synthetic {
            seed,
            prefix,
            flows_per_sec,
        } => {
            let mut fleet = FleetConfig::demo(*seed, vec![(config.region.clone(), *prefix)]);
            fleet.flows_per_sec = *flows_per_sec;
            fleet.cross_region_share = 0.0;
            Source::Synthetic {
                fleet: Box::new(Fleet::new(fleet, start.0)),
                region_index: 0,
            }
        }
        SourceConfig::Ebpf { births_max } => {
            let (identity, core) = match &config.identity {
                Some(i) => (
                    Some(IdentitySource::new(i.clone()).context("the identity source")?),
                    ExporterCore::new(config.core_config()),
                ),
                None if to_stdout => (None, ExporterCore::anonymous(config.core_config())),
                None => anyhow::bail!(
                    "the eBPF source needs an [identity] section (host_file, map_file, containers or kubernetes)"
                ),
            };
            let rx = start_capture(config.heartbeat_interval_ms, *births_max)
                .context("starting eBPF capture")?;
            Source::Capture {
                rx,
                identity,
                core: Box::new(core),
            }
        }
    };
    if to_stdout {
        return print_flows(&config, &mut source, shutdown).await;
    }
    let key = config
        .key
        .resolve(std::env::var("TENURE_CLUSTER_KEY").ok().as_deref())
        .context("exporter key")?;
    let epoch = match &config.state_dir {
        Some(dir) => {
            crate::shell::epoch::next(dir, start.0).context("choosing the sender epoch")?
        }
        None => start.0,
    };
    let crypto = Crypto::new(config.key.key_id, &key, None, config.exporter_id, epoch);
    let mut batcher = Batcher::new(
        config.exporter_id,
        &config.region,
        start.0 << 8,
        config.batch_flows_max,
        config.buffer_batches_max,
    );
    let label = config.exporter_id.to_string();
    m::init_exporter(&label);
    if let Some(addr) = config.http_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding http {addr}"))?;
        let app = axum::Router::new()
            .route("/metrics", axum::routing::get(|| async { m::render() }))
            .route(
                "/healthz",
                axum::routing::get(|| async { "{\"status\":\"ok\"}" }),
            );
        tokio::spawn(crate::shell::http::serve(
            listener,
            app,
            crate::shell::http::HEADER_READ_TIMEOUT,
            std::future::pending(),
        ));
    }
    let mut interval = tokio::time::interval(Duration::from_millis(config.heartbeat_interval_ms));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sender = Sender::new(&config);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = interval.tick() => {
                let frame = clock_frame_ms();
                let (flows, claims) = collect(&mut source, clock::now().0, frame);
                batcher.push(flows, claims, frame);
                sender.drain(&crypto, &mut batcher).await;
                let stats = batcher.stats();
                metrics::counter!(m::EXPORTER_BATCHES_DROPPED, "exporter" => label.clone()).absolute(stats.batches_dropped);
                metrics::counter!(m::EXPORTER_BATCHES_SENT, "exporter" => label.clone()).absolute(stats.batches_acked);
                metrics::gauge!(m::EXPORTER_BUFFERED, "exporter" => label.clone()).set(batcher.buffered() as f64);
            }
            _ = &mut shutdown => break,
        }
    }
    // One last batch (the final heartbeats and closed flows), then a bounded attempt to
    // deliver what is buffered.
    let frame = clock_frame_ms();
    let (flows, claims) = collect(&mut source, clock::now().0, frame);
    batcher.push(flows, claims, frame);
    let _ = tokio::time::timeout(
        Duration::from_millis(config.ack_timeout_ms * 2),
        sender.drain(&crypto, &mut batcher),
    )
    .await;
    if batcher.buffered() > 0 {
        tracing::warn!(
            batches = batcher.buffered(),
            "exiting with unacknowledged batches"
        );
    }
    Ok(())
}

/// Sends buffered batches to a collector, one at a time, rotating collectors and backing
/// off on failure.
pub(crate) struct Sender {
    collectors: Vec<SocketAddr>,
    retry: Retry,
    client: Option<Client>,
    ack_timeout: Duration,
}

impl Sender {
    pub(crate) fn new(config: &ExporterConfig) -> Sender {
        Sender {
            collectors: config.collectors.clone(),
            retry: Retry::new(
                config.collectors.len(),
                config.exporter_id as usize,
                config.backoff_initial_ms,
                config.backoff_max_ms,
            ),
            client: None,
            ack_timeout: Duration::from_millis(config.ack_timeout_ms),
        }
    }

    pub(crate) async fn drain(&mut self, crypto: &Crypto, batcher: &mut Batcher) {
        // Bounded: at most a few rounds over the collectors per call; the rest waits for
        // the next interval.
        let mut failures = 0usize;
        // Every attempt states when it was sent, its times by the same clock: collectors
        // compare exporters' clocks.
        while let Some(batch) = batcher.outgoing(clock::now().0, clock_frame_ms()) {
            if failures > self.collectors.len() * 2 {
                return;
            }
            match self.send_one(crypto, batch).await {
                Ok(AckStatus::Accepted) => {
                    batcher.acked(batcher.front().map(|b| b.batch_id).unwrap_or_default());
                    self.retry.succeeded();
                }
                Ok(AckStatus::Rejected(reason)) => {
                    tracing::error!(?reason, "collector rejected a batch; dropped");
                    batcher.rejected(batcher.front().map(|b| b.batch_id).unwrap_or_default());
                }
                Ok(AckStatus::Busy { retry_after_ms }) => {
                    tracing::debug!(retry_after_ms, "collector busy");
                    tokio::time::sleep(Duration::from_millis(self.retry.busy(retry_after_ms)))
                        .await;
                    failures += 1;
                }
                Err(e) => {
                    let addr = self.collectors.get(self.retry.current()).copied();
                    self.client = None;
                    let backoff_ms = self.retry.failed();
                    tracing::warn!(collector = ?addr, error = %Chain(&e), backoff_ms, "sending a batch failed; trying the next collector");
                    tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                    failures += 1;
                }
            }
        }
    }

    async fn send_one(
        &mut self,
        crypto: &Crypto,
        batch: tenure_gossip::wire::FlowBatch,
    ) -> Result<AckStatus, TransportError> {
        if self.client.is_none() {
            let addr = *self
                .collectors
                .get(self.retry.current())
                .ok_or(TransportError::Closed)?;
            self.client = Some(Client::connect(addr, crypto, self.ack_timeout).await?);
        }
        let client = self.client.as_mut().ok_or(TransportError::Closed)?;
        client.send_batch(crypto, batch, self.ack_timeout).await
    }
}

/// This interval's flows and heartbeats from the source.
/// This heartbeat's flows and claims, on the wall clock of frame `frame_ms` (the one read
/// with `now_ms`).
fn collect(source: &mut Source, now_ms: u64, frame_ms: i64) -> (Vec<LocalFlow>, Vec<LocalClaim>) {
    match source {
        Source::Synthetic {
            fleet,
            region_index,
        } => {
            let steps = fleet.advance(now_ms);
            let Some(step) = steps.into_iter().nth(*region_index) else {
                return (Vec::new(), Vec::new());
            };
            let flows = step.flows.into_iter().map(synthetic_flow).collect();
            let claims = step
                .claims
                .into_iter()
                .map(|c| LocalClaim {
                    ip: c.ip,
                    workload: c.workload,
                    since_ms: c.since_ms,
                    until_ms: c.until_ms,
                })
                .collect();
            (flows, claims)
        }
        Source::Capture { rx, identity, core } => {
            // Capture first, then the identity file: a flow that closed by `now_ms` is
            // judged by an observation made after its end.
            while let Ok(batch) = rx.try_recv() {
                core.capture(batch.iter().map(captured_socket));
            }
            if let Some(observation) = identity.as_mut().and_then(IdentitySource::poll) {
                core.observe(
                    frames::to_monotonic(now_ms, frame_ms),
                    frame_ms,
                    observation,
                );
            }
            let (flows, claims) = core.heartbeat(frame_ms);
            let stats = core.stats();
            metrics::counter!(m::EXPORTER_LOCAL_STAMPED).absolute(stats.stamped);
            for (reason, n) in LocalReason::ALL.iter().zip(stats.unattributed) {
                metrics::counter!(m::EXPORTER_LOCAL_UNATTRIBUTED, "reason" => reason.as_str())
                    .absolute(n);
            }
            metrics::counter!(m::EXPORTER_FLOWS_NOT_LOCAL).absolute(stats.not_local);
            (flows, claims)
        }
    }
}

/// A flow of the synthetic fleet: its local end is the fleet's own truth.
pub(crate) fn synthetic_flow(f: crate::fleet::GenFlow) -> LocalFlow {
    let socket = Socket {
        flow_id: f.flow_id,
        local_ip: f.local_ip,
        local_port: f.local_port,
        remote_ip: f.remote_ip,
        remote_port: f.remote_port,
        start_ms: f.start_ms,
        end_ms: f.end_ms,
        bytes_sent: f.bytes_sent,
        bytes_received: f.bytes_received,
        segs_in: 0,
        segs_out: 0,
        retransmits: 0,
        rtt_us: 0,
        direction: Direction::Outbound,
        ongoing: false,
    };
    LocalFlow {
        socket,
        local: LocalOwner::Workload(f.local_workload),
    }
}

/// A captured flow as the core takes it (its local end is stamped by the history).
pub(crate) fn captured_socket(f: &tenure_node_ebpf::CapturedFlow) -> Socket {
    let local_ip = f.local.ip().to_canonical();
    // A stable id: the 4-tuple and the start time identify a socket's life.
    let mut h = crate::shell::collector::fnv64(
        format!("{}{}{}", f.local, f.remote, f.start_unix_ms).as_bytes(),
    ) as u128;
    h = (h << 64)
        | u128::from(crate::shell::collector::fnv64(
            format!("{}{}", f.remote, f.local).as_bytes(),
        ));
    Socket {
        flow_id: h,
        local_ip,
        local_port: f.local.port(),
        remote_ip: f.remote.ip().to_canonical(),
        remote_port: f.remote.port(),
        // On the monotonic clock, as the core keeps time.
        start_ms: frames::to_monotonic(f.start_unix_ms, f.frame_ms),
        end_ms: frames::to_monotonic(f.end_unix_ms.max(f.start_unix_ms), f.frame_ms),
        bytes_sent: f.bytes_sent,
        bytes_received: f.bytes_received,
        segs_in: u64::from(f.segs_in),
        segs_out: u64::from(f.segs_out),
        retransmits: u64::from(f.retransmits),
        rtt_us: f.srtt_us,
        direction: match f.direction {
            tenure_node_ebpf::Direction::Inbound => Direction::Inbound,
            tenure_node_ebpf::Direction::Outbound | tenure_node_ebpf::Direction::Unknown => {
                Direction::Outbound
            }
        },
        ongoing: f.ongoing,
    }
}

/// Loads the eBPF capture and feeds closed flows, and a snapshot of live ones every
/// interval, into a bounded channel.
pub fn start_capture(
    snapshot_interval_ms: u64,
    births_max: NonZeroU32,
) -> Result<mpsc::Receiver<Vec<tenure_node_ebpf::CapturedFlow>>, tenure_node_ebpf::CaptureError> {
    tenure_node_ebpf::check_privileges()?;
    let options = tenure_node_ebpf::CaptureOptions {
        births_max,
        ..tenure_node_ebpf::CaptureOptions::default()
    };
    let mut capture = tenure_node_ebpf::Capture::load(options)?;
    let (tx, rx) = mpsc::channel(CAPTURE_QUEUE_BATCHES_MAX);
    tokio::spawn(async move {
        let mut snapshots =
            tokio::time::interval(Duration::from_millis(snapshot_interval_ms.max(100)));
        let mut dropped = 0u64;
        loop {
            let batch = tokio::select! {
                r = capture.next_batch() => match r {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(error = %Chain(&e), "flow capture failed");
                        return;
                    }
                },
                _ = snapshots.tick() => match capture.snapshot() {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(error = %Chain(&e), "flow snapshot");
                        continue;
                    }
                },
            };
            if tx.is_closed() {
                return;
            }
            if tx.try_send(batch).is_err() {
                dropped += 1;
                tracing::warn!(
                    dropped,
                    "capture queue full; a batch of captured flows was dropped"
                );
            }
        }
    });
    Ok(rx)
}

async fn print_flows(
    config: &ExporterConfig,
    source: &mut Source,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut interval = tokio::time::interval(Duration::from_millis(
        config.heartbeat_interval_ms.min(1_000),
    ));
    let mut stdout = tokio::io::stdout();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = interval.tick() => {
                let (flows, _) = collect(source, clock::now().0, clock_frame_ms());
                let mut out = Vec::new();
                for LocalFlow { socket: f, local } in flows {
                    let (workload, reason) = match &local {
                        LocalOwner::Workload(w) => (Some(w.as_str()), None),
                        LocalOwner::Unattributed(r) => (None, Some(r.as_str())),
                    };
                    let line = serde_json::json!({
                        "flow_id": format!("{:032x}", f.flow_id),
                        "local": { "ip": f.local_ip.to_string(), "port": f.local_port, "workload": workload, "reason": reason },
                        "remote": { "ip": f.remote_ip.to_string(), "port": f.remote_port },
                        "direction": match f.direction { Direction::Outbound => "outbound", Direction::Inbound => "inbound" },
                        "start_ms": f.start_ms,
                        "end_ms": f.end_ms,
                        "duration_ms": f.end_ms - f.start_ms,
                        "bytes_sent": f.bytes_sent,
                        "bytes_received": f.bytes_received,
                        "segs_in": f.segs_in,
                        "segs_out": f.segs_out,
                        "retransmits": f.retransmits,
                        "rtt_us": f.rtt_us,
                        "ongoing": f.ongoing,
                    });
                    out.extend_from_slice(line.to_string().as_bytes());
                    out.push(b'\n');
                }
                match stdout.write_all(&out).await.and(stdout.flush().await) {
                    Ok(()) => {}
                    // The reader went away (`| head`): done, as Unix tools are.
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                    Err(e) => return Err(e.into()),
                }
            }
            _ = &mut shutdown => return Ok(()),
        }
    }
}

/// The host's clock frame: its wall clock minus its monotonic clock, in ms. It moves only
/// when the wall clock is stepped.
pub(crate) fn clock_frame_ms() -> i64 {
    tenure_node_ebpf::ClockOffset::measure().frame_ms()
}
