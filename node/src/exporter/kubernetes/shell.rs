//! The Kubernetes source's IO: lists this node's pods (`spec.nodeName=<node>`), watches
//! from the list's resource version with bookmarks, and hands everything to the
//! [`PodTracker`] with the time it arrived. A stream that ends cleanly (the server's watch
//! timeout) is watched again from the last resource version; a stream error, an `ERROR`
//! event (`410 Gone` among them) or a failed request marks the watch broken and is
//! followed by a relist, after a backoff.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};

use super::{PodTracker, PodView, TrackerConfig, TrackerStats, WatchInput};
use crate::exporter::history::Observation;
use crate::shell::clock;

/// Pods per list page.
const LIST_PAGE_PODS: u32 = 500;
/// The watch's server-side timeout, in seconds (the API server ends the stream then).
const WATCH_TIMEOUT_S: u32 = 290;
/// A watch silent for this long is taken as a dead connection (the server sends a
/// bookmark or ends the stream well before).
const WATCH_SILENCE_MAX: Duration = Duration::from_secs(WATCH_TIMEOUT_S as u64 + 30);
const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Why the source could not start. Nothing was started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("identity.api_server {url:?} is not a URL")]
    BadUrl {
        url: String,
        #[source]
        source: axum::http::uri::InvalidUri,
    },
    #[error("in-cluster Kubernetes config (set identity.api_server outside a cluster)")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("building the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// The running source: the watch task and the tracker it feeds.
#[derive(Debug)]
pub struct KubernetesSource {
    tracker: Arc<Mutex<PodTracker>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KubernetesSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KubernetesSource {
    /// Starts listing and watching the pods of `node_name` (on the current tokio runtime).
    pub fn start(
        node_name: &str,
        api_server: Option<&str>,
        config: TrackerConfig,
    ) -> Result<KubernetesSource, StartError> {
        let kube_config = match api_server {
            Some(url) => kube::Config::new(url.parse().map_err(|source| StartError::BadUrl {
                url: url.to_string(),
                source,
            })?),
            None => kube::Config::incluster().map_err(StartError::InCluster)?,
        };
        let client = kube::Client::try_from(kube_config).map_err(StartError::Client)?;
        let api: Api<Pod> = Api::all(client);
        let tracker = Arc::new(Mutex::new(PodTracker::new(config)));
        let fields = format!("spec.nodeName={node_name}");
        let task = tokio::spawn(watch(api, fields, tracker.clone()));
        Ok(KubernetesSource { tracker, task })
    }

    /// What the source knows now; `None` before the first list and while the watch has
    /// been broken for longer than the staleness limit.
    pub fn poll(&self) -> Option<Observation> {
        let now_ms = clock::now().0;
        lock(&self.tracker).poll(now_ms)
    }

    pub fn stats(&self) -> TrackerStats {
        lock(&self.tracker).stats()
    }
}

fn lock(tracker: &Mutex<PodTracker>) -> std::sync::MutexGuard<'_, PodTracker> {
    // The tracker's methods do not panic midway; a poisoned lock still holds a whole state.
    tracker.lock().unwrap_or_else(PoisonError::into_inner)
}

fn feed(tracker: &Mutex<PodTracker>, input: WatchInput) {
    lock(tracker).handle(clock::now().0, input);
}

/// The pod as the tracker takes it, or, when it cannot be read (logged), the input that
/// says so.
fn read(pod: &Pod) -> Result<PodView, Malformed> {
    PodView::from_pod(pod).map_err(|e| {
        tracing::warn!(error = %e, "unreadable pod object");
        Malformed {
            uid: pod.metadata.uid.clone(),
        }
    })
}

/// A pod object that could not be read, and its UID if it had one.
struct Malformed {
    uid: Option<String>,
}

impl From<Malformed> for WatchInput {
    fn from(m: Malformed) -> WatchInput {
        WatchInput::Malformed { uid: m.uid }
    }
}

/// One full list, all pages: the pods and the resource version to watch from.
async fn list(api: &Api<Pod>, fields: &str) -> Result<(Vec<Pod>, String), kube::Error> {
    let mut pods = Vec::new();
    let mut params = ListParams::default().fields(fields).limit(LIST_PAGE_PODS);
    loop {
        let page = api.list(&params).await?;
        let version = page.metadata.resource_version.clone().unwrap_or_default();
        let next = page.metadata.continue_.clone().filter(|c| !c.is_empty());
        pods.extend(page.items);
        match next {
            Some(token) => params = params.continue_token(&token),
            None => return Ok((pods, version)),
        }
    }
}

enum WatchEnd {
    /// The server ended the stream: watch again from this version.
    Resume(String),
    /// Broken: relist.
    Relist,
}

async fn watch(api: Api<Pod>, fields: String, tracker: Arc<Mutex<PodTracker>>) {
    let mut backoff = BACKOFF_INITIAL;
    let mut version: Option<String> = None;
    loop {
        let from = match version.take() {
            Some(v) => v,
            None => match list(&api, &fields).await {
                Ok((pods, v)) => {
                    let mut views = Vec::with_capacity(pods.len());
                    for pod in &pods {
                        match read(pod) {
                            Ok(view) => views.push(view),
                            Err(malformed) => feed(&tracker, malformed.into()),
                        }
                    }
                    tracing::info!(pods = views.len(), version = %v, "listed this node's pods");
                    feed(&tracker, WatchInput::Listed(views));
                    v
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_ms = backoff.as_millis(), "listing pods");
                    feed(&tracker, WatchInput::Broken);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            },
        };
        // Bookmarks are asked for by default (`allowWatchBookmarks`).
        let params = WatchParams::default()
            .fields(&fields)
            .timeout(WATCH_TIMEOUT_S);
        let end = match api.watch(&params, &from).await {
            Ok(stream) => follow(stream, from, &tracker, &mut backoff).await,
            Err(e) => {
                tracing::warn!(error = %e, "starting the pod watch");
                WatchEnd::Relist
            }
        };
        match end {
            WatchEnd::Resume(v) => version = Some(v),
            WatchEnd::Relist => {
                feed(&tracker, WatchInput::Broken);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Follows one watch stream until it ends.
async fn follow(
    stream: impl futures_util::Stream<Item = Result<WatchEvent<Pod>, kube::Error>>,
    mut version: String,
    tracker: &Mutex<PodTracker>,
    backoff: &mut Duration,
) -> WatchEnd {
    let mut stream = std::pin::pin!(stream);
    loop {
        let next = match tokio::time::timeout(WATCH_SILENCE_MAX, stream.next()).await {
            Ok(next) => next,
            Err(_) => {
                tracing::warn!("pod watch silent too long");
                return WatchEnd::Relist;
            }
        };
        let input = match next {
            None => return WatchEnd::Resume(version),
            Some(Ok(WatchEvent::Added(pod) | WatchEvent::Modified(pod))) => {
                version = pod.metadata.resource_version.clone().unwrap_or(version);
                read(&pod).map_or_else(WatchInput::from, WatchInput::Applied)
            }
            Some(Ok(WatchEvent::Deleted(pod))) => {
                version = pod.metadata.resource_version.clone().unwrap_or(version);
                read(&pod).map_or_else(WatchInput::from, WatchInput::Deleted)
            }
            Some(Ok(WatchEvent::Bookmark(mark))) => {
                version = mark.metadata.resource_version;
                WatchInput::Bookmark
            }
            Some(Ok(WatchEvent::Error(status))) => {
                tracing::warn!(code = status.code, reason = %status.reason, message = %status.message, "pod watch error event: relisting");
                return WatchEnd::Relist;
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "pod watch stream failed: relisting");
                return WatchEnd::Relist;
            }
        };
        *backoff = BACKOFF_INITIAL;
        feed(tracker, input);
    }
}
