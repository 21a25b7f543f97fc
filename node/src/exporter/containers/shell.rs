//! The containers source's IO: one tokio task talks to the runtime's Docker Engine API
//! over its unix socket (bollard): follows the events stream from the moment it connects,
//! lists and inspects the running containers, inspects a container on its start and
//! network-connect events, and pings while the stream is quiet. On any failure it
//! reconnects with backoff and lists again. Everything it reads goes through
//! [`ContainersState`]; the exporter's heartbeat takes an observation from it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::query_parameters::{EventsOptions, ListContainersOptions};
use bollard::Docker;
use futures_util::StreamExt as _;

use super::{
    event_time_ms, read_event, rfc3339_ms, ContainerView, ContainersConfig, ContainersState, Event,
    Input,
};
use crate::exporter::history::Observation;
use crate::report::Chain;
use crate::shell::clock;
use crate::shell::metrics as m;

/// First reconnect delay, in ms; doubles up to [`BACKOFF_MAX_MS`].
pub const BACKOFF_INITIAL_MS: u64 = 200;
/// Longest reconnect delay, in ms.
pub const BACKOFF_MAX_MS: u64 = 5_000;
/// How often the runtime is pinged while its events stream is quiet, in ms: the source
/// vouches up to its last answer.
pub const PING_INTERVAL_MS: u64 = 1_000;
/// Timeout of one API request, in seconds.
const REQUEST_TIMEOUT_S: u64 = 10;

/// The handle the exporter polls; the task stops when it is dropped.
#[derive(Debug)]
pub struct ContainerSource {
    state: Arc<Mutex<ContainersState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ContainerSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ContainerSource {
    /// Starts following the runtime at `socket` (needs a tokio runtime).
    pub fn start(socket: PathBuf, config: ContainersConfig) -> ContainerSource {
        // The counters exist from the start, at 0.
        for name in [
            m::EXPORTER_CONTAINERS_EVENTS,
            m::EXPORTER_CONTAINERS_RECONNECTS,
            m::EXPORTER_CONTAINERS_EVENTS_MALFORMED,
        ] {
            metrics::counter!(name).increment(0);
        }
        let state = Arc::new(Mutex::new(ContainersState::new(config)));
        let task = tokio::spawn(follow(socket, state.clone()));
        ContainerSource { state, task }
    }

    /// What the source vouches for now (see [`ContainersState::observe`]).
    pub fn poll(&mut self) -> Option<Observation> {
        let now_ms = clock::now().0;
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.observe(now_ms)
    }
}

fn apply(state: &Mutex<ContainersState>, input: Input) {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .apply(input);
}

async fn follow(socket: PathBuf, state: Arc<Mutex<ContainersState>>) {
    let mut backoff_ms = BACKOFF_INITIAL_MS;
    let mut last_alive_ms = None;
    loop {
        let mut alive = |at_ms: u64| {
            last_alive_ms = Some(at_ms);
        };
        let result = session(&socket, &state, &mut alive).await;
        let listed = matches!(result, Err(SessionError::AfterListing(_)));
        let (SessionError::BeforeListing(e) | SessionError::AfterListing(e)) = match result {
            Err(e) => e,
            Ok(()) => SessionError::AfterListing(anyhow::anyhow!("the events stream ended")),
        };
        let at_ms = last_alive_ms.unwrap_or_else(|| clock::now().0);
        apply(&state, Input::Lost { at_ms });
        metrics::counter!(m::EXPORTER_CONTAINERS_RECONNECTS).increment(1);
        if listed {
            backoff_ms = BACKOFF_INITIAL_MS;
        }
        tracing::warn!(socket = %socket.display(), error = %Chain(e.as_ref()), backoff_ms, "container runtime unreachable; reconnecting");
        tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
        backoff_ms = (backoff_ms * 2).min(BACKOFF_MAX_MS);
    }
}

enum SessionError {
    BeforeListing(anyhow::Error),
    AfterListing(anyhow::Error),
}

/// One connection: events from now, a listing, then events until the stream fails.
async fn session(
    socket: &Path,
    state: &Mutex<ContainersState>,
    alive: &mut impl FnMut(u64),
) -> Result<(), SessionError> {
    let before = SessionError::BeforeListing;
    let path = socket
        .to_str()
        .ok_or_else(|| before(anyhow::anyhow!("the socket path is not UTF-8")))?;
    let docker = Docker::connect_with_unix(path, REQUEST_TIMEOUT_S, bollard::API_DEFAULT_VERSION)
        .map_err(|e| before(e.into()))?
        .negotiate_version()
        .await
        .map_err(|e| before(e.into()))?;
    docker.ping().await.map_err(|e| before(e.into()))?;
    let up_ms = clock::now().0;
    alive(up_ms);
    apply(state, Input::Up { at_ms: up_ms });
    // Events from the moment of connecting (whole seconds, so a little before it): what
    // happens while the listing runs is not missed; replayed events are idempotent.
    let since = EventsOptions {
        since: Some((up_ms / 1_000).to_string()),
        ..EventsOptions::default()
    };
    let mut events = docker.events(Some(since));
    let listing = list(&docker, up_ms).await.map_err(before)?;
    apply(state, listing);
    tracing::info!(socket = %socket.display(), "following the container runtime");
    let after = SessionError::AfterListing;
    let mut ping = tokio::time::interval(Duration::from_millis(PING_INTERVAL_MS));
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            item = events.next() => {
                let Some(item) = item else { return Ok(()) };
                let message = match item {
                    Ok(message) => message,
                    Err(bollard::errors::Error::JsonDataError { message, .. }) => {
                        metrics::counter!(m::EXPORTER_CONTAINERS_EVENTS_MALFORMED).increment(1);
                        tracing::warn!(error = %message, "a malformed container event was skipped");
                        continue;
                    }
                    Err(e) => return Err(after(e.into())),
                };
                alive(clock::now().0);
                metrics::counter!(m::EXPORTER_CONTAINERS_EVENTS).increment(1);
                let kind = message.typ.map(|t| t.to_string()).unwrap_or_default();
                let action = message.action.unwrap_or_default();
                let actor = message.actor.unwrap_or_default();
                let attributes: BTreeMap<String, String> =
                    actor.attributes.unwrap_or_default().into_iter().collect();
                let at_ms = event_time_ms(message.time_nano, message.time);
                match read_event(&kind, &action, actor.id.as_deref(), &attributes, at_ms) {
                    Ok(Event::Started { id, at_ms } | Event::NetworkConnected { id, at_ms }) => {
                        match inspect(&docker, &id).await {
                            Ok(Some(view)) => apply(state, Input::Connected { at_ms, view }),
                            // Gone already: its die event follows or came.
                            Ok(None) => {}
                            Err(e) => return Err(after(e)),
                        }
                    }
                    Ok(Event::Input(input)) => apply(state, input),
                    Ok(Event::Ignored) => {}
                    Err(e) => {
                        metrics::counter!(m::EXPORTER_CONTAINERS_EVENTS_MALFORMED).increment(1);
                        tracing::warn!(error = %e, kind, action, "a malformed container event was skipped");
                    }
                }
            }
            _ = ping.tick() => {
                docker.ping().await.map_err(|e| after(e.into()))?;
                let at_ms = clock::now().0;
                alive(at_ms);
                apply(state, Input::Alive { at_ms });
            }
        }
    }
}

/// The running containers, each inspected.
async fn list(docker: &Docker, at_ms: u64) -> anyhow::Result<Input> {
    let summaries = docker
        .list_containers(Some(ListContainersOptions::default()))
        .await?;
    let mut containers = Vec::with_capacity(summaries.len());
    for summary in summaries {
        let Some(id) = summary.id.filter(|id| !id.is_empty()) else {
            metrics::counter!(m::EXPORTER_CONTAINERS_EVENTS_MALFORMED).increment(1);
            tracing::warn!("a listed container without an id was skipped");
            continue;
        };
        if let Some(view) = inspect(docker, &id).await? {
            containers.push(view);
        }
    }
    Ok(Input::Listed { at_ms, containers })
}

/// A container as the runtime states it; `None` when it no longer exists.
async fn inspect(docker: &Docker, id: &str) -> anyhow::Result<Option<ContainerView>> {
    let response = match docker.inspect_container(id, None).await {
        Ok(r) => r,
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let state = response.state.unwrap_or_default();
    let mut networks: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for (name, endpoint) in response
        .network_settings
        .and_then(|n| n.networks)
        .unwrap_or_default()
    {
        let ips: Vec<IpAddr> = [endpoint.ip_address, endpoint.global_ipv6_address]
            .into_iter()
            .flatten()
            .filter(|a| !a.is_empty())
            .filter_map(|a| match a.parse::<IpAddr>() {
                Ok(ip) => Some(ip.to_canonical()),
                Err(_) => {
                    metrics::counter!(m::EXPORTER_CONTAINERS_EVENTS_MALFORMED).increment(1);
                    tracing::warn!(
                        container = id,
                        address = a,
                        "a malformed container address was skipped"
                    );
                    None
                }
            })
            .collect();
        if !ips.is_empty() {
            networks.insert(name, ips);
        }
    }
    Ok(Some(ContainerView {
        id: response.id.unwrap_or_else(|| id.to_owned()),
        name: response
            .name
            .map(|n| n.trim_start_matches('/').to_owned())
            .unwrap_or_else(|| id.to_owned()),
        labels: response
            .config
            .and_then(|c| c.labels)
            .unwrap_or_default()
            .into_iter()
            .collect(),
        networks,
        started_ms: state.started_at.as_deref().and_then(rfc3339_ms),
        running: state.running.unwrap_or(false),
    }))
}
