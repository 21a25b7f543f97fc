//! The containers identity source, sans-io: what a container runtime's Docker Engine API
//! says (containers listed and inspected, lifecycle events) turned into the
//! [`Observation`]s the local history takes. The [`shell`] talks to the runtime.
//!
//! - A container's IPs are held by its workload: the label `workload_label`, else the
//!   compose service label, else the container's name.
//! - `since` is the time the runtime states for the container's start or its network
//!   connect (an event's `timeNano`, or the inspected `StartedAt` when listed): the IP was
//!   set up before that, so no earlier time is ever claimed.
//! - A tenure closes at the first of the container's `die` and `stop` events, or at the
//!   network-disconnect event, by the event's own time. A container gone from a relist
//!   closes at the last instant the source was known to be connected: earlier than the
//!   truth or at it, never later.
//! - While the runtime cannot be reached, the last known mapping is given for at most
//!   `stale_after_ms` after the connection was lost (default 0); then nothing, so that the
//!   history vouches for nothing new until the source is back: flows wait, and heartbeats
//!   repeat what was last vouched for without extending it.
//! - Two containers stating the same IP: the one that took it later holds it (the other
//!   must have released it before).

pub mod shell;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::history::{Held, Observation};

/// The compose service label, the second choice for a container's workload.
pub const COMPOSE_SERVICE_LABEL: &str = "com.docker.compose.service";

/// A container as inspected or listed: what the runtime states about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerView {
    pub id: String,
    /// The container's name (without the leading `/`).
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Its addresses, by network name; containers without a network address (host
    /// network, none) have none.
    pub networks: BTreeMap<String, Vec<IpAddr>>,
    /// When it started (the runtime's `StartedAt`), in ms since the epoch, if stated.
    pub started_ms: Option<u64>,
    /// Whether it is running.
    pub running: bool,
}

/// What the runtime said, as the shell read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// A full listing of running containers (after a connect or reconnect), made while
    /// the source was connected at `at_ms`.
    Listed {
        at_ms: u64,
        containers: Vec<ContainerView>,
    },
    /// A container inspected after one of its start or network-connect events, at the
    /// event's time: networks it has that were not known open there.
    Connected { at_ms: u64, view: ContainerView },
    /// A container's die or stop event: all its IPs are released at `at_ms`.
    Stopped { id: String, at_ms: u64 },
    /// A network-disconnect event: the container's IPs on `network` are released.
    Disconnected {
        id: String,
        network: String,
        at_ms: u64,
    },
    /// The events stream is up (after a connect): the source vouches from here on.
    Up { at_ms: u64 },
    /// The runtime answered (an event, or a ping) at `at_ms`: it was reachable then.
    Alive { at_ms: u64 },
    /// The connection to the runtime was lost; `at_ms` is the last instant it was known
    /// reachable.
    Lost { at_ms: u64 },
}

/// Limits of the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainersConfig {
    /// The label naming a container's workload.
    pub workload_label: String,
    /// How long the last known mapping is given after the runtime became unreachable, in
    /// ms.
    pub stale_after_ms: u64,
    /// Containers tracked; past it new ones are not (counted as dropped).
    pub containers_max: usize,
}

/// Default [`ContainersConfig::stale_after_ms`]: 0, nothing new is vouched for while the
/// runtime is unreachable. A container that takes the address of one that stopped meanwhile
/// is not seen until the reconnect, so a longer limit can stamp its flows with the old
/// owner (the Podman test shows it happen with 30 s).
pub const STALE_AFTER_MS_DEFAULT: u64 = 0;
/// Default [`ContainersConfig::containers_max`].
pub const CONTAINERS_MAX_DEFAULT: usize = 65_536;
/// Default [`ContainersConfig::workload_label`].
pub const WORKLOAD_LABEL_DEFAULT: &str = "tenure.workload";

#[derive(Clone, Debug)]
struct Entry {
    workload: Arc<str>,
    /// IP → (network, since).
    ips: BTreeMap<IpAddr, (String, u64)>,
}

/// Counters of the source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContainersStats {
    /// Containers not tracked because of `containers_max`.
    pub containers_dropped: u64,
    /// IPs stated by two containers at once (the later one kept).
    pub ip_conflicts: u64,
}

/// The source's state. See the module documentation.
#[derive(Debug)]
pub struct ContainersState {
    config: ContainersConfig,
    containers: BTreeMap<String, Entry>,
    /// IPs released since the last observation, with when.
    released: BTreeMap<IpAddr, u64>,
    /// `Some(t)`: connected since `t`; `None`: not connected.
    up_since_ms: Option<u64>,
    /// Whether a listing was taken since the last connect.
    listed: bool,
    /// The last instant the source was connected and listed: it vouches up to here.
    last_up_ms: Option<u64>,
    /// The start of the current gap: the last instant vouched for before the connection
    /// was lost, until a listing after the reconnect.
    gap_ms: Option<u64>,
    stats: ContainersStats,
}

impl ContainersState {
    pub fn new(config: ContainersConfig) -> ContainersState {
        ContainersState {
            config,
            containers: BTreeMap::new(),
            released: BTreeMap::new(),
            up_since_ms: None,
            listed: false,
            last_up_ms: None,
            gap_ms: None,
            stats: ContainersStats::default(),
        }
    }

    pub fn stats(&self) -> ContainersStats {
        self.stats
    }

    fn workload_of(&self, view: &ContainerView) -> Arc<str> {
        let name = view
            .labels
            .get(&self.config.workload_label)
            .or_else(|| view.labels.get(COMPOSE_SERVICE_LABEL))
            .filter(|w| !w.is_empty())
            .unwrap_or(&view.name);
        Arc::from(name.as_str())
    }

    /// Takes in one input.
    pub fn apply(&mut self, input: Input) {
        match input {
            Input::Up { at_ms } => {
                self.up_since_ms = Some(at_ms);
                self.listed = false;
            }
            Input::Alive { at_ms } => {
                if self.up_since_ms.is_some() && self.listed {
                    self.last_up_ms = Some(self.last_up_ms.map_or(at_ms, |l| l.max(at_ms)));
                }
            }
            Input::Lost { at_ms } => {
                if self.up_since_ms.take().is_some() || self.listed {
                    let vouched = self.last_up_ms.unwrap_or(at_ms);
                    self.gap_ms.get_or_insert(vouched);
                }
                self.listed = false;
            }
            Input::Listed { at_ms, containers } => {
                // What vanished while the source was down closes at the last instant it
                // vouched for.
                let gone_at = self.gap_ms.take().unwrap_or(at_ms).min(at_ms);
                let running: BTreeMap<&str, &ContainerView> = containers
                    .iter()
                    .filter(|c| c.running)
                    .map(|c| (c.id.as_str(), c))
                    .collect();
                let gone: Vec<String> = self
                    .containers
                    .keys()
                    .filter(|id| !running.contains_key(id.as_str()))
                    .cloned()
                    .collect();
                for id in gone {
                    self.stop(&id, gone_at);
                }
                for view in running.values() {
                    // A listed container's IPs held since its start; one whose start is
                    // not stated, since the listing.
                    let since = view.started_ms.unwrap_or(at_ms).min(at_ms);
                    self.connect(view, since, gone_at);
                }
                self.listed = true;
                self.last_up_ms = Some(self.last_up_ms.map_or(at_ms, |l| l.max(at_ms)));
            }
            Input::Connected { at_ms, view } => {
                if view.running {
                    self.connect(&view, at_ms, at_ms);
                }
            }
            Input::Stopped { id, at_ms } => self.stop(&id, at_ms),
            Input::Disconnected { id, network, at_ms } => {
                let Some(entry) = self.containers.get_mut(&id) else {
                    return;
                };
                let ips: Vec<IpAddr> = entry
                    .ips
                    .iter()
                    .filter(|(_, (n, _))| *n == network)
                    .map(|(ip, _)| *ip)
                    .collect();
                for ip in ips {
                    entry.ips.remove(&ip);
                    release(&mut self.released, ip, at_ms);
                }
            }
        }
    }

    /// Adds what `view` holds that is not known yet, since `since_ms`; addresses it no
    /// longer states are released at `gone_ms`.
    fn connect(&mut self, view: &ContainerView, since_ms: u64, gone_ms: u64) {
        let workload = self.workload_of(view);
        if !self.containers.contains_key(&view.id)
            && self.containers.len() >= self.config.containers_max.max(1)
        {
            self.stats.containers_dropped += 1;
            return;
        }
        let entry = self.containers.entry(view.id.clone()).or_insert(Entry {
            workload,
            ips: BTreeMap::new(),
        });
        let stated: BTreeMap<IpAddr, &String> = view
            .networks
            .iter()
            .flat_map(|(n, ips)| ips.iter().map(move |ip| (ip.to_canonical(), n)))
            .collect();
        let dropped: Vec<IpAddr> = entry
            .ips
            .keys()
            .filter(|ip| !stated.contains_key(ip))
            .copied()
            .collect();
        for (ip, network) in stated {
            entry
                .ips
                .entry(ip)
                .or_insert_with(|| (network.clone(), since_ms));
        }
        for ip in dropped {
            entry.ips.remove(&ip);
            release(&mut self.released, ip, gone_ms);
        }
    }

    fn stop(&mut self, id: &str, at_ms: u64) {
        if let Some(entry) = self.containers.remove(id) {
            for ip in entry.ips.keys() {
                release(&mut self.released, *ip, at_ms);
            }
        }
    }

    /// What the source vouches for as of `now_ms`: `None` before the first listing, and
    /// once the runtime has been unreachable for longer than `stale_after_ms`. Releases
    /// given go out once.
    pub fn observe(&mut self, now_ms: u64) -> Option<Observation> {
        let vouched = match (self.up_since_ms, self.listed, self.gap_ms) {
            (Some(_), true, _) => true,
            (_, _, Some(gap)) => now_ms.saturating_sub(gap) <= self.config.stale_after_ms,
            (_, _, None) => false,
        };
        if !vouched {
            return None;
        }
        let mut held: BTreeMap<IpAddr, Held> = BTreeMap::new();
        for entry in self.containers.values() {
            for (ip, (_, since)) in &entry.ips {
                let candidate = Held {
                    workload: entry.workload.clone(),
                    since_ms: Some(*since),
                };
                match held.get(ip) {
                    Some(other) if other.since_ms >= candidate.since_ms => {
                        self.stats.ip_conflicts += 1;
                    }
                    Some(_) => {
                        self.stats.ip_conflicts += 1;
                        held.insert(*ip, candidate);
                    }
                    None => {
                        held.insert(*ip, candidate);
                    }
                }
            }
        }
        let released = std::mem::take(&mut self.released);
        Some(Observation {
            held,
            changed_ms: None,
            released,
        })
    }
}

/// Records `ip` released at `at_ms` (the earliest release stated, if several).
fn release(released: &mut BTreeMap<IpAddr, u64>, ip: IpAddr, at_ms: u64) {
    let at = released.entry(ip).or_insert(at_ms);
    *at = (*at).min(at_ms);
}

/// A Docker API event's time (`timeNano`, else `time` in seconds), in ms since the epoch;
/// `None` when absent or not after the epoch.
pub fn event_time_ms(time_nano: Option<i64>, time_s: Option<i64>) -> Option<u64> {
    match (time_nano, time_s) {
        (Some(ns), _) if ns > 0 => u64::try_from(ns / 1_000_000).ok(),
        (_, Some(s)) if s > 0 => u64::try_from(s).ok()?.checked_mul(1_000),
        _ => None,
    }
}

/// What one Docker API event means for the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A container started (inspect it, then [`Input::Connected`] at `at_ms`).
    Started { id: String, at_ms: u64 },
    /// A container connected to a network (inspect it, then [`Input::Connected`]).
    NetworkConnected { id: String, at_ms: u64 },
    /// Turns straight into an input.
    Input(Input),
    /// An event the source has no use for.
    Ignored,
}

/// Why an event could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("event without a time")]
    NoTime,
    #[error("{0} event without a container id")]
    NoContainer(&'static str),
    #[error("network event without a network name")]
    NoNetwork,
}

/// Reads one event, given as its type, action, actor id, actor attributes and time.
pub fn read_event(
    kind: &str,
    action: &str,
    actor_id: Option<&str>,
    attributes: &BTreeMap<String, String>,
    at_ms: Option<u64>,
) -> Result<Event, EventError> {
    let wanted = matches!(
        (kind, action),
        ("container", "start" | "die" | "stop") | ("network", "connect" | "disconnect")
    );
    if !wanted {
        return Ok(Event::Ignored);
    }
    let at_ms = at_ms.ok_or(EventError::NoTime)?;
    let nonempty = |s: Option<&str>| s.filter(|s| !s.is_empty()).map(str::to_owned);
    if kind == "container" {
        let id = nonempty(actor_id).ok_or(EventError::NoContainer("container"))?;
        return Ok(match action {
            "start" => Event::Started { id, at_ms },
            _ => Event::Input(Input::Stopped { id, at_ms }),
        });
    }
    let id = nonempty(attributes.get("container").map(String::as_str))
        .ok_or(EventError::NoContainer("network"))?;
    if action == "connect" {
        return Ok(Event::NetworkConnected { id, at_ms });
    }
    let network =
        nonempty(attributes.get("name").map(String::as_str)).ok_or(EventError::NoNetwork)?;
    Ok(Event::Input(Input::Disconnected { id, network, at_ms }))
}

/// An RFC 3339 time as the Docker API writes `StartedAt` (`2024-05-01T10:20:30.123456789Z`
/// or with an offset), in ms since the epoch; `None` when malformed or before the epoch
/// (the API's zero time, `0001-01-01T00:00:00Z`, for a container never started).
pub fn rfc3339_ms(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = text.get(r)?;
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut i = 19;
    let mut millis = 0i64;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let digits = text.get(start..i)?;
        if digits.is_empty() {
            return None;
        }
        let first3: String = digits.chars().chain("000".chars()).take(3).collect();
        millis = first3.parse().ok()?;
    }
    let offset_s = match text.get(i..)? {
        "Z" | "z" => 0,
        zone if zone.len() == 6
            && matches!(zone.as_bytes()[0], b'+' | b'-')
            && zone.as_bytes()[3] == b':' =>
        {
            let h = num(i + 1..i + 3)?;
            let m = num(i + 4..i + 6)?;
            let sign = if zone.as_bytes()[0] == b'-' { -1 } else { 1 };
            sign * (h * 3_600 + m * 60)
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3_600 + minute * 60 + second - offset_s;
    let ms = secs.checked_mul(1_000)?.checked_add(millis)?;
    u64::try_from(ms).ok().filter(|&ms| ms > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 89, 0, last])
    }

    fn view(id: &str, name: &str, last: u8, started_ms: Option<u64>) -> ContainerView {
        ContainerView {
            id: id.to_owned(),
            name: name.to_owned(),
            labels: BTreeMap::new(),
            networks: BTreeMap::from([("net".to_owned(), vec![ip(last)])]),
            started_ms,
            running: true,
        }
    }

    fn state(stale_after_ms: u64) -> ContainersState {
        ContainersState::new(ContainersConfig {
            workload_label: WORKLOAD_LABEL_DEFAULT.to_owned(),
            stale_after_ms,
            containers_max: 4,
        })
    }

    fn held(o: &Observation, last: u8) -> Option<(&str, u64)> {
        o.held
            .get(&ip(last))
            .map(|h| (&*h.workload, h.since_ms.unwrap_or(0)))
    }

    #[test]
    fn workload_is_the_label_then_the_compose_service_then_the_name() {
        let mut s = state(1_000);
        let mut a = view("a", "alpha", 2, Some(10));
        a.labels.insert("tenure.workload".into(), "web".into());
        a.labels.insert(COMPOSE_SERVICE_LABEL.into(), "svc".into());
        let mut b = view("b", "beta", 3, Some(10));
        b.labels.insert(COMPOSE_SERVICE_LABEL.into(), "svc".into());
        let c = view("c", "gamma", 4, Some(10));
        s.apply(Input::Up { at_ms: 50 });
        s.apply(Input::Listed {
            at_ms: 100,
            containers: vec![a, b, c],
        });
        let o = s.observe(100).unwrap();
        assert_eq!(held(&o, 2), Some(("web", 10)));
        assert_eq!(held(&o, 3), Some(("svc", 10)));
        assert_eq!(held(&o, 4), Some(("gamma", 10)));
    }

    #[test]
    fn nothing_is_given_before_the_first_listing() {
        let mut s = state(1_000);
        assert_eq!(s.observe(10), None);
        s.apply(Input::Up { at_ms: 10 });
        assert_eq!(s.observe(20), None, "up, not listed");
    }

    #[test]
    fn a_stop_closes_at_its_event_time_and_the_next_owner_opens_at_its_start() {
        let mut s = state(1_000);
        s.apply(Input::Up { at_ms: 0 });
        s.apply(Input::Listed {
            at_ms: 100,
            containers: vec![view("a", "a", 2, Some(50))],
        });
        assert_eq!(held(&s.observe(100).unwrap(), 2), Some(("a", 50)));
        s.apply(Input::Stopped {
            id: "a".into(),
            at_ms: 300,
        });
        s.apply(Input::Stopped {
            id: "a".into(),
            at_ms: 310,
        });
        let o = s.observe(400).unwrap();
        assert_eq!(held(&o, 2), None);
        assert_eq!(o.released.get(&ip(2)), Some(&300), "the first close event");
        assert!(s.observe(450).unwrap().released.is_empty(), "given once");
        s.apply(Input::Connected {
            at_ms: 500,
            view: view("b", "b", 2, Some(490)),
        });
        let o = s.observe(600).unwrap();
        assert_eq!(held(&o, 2), Some(("b", 500)), "the event's time");
        assert!(o.released.is_empty(), "given once");
    }

    #[test]
    fn a_disconnect_releases_only_that_network() {
        let mut s = state(1_000);
        let mut a = view("a", "a", 2, Some(50));
        a.networks.insert("other".into(), vec![ip(9)]);
        s.apply(Input::Up { at_ms: 0 });
        s.apply(Input::Listed {
            at_ms: 100,
            containers: vec![a],
        });
        s.apply(Input::Disconnected {
            id: "a".into(),
            network: "other".into(),
            at_ms: 200,
        });
        let o = s.observe(300).unwrap();
        assert_eq!(held(&o, 2), Some(("a", 50)));
        assert_eq!(o.released.get(&ip(9)), Some(&200));
    }

    #[test]
    fn a_relist_closes_what_vanished_at_the_last_instant_known_up() {
        let mut s = state(10_000);
        s.apply(Input::Up { at_ms: 0 });
        s.apply(Input::Listed {
            at_ms: 100,
            containers: vec![view("a", "a", 2, Some(50)), view("b", "b", 3, Some(60))],
        });
        s.apply(Input::Alive { at_ms: 1_000 });
        s.apply(Input::Lost { at_ms: 1_200 });
        // While down, the last known mapping, within the staleness limit.
        assert_eq!(held(&s.observe(2_000).unwrap(), 2), Some(("a", 50)));
        s.apply(Input::Up { at_ms: 3_000 });
        assert!(
            s.observe(3_000).is_some(),
            "reconnected, not listed yet: last known"
        );
        s.apply(Input::Listed {
            at_ms: 3_100,
            containers: vec![view("b", "b", 3, Some(60)), view("c", "c", 2, Some(2_500))],
        });
        let o = s.observe(3_200).unwrap();
        assert_eq!(held(&o, 3), Some(("b", 60)), "b kept its since");
        assert_eq!(held(&o, 2), Some(("c", 2_500)));
        let mut s2 = state(10_000);
        s2.apply(Input::Up { at_ms: 0 });
        s2.apply(Input::Listed {
            at_ms: 100,
            containers: vec![view("a", "a", 2, Some(50))],
        });
        s2.apply(Input::Alive { at_ms: 1_000 });
        s2.apply(Input::Lost { at_ms: 1_200 });
        s2.apply(Input::Up { at_ms: 3_000 });
        s2.apply(Input::Listed {
            at_ms: 3_100,
            containers: vec![],
        });
        let o = s2.observe(3_200).unwrap();
        assert_eq!(
            o.released.get(&ip(2)),
            Some(&1_000),
            "gone while down: closed at the runtime's last answer"
        );
    }

    #[test]
    fn an_owner_replaced_while_down_ends_in_the_history_when_last_vouched_for() {
        use crate::exporter::history::{HistoryConfig, LocalHistory, Stamp};
        let mut s = state(10_000);
        let mut h = LocalHistory::new(HistoryConfig {
            margin_ms: 0,
            ..HistoryConfig::default()
        });
        s.apply(Input::Up { at_ms: 0 });
        s.apply(Input::Listed {
            at_ms: 100,
            containers: vec![view("a", "a", 2, Some(50))],
        });
        h.observe(100, 0, &s.observe(100).unwrap());
        s.apply(Input::Alive { at_ms: 1_000 });
        h.observe(1_000, 0, &s.observe(1_000).unwrap());
        s.apply(Input::Lost { at_ms: 1_000 });
        // Unseen: a dies at 1_500, c holds .2 over 2_000..3_000, b takes it at 4_000.
        s.apply(Input::Up { at_ms: 5_000 });
        s.apply(Input::Listed {
            at_ms: 5_000,
            containers: vec![view("b", "b", 2, Some(4_000))],
        });
        h.observe(5_100, 0, &s.observe(5_100).unwrap());
        let tenures = h.tenures(ip(2));
        assert_eq!(tenures[0].until_ms, Some(1_000), "a: the last answer");
        assert_eq!(tenures[1].since_ms, 4_000);
        assert_eq!(
            h.stamp(ip(2), 2_100, 2_900),
            Stamp::Unattributed(tenure_gossip::wire::LocalReason::Unknown),
            "c's flow is nobody's"
        );
    }

    #[test]
    fn past_the_staleness_limit_nothing_is_given() {
        let mut s = state(1_000);
        s.apply(Input::Up { at_ms: 0 });
        s.apply(Input::Listed {
            at_ms: 100,
            containers: vec![view("a", "a", 2, Some(50))],
        });
        let _ = s.observe(500);
        s.apply(Input::Alive { at_ms: 600 });
        s.apply(Input::Lost { at_ms: 700 });
        assert!(s.observe(1_600).is_some(), "at the limit");
        assert_eq!(s.observe(1_601), None, "past it");
        // A reconnect that fails before listing does not extend it.
        s.apply(Input::Up { at_ms: 1_700 });
        s.apply(Input::Alive { at_ms: 1_800 });
        s.apply(Input::Lost { at_ms: 1_800 });
        assert_eq!(s.observe(1_900), None);
    }

    #[test]
    fn the_later_of_two_containers_stating_one_ip_holds_it() {
        let mut s = state(1_000);
        s.apply(Input::Up { at_ms: 0 });
        s.apply(Input::Listed {
            at_ms: 100,
            containers: vec![view("a", "a", 2, Some(50)), view("b", "b", 2, Some(80))],
        });
        let o = s.observe(100).unwrap();
        assert_eq!(held(&o, 2), Some(("b", 80)));
        assert_eq!(s.stats().ip_conflicts, 1);
    }

    #[test]
    fn containers_past_the_limit_are_not_tracked() {
        let mut s = state(1_000);
        s.apply(Input::Up { at_ms: 0 });
        let many = (0..6)
            .map(|k| view(&format!("c{k}"), "c", 10 + k, Some(5)))
            .collect();
        s.apply(Input::Listed {
            at_ms: 100,
            containers: many,
        });
        assert_eq!(s.observe(100).unwrap().held.len(), 4);
        assert_eq!(s.stats().containers_dropped, 2);
    }

    #[test]
    fn events_are_read_and_malformed_ones_are_errors() {
        let none = BTreeMap::new();
        assert_eq!(
            read_event("container", "start", Some("x"), &none, Some(5)),
            Ok(Event::Started {
                id: "x".into(),
                at_ms: 5
            })
        );
        assert_eq!(
            read_event("container", "die", Some("x"), &none, Some(5)),
            Ok(Event::Input(Input::Stopped {
                id: "x".into(),
                at_ms: 5
            }))
        );
        assert_eq!(
            read_event("image", "pull", None, &none, None),
            Ok(Event::Ignored)
        );
        assert_eq!(
            read_event("container", "die", Some("x"), &none, None),
            Err(EventError::NoTime)
        );
        assert_eq!(
            read_event("container", "stop", Some(""), &none, Some(5)),
            Err(EventError::NoContainer("container"))
        );
        let only_container = BTreeMap::from([("container".to_owned(), "x".to_owned())]);
        assert_eq!(
            read_event("network", "disconnect", Some("n"), &only_container, Some(5)),
            Err(EventError::NoNetwork)
        );
        assert_eq!(
            read_event("network", "connect", Some("n"), &none, Some(5)),
            Err(EventError::NoContainer("network"))
        );
        let attrs = BTreeMap::from([
            ("container".to_owned(), "x".to_owned()),
            ("name".to_owned(), "net".to_owned()),
        ]);
        assert_eq!(
            read_event("network", "disconnect", Some("n"), &attrs, Some(5)),
            Ok(Event::Input(Input::Disconnected {
                id: "x".into(),
                network: "net".into(),
                at_ms: 5
            }))
        );
        assert_eq!(event_time_ms(Some(1_500_000_000), Some(9)), Some(1_500));
        assert_eq!(event_time_ms(None, Some(2)), Some(2_000));
        assert_eq!(event_time_ms(Some(-1), None), None);
    }

    #[test]
    fn started_at_is_read_as_rfc3339() {
        assert_eq!(rfc3339_ms("1970-01-01T00:00:01Z"), Some(1_000));
        assert_eq!(
            rfc3339_ms("2024-05-01T10:20:30.123456789Z"),
            Some(1_714_558_830_123)
        );
        assert_eq!(
            rfc3339_ms("2024-05-01T12:20:30.5+02:00"),
            Some(1_714_558_830_500)
        );
        assert_eq!(rfc3339_ms("0001-01-01T00:00:00Z"), None, "never started");
        for bad in [
            "",
            "2024-05-01",
            "2024-13-01T00:00:00Z",
            "2024-05-01T10:20:30",
            "2024-05-01T10:20:30.Z",
            "x024-05-01T10:20:30Z",
        ] {
            assert_eq!(rfc3339_ms(bad), None, "{bad}");
        }
    }
}
