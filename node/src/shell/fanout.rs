//! Cluster-wide queries: `/v1/dependencies` on any node asks every live member for its
//! local dependency table (`scope=local`, which never fans out again) and merges the
//! answers, saying which members did not answer in time.
//!
//! # Finding a peer's HTTP address
//!
//! The gossip identity carries a member's gossip and data addresses but not its HTTP
//! address, and changing the identity would change the gossip wire format of every node.
//! The least invasive source is configuration: `peer_http_addrs` (node id → address)
//! where ports differ, and otherwise `peer_http_port` at the host of the member's data
//! address (by default this node's own HTTP port, so a fleet that uses one HTTP port
//! everywhere needs no configuration at all). A wrong guess costs one failed request and
//! shows up in `nodes_missing` with the error; it never produces a wrong answer, because
//! an answer is only merged if it names the node id that was asked.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tenure_attribution::Reason;
use tenure_gossip::wire::LocalReason;

use super::collector::{lock, Shared};
use crate::deps::{local_reason_index, reason_index, EdgeTotals, End, RttStats};
use crate::httpc;

/// How long the fan-out waits for the slowest member, in ms. Members that have not
/// answered by then are listed in `nodes_missing` and the answer is `partial`.
pub const FANOUT_TIMEOUT_MS: u64 = 3_000;
/// Members asked in one fan-out; the rest are listed as missing (a cluster this large
/// should be asked through a query engine over the sink files instead).
pub const FANOUT_MEMBERS_MAX: usize = 512;
/// Edges in one answer, local or merged; the smallest (by flows) are left out past it
/// and counted in `edges_truncated`.
pub const EDGES_PER_ANSWER_MAX: usize = 50_000;
/// The longest workload name accepted in a filter, in bytes.
pub const WORKLOAD_FILTER_BYTES_MAX: usize = 256;

/// Where peers serve HTTP.
#[derive(Clone, Debug)]
pub struct PeerHttp {
    addrs: BTreeMap<String, SocketAddr>,
    port: u16,
}

impl PeerHttp {
    pub fn new(addrs: BTreeMap<String, SocketAddr>, port: u16) -> PeerHttp {
        PeerHttp { addrs, port }
    }

    /// The HTTP address of member `node_id`, whose data address is `data_addr`.
    pub fn addr_of(&self, node_id: &str, data_addr: SocketAddr) -> SocketAddr {
        self.addrs
            .get(node_id)
            .copied()
            .unwrap_or_else(|| SocketAddr::new(data_addr.ip(), self.port))
    }
}

/// The time window and filter of a dependency query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    pub since_ms: u64,
    pub until_ms: u64,
    pub workload: Option<String>,
}

/// One edge as it travels in JSON (both scopes answer with this shape).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EdgeJson {
    pub from: String,
    /// `workload`, `external` or `unattributed`.
    pub from_kind: String,
    pub to: String,
    pub to_kind: String,
    pub flows: u64,
    pub bytes: u64,
    /// Of `flows`, those that went out unattributed.
    pub unattributed_flows: u64,
    /// `unattributed_flows / flows`, 0 to 1.
    pub unattributed_share: f64,
    /// Unattributed flows by reason (`no_owner`, `ambiguous`, ...); absent reasons are 0.
    #[serde(default)]
    pub unattributed_reasons: BTreeMap<String, u64>,
    /// Segments retransmitted by the reporting ends of the edge's flows.
    #[serde(default)]
    pub retransmits: u64,
    /// Flows with an RTT sample (the reporting end's smoothed RTT at close or snapshot).
    #[serde(default)]
    pub rtt_samples: u64,
    /// Sum of those RTTs, µs: with `rtt_samples`, what merges exactly across nodes.
    #[serde(default)]
    pub rtt_us_sum: u64,
    /// Smallest, mean (rounded down) and largest of those RTTs, µs; null without samples.
    #[serde(default)]
    pub rtt_us_min: Option<u32>,
    #[serde(default)]
    pub rtt_us_mean: Option<u64>,
    #[serde(default)]
    pub rtt_us_max: Option<u32>,
    /// Of `flows`, those whose local end the exporter vouched for no workload on, by
    /// reason (`local_changed`, `local_unknown`, `local_expired`); absent reasons are 0.
    /// Such flows are edges of `unattributed`, never of the local IP's owner.
    #[serde(default)]
    pub local_unattributed_reasons: BTreeMap<String, u64>,
}

impl EdgeJson {
    pub fn new(from: &End, to: &End, t: &EdgeTotals) -> EdgeJson {
        EdgeJson {
            from: from.name().to_owned(),
            from_kind: from.kind().to_owned(),
            to: to.name().to_owned(),
            to_kind: to.kind().to_owned(),
            flows: t.flows,
            bytes: t.bytes,
            unattributed_flows: t.unattributed_flows(),
            unattributed_share: share(t.unattributed_flows(), t.flows),
            unattributed_reasons: reasons_json(t),
            retransmits: t.retransmits,
            rtt_samples: t.rtt.samples,
            rtt_us_sum: t.rtt.sum_us,
            rtt_us_min: (t.rtt.samples > 0).then_some(t.rtt.min_us),
            rtt_us_mean: t.rtt.mean_us(),
            rtt_us_max: (t.rtt.samples > 0).then_some(t.rtt.max_us),
            local_unattributed_reasons: local_reasons_json(t),
        }
    }

    /// The key and totals, or `None` if a peer sent a kind or reason this node does not
    /// know (a newer version).
    fn parts(&self) -> Option<(End, End, EdgeTotals)> {
        let from = End::from_parts(&self.from, &self.from_kind)?;
        let to = End::from_parts(&self.to, &self.to_kind)?;
        let rtt = match (self.rtt_samples, self.rtt_us_min, self.rtt_us_max) {
            (0, _, _) => RttStats::default(),
            (samples, Some(min_us), Some(max_us)) => RttStats {
                samples,
                sum_us: self.rtt_us_sum,
                min_us,
                max_us,
            },
            _ => return None,
        };
        let mut totals = EdgeTotals {
            flows: self.flows,
            bytes: self.bytes,
            unattributed: [0; Reason::ALL.len()],
            retransmits: self.retransmits,
            rtt,
            local_unattributed: [0; LocalReason::ALL.len()],
        };
        for (name, n) in &self.unattributed_reasons {
            let reason = Reason::ALL.iter().find(|r| r.as_str() == name)?;
            totals.unattributed[reason_index(*reason)] = *n;
        }
        for (name, n) in &self.local_unattributed_reasons {
            let reason = LocalReason::ALL.iter().find(|r| r.as_str() == name)?;
            totals.local_unattributed[local_reason_index(*reason)] = *n;
        }
        Some((from, to, totals))
    }
}

/// Totals over all edges of an answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TotalsJson {
    pub flows: u64,
    pub bytes: u64,
    pub unattributed_flows: u64,
    pub unattributed_share: f64,
    pub unattributed_reasons: BTreeMap<String, u64>,
    #[serde(default)]
    pub retransmits: u64,
    /// Flows whose local end is unattributed, by reason.
    #[serde(default)]
    pub local_unattributed_reasons: BTreeMap<String, u64>,
}

/// The answer of one node (`scope=local`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LocalAnswer {
    pub scope: String,
    pub node_id: String,
    pub region: String,
    pub since_ms: u64,
    pub until_ms: u64,
    pub workload: Option<String>,
    pub edges: Vec<EdgeJson>,
    pub totals: TotalsJson,
    /// Edges this node could not record (its per-minute table was full).
    pub edges_dropped: u64,
    /// Edges left out of this answer by [`EDGES_PER_ANSWER_MAX`].
    pub edges_truncated: u64,
}

/// A member that did not answer, and why.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Missing {
    pub node_id: String,
    pub region: String,
    pub http_addr: String,
    pub error: String,
}

/// A member known to be down: not asked; whatever it held left with it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Down {
    pub node_id: String,
    pub region: String,
}

/// The merged answer (`scope=cluster`, the default).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClusterAnswer {
    pub scope: String,
    /// The node that answered (and asked the others).
    pub node_id: String,
    pub since_ms: u64,
    pub until_ms: u64,
    pub workload: Option<String>,
    /// True when some live member did not answer: the edges are then a lower bound.
    pub partial: bool,
    pub nodes_answered: Vec<String>,
    pub nodes_missing: Vec<Missing>,
    pub members_down: Vec<Down>,
    pub edges: Vec<EdgeJson>,
    pub totals: TotalsJson,
    pub edges_dropped: u64,
    pub edges_truncated: u64,
    /// Edges from peers this node could not read (unknown kinds or reasons).
    pub edges_unreadable: u64,
}

fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

fn reasons_json(t: &EdgeTotals) -> BTreeMap<String, u64> {
    Reason::ALL
        .iter()
        .filter(|r| t.unattributed[reason_index(**r)] > 0)
        .map(|r| (r.as_str().to_owned(), t.unattributed[reason_index(*r)]))
        .collect()
}

fn local_reasons_json(t: &EdgeTotals) -> BTreeMap<String, u64> {
    LocalReason::ALL
        .iter()
        .filter(|r| t.local_unattributed[local_reason_index(**r)] > 0)
        .map(|r| {
            (
                r.as_str().to_owned(),
                t.local_unattributed[local_reason_index(*r)],
            )
        })
        .collect()
}

/// Keeps the [`EDGES_PER_ANSWER_MAX`] largest edges (by flows), sorted by caller then
/// callee; returns them and how many were left out.
fn to_json(mut edges: Vec<(End, End, EdgeTotals)>) -> (Vec<EdgeJson>, TotalsJson, u64) {
    let mut sum = EdgeTotals::default();
    for (_, _, t) in &edges {
        sum.add(t);
    }
    let mut truncated = 0;
    if edges.len() > EDGES_PER_ANSWER_MAX {
        edges.sort_by(|a, b| {
            b.2.flows
                .cmp(&a.2.flows)
                .then_with(|| (&a.0, &a.1).cmp(&(&b.0, &b.1)))
        });
        truncated = (edges.len() - EDGES_PER_ANSWER_MAX) as u64;
        edges.truncate(EDGES_PER_ANSWER_MAX);
        edges.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    }
    let totals = TotalsJson {
        flows: sum.flows,
        bytes: sum.bytes,
        unattributed_flows: sum.unattributed_flows(),
        unattributed_share: share(sum.unattributed_flows(), sum.flows),
        unattributed_reasons: reasons_json(&sum),
        retransmits: sum.retransmits,
        local_unattributed_reasons: local_reasons_json(&sum),
    };
    let edges = edges
        .iter()
        .map(|(a, b, t)| EdgeJson::new(a, b, t))
        .collect();
    (edges, totals, truncated)
}

/// This node's own answer.
pub(crate) fn local(shared: &Shared, window: &Window) -> LocalAnswer {
    let deps = lock(&shared.deps);
    let edges = deps.edges(window.since_ms, window.until_ms, window.workload.as_deref());
    let (edges, totals, edges_truncated) = to_json(edges);
    LocalAnswer {
        scope: "local".to_owned(),
        node_id: shared.bound.node_id.clone(),
        region: shared.bound.region.clone(),
        since_ms: window.since_ms,
        until_ms: window.until_ms,
        workload: window.workload.clone(),
        edges,
        totals,
        edges_dropped: deps.edges_dropped(),
        edges_truncated,
    }
}

/// Percent-encodes a query parameter value (RFC 3986 unreserved characters pass).
pub fn encode_query_value(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Asks one member for its local answer.
async fn ask(addr: SocketAddr, node_id: &str, path: &str) -> Result<LocalAnswer, String> {
    let (status, body) = httpc::request(
        addr,
        "GET",
        path,
        None,
        None,
        Duration::from_millis(FANOUT_TIMEOUT_MS),
    )
    .await
    .map_err(|e| e.to_string())?;
    if status != 200 {
        let mut excerpt: String = body.chars().take(200).collect();
        if excerpt.is_empty() {
            excerpt.push_str("(empty body)");
        }
        return Err(format!("HTTP {status}: {excerpt}"));
    }
    let answer: LocalAnswer =
        serde_json::from_str(&body).map_err(|e| format!("unreadable answer: {e}"))?;
    if answer.node_id != node_id {
        // A stale or wrong address: another node answered. Its data is not this member's.
        return Err(format!(
            "{addr} answered as node {:?}; check peer_http_addrs / peer_http_port",
            answer.node_id
        ));
    }
    Ok(answer)
}

/// The whole cluster's answer: this node's table plus every live member's, asked in
/// parallel with [`FANOUT_TIMEOUT_MS`].
pub(crate) async fn cluster(shared: &Arc<Shared>, window: &Window) -> ClusterAnswer {
    // Who to ask: live members of every region (the WAN pool), by node id.
    let (members, down) = {
        let core = lock(&shared.core);
        let mut members: BTreeMap<String, (String, SocketAddr)> = BTreeMap::new();
        for m in core.membership().wan_members() {
            if m.node_id() != shared.bound.node_id {
                members.insert(
                    m.node_id().to_owned(),
                    (
                        m.region().to_owned(),
                        shared.peer_http.addr_of(m.node_id(), m.data_addr()),
                    ),
                );
            }
        }
        let down: Vec<Down> = lock(&shared.roster)
            .iter()
            .filter(|(node, (_, up))| !*up && !members.contains_key(*node))
            .map(|(node, (region, _))| Down {
                node_id: node.clone(),
                region: region.clone(),
            })
            .collect();
        (members, down)
    };
    let mut path = format!(
        "/v1/dependencies?scope=local&since={}&until={}",
        window.since_ms, window.until_ms
    );
    if let Some(w) = &window.workload {
        path.push_str("&workload=");
        path.push_str(&encode_query_value(w));
    }

    let mut missing = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (node_id, (region, addr))) in members.into_iter().enumerate() {
        if i >= FANOUT_MEMBERS_MAX {
            missing.push(Missing {
                node_id,
                region,
                http_addr: addr.to_string(),
                error: format!("not asked: more than {FANOUT_MEMBERS_MAX} members"),
            });
            continue;
        }
        let path = path.clone();
        tasks.spawn(async move {
            let result = ask(addr, &node_id, &path).await;
            (node_id, region, addr, result)
        });
    }

    let own = local(shared, window);
    let mut answered = vec![own.node_id.clone()];
    let mut edges_dropped = own.edges_dropped;
    let mut edges_truncated = own.edges_truncated;
    let mut edges_unreadable = 0;
    let mut merged: BTreeMap<(End, End), EdgeTotals> = BTreeMap::new();
    let mut merge = |answer: &LocalAnswer, unreadable: &mut u64| {
        for edge in &answer.edges {
            match edge.parts() {
                Some((from, to, t)) => merged.entry((from, to)).or_default().add(&t),
                None => *unreadable += 1,
            }
        }
    };
    merge(&own, &mut edges_unreadable);
    while let Some(joined) = tasks.join_next().await {
        let Ok((node_id, region, addr, result)) = joined else {
            // The task itself failed (a panic in the HTTP client): nothing to name it by
            // is lost, as the member is reported below only if it answered.
            continue;
        };
        match result {
            Ok(answer) => {
                merge(&answer, &mut edges_unreadable);
                edges_dropped += answer.edges_dropped;
                edges_truncated += answer.edges_truncated;
                answered.push(node_id);
            }
            Err(error) => missing.push(Missing {
                node_id,
                region,
                http_addr: addr.to_string(),
                error,
            }),
        }
    }
    answered.sort();
    missing.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    let (edges, totals, truncated) =
        to_json(merged.into_iter().map(|((a, b), t)| (a, b, t)).collect());
    ClusterAnswer {
        scope: "cluster".to_owned(),
        node_id: shared.bound.node_id.clone(),
        since_ms: window.since_ms,
        until_ms: window.until_ms,
        workload: window.workload.clone(),
        partial: !missing.is_empty(),
        nodes_answered: answered,
        nodes_missing: missing,
        members_down: down,
        edges,
        totals,
        edges_dropped,
        edges_truncated: edges_truncated + truncated,
        edges_unreadable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(
            encode_query_value("gateway-us.east_1~"),
            "gateway-us.east_1~"
        );
        assert_eq!(encode_query_value("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }

    #[test]
    fn an_edge_survives_its_json_form() {
        let mut t = EdgeTotals {
            flows: 10,
            bytes: 1_000,
            unattributed: [0; Reason::ALL.len()],
            retransmits: 4,
            rtt: RttStats {
                samples: 2,
                sum_us: 301,
                min_us: 100,
                max_us: 201,
            },
            local_unattributed: [0; LocalReason::ALL.len()],
        };
        t.unattributed[reason_index(Reason::Ambiguous)] = 3;
        t.local_unattributed[local_reason_index(LocalReason::Changed)] = 2;
        let json = EdgeJson::new(&End::Workload(Arc::from("gw")), &End::Unattributed, &t);
        assert_eq!(json.unattributed_flows, 3);
        assert!((json.unattributed_share - 0.3).abs() < 1e-9);
        assert_eq!(
            (json.rtt_us_min, json.rtt_us_mean, json.rtt_us_max),
            (Some(100), Some(150), Some(201))
        );
        let back: EdgeJson = serde_json::from_str(&serde_json::to_string(&json).unwrap()).unwrap();
        let (from, to, totals) = back.parts().expect("known kinds and reasons");
        assert_eq!(from, End::Workload(Arc::from("gw")));
        assert_eq!(to, End::Unattributed);
        assert_eq!(totals, t);
    }

    #[test]
    fn unknown_kinds_are_unreadable_not_guessed() {
        let mut json = EdgeJson::new(
            &End::Workload(Arc::from("a")),
            &End::External,
            &EdgeTotals::default(),
        );
        json.to_kind = "something-new".to_owned();
        assert!(json.parts().is_none());
    }
}
