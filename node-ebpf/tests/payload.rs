//! `bytes_sent` and `bytes_received` are the payload each way, exactly: the kernel counts
//! a SYN and a FIN as one sequence number each, and the program takes off what it counted.
//! Every test moves odd byte counts both ways, has both sides' data acknowledged, then
//! closes one way, and checks both ends of the connection: the client's (active open) and
//! the server's (passive open), over IPv4 and IPv6. Needs root; without it each test
//! prints `SKIPPED (needs root)` and passes.

mod common;

use std::fs::File;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::Command;
use std::time::Duration;

use common::{collect_until, is_end_of, privileged, Exchange, DEADLINE};
use rustix::net::sockopt::set_socket_linger;
use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};
use tenure_node_ebpf::{Capture, CaptureOptions, CapturedFlow, Direction};
use tokio::time::Instant;

/// What the client writes: odd, and more than one segment.
const UP: usize = 123_457;
/// What the server answers: odd.
const DOWN: usize = 6_543;

/// `st` codes of `/proc/net/tcp` (`TCP_*` in include/net/tcp_states.h).
const TCP_FIN_WAIT1: u8 = 4;
const TCP_FIN_WAIT2: u8 = 5;

/// How the connection ends, after both sides' data was acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    /// The client closes first: its FIN is acknowledged in FIN_WAIT2, the server answers
    /// from CLOSE_WAIT and closes from LAST_ACK.
    ClientFirst,
    /// The server closes first: the client is the passive closer.
    ServerFirst,
    /// Both close before either FIN arrives (the FINs cross): both ends go through
    /// FIN_WAIT1, and at least one through CLOSING. The test's own network namespace
    /// drops every packet on its `lo` while the two FINs leave.
    Simultaneous,
    /// The client aborts (SO_LINGER 0): an RST from ESTABLISHED, no FIN either way.
    ClientAborts,
    /// The client half-closes (its FIN acknowledged, the server's EOF read), then aborts
    /// from FIN_WAIT2: one FIN counted on each side, then an RST.
    HalfClosedThenAborted,
}

async fn payload_is_exact(close: Close, loopback: IpAddr) {
    let test = format!("payload bytes, {close:?}, {loopback}");
    if !privileged(&test) {
        return;
    }
    let netns = if close == Close::Simultaneous {
        if Command::new("tc").arg("-V").output().is_err() {
            common::skipped(&format!("SKIPPED (needs iproute2 `tc`): {test}"));
            return;
        }
        Some(Netns::create().expect("create network namespace"))
    } else {
        None
    };
    let mut capture = Capture::load(CaptureOptions::default()).expect("load capture");
    let ex = match &netns {
        Some(netns) => {
            let name = netns.name.clone();
            netns.run(move || converse(loopback, close, Some(&name)))
        }
        None => converse(loopback, close, None),
    }
    .unwrap_or_else(|e| panic!("{test}: {e}"));

    let flows = collect_until(&mut capture, |f| is_end_of(f, &ex), |seen| seen.len() >= 2).await;
    let end = |local: SocketAddr| -> &CapturedFlow {
        let ends: Vec<&CapturedFlow> = flows.iter().filter(|f| f.local == local).collect();
        assert_eq!(ends.len(), 1, "{test}: one record per end: {flows:#?}");
        ends[0]
    };
    let (client, server) = (end(ex.client), end(ex.server));
    assert_eq!(client.direction, Direction::Outbound, "{test}");
    assert_eq!(server.direction, Direction::Inbound, "{test}");
    for flow in [client, server] {
        assert!(!flow.ongoing && flow.start_exact, "{test}: {flow:#?}");
    }
    assert_eq!(
        (client.bytes_sent, client.bytes_received),
        (UP as u64, DOWN as u64),
        "{test}: the client's end (active open): {client:#?}"
    );
    assert_eq!(
        (server.bytes_sent, server.bytes_received),
        (DOWN as u64, UP as u64),
        "{test}: the server's end (passive open): {server:#?}"
    );
    println!(
        "{test}: client sent {} received {}, server sent {} received {}",
        client.bytes_sent, client.bytes_received, server.bytes_sent, server.bytes_received
    );
}

/// One connection to a listener on `loopback`, closed as `close` says. `netns` names the
/// namespace the calling thread is in, for `tc`.
fn converse(loopback: IpAddr, close: Close, netns: Option<&str>) -> io::Result<Exchange> {
    let listener = TcpListener::bind((loopback, 0))?;
    let server_addr = listener.local_addr()?;
    let mut client = TcpStream::connect(server_addr)?;
    let client_addr = client.local_addr()?;
    let (mut served, _) = listener.accept()?;
    client.write_all(&vec![b'u'; UP])?;
    served.read_exact(&mut vec![0u8; UP])?;
    served.write_all(&vec![b'd'; DOWN])?;
    client.read_exact(&mut vec![0u8; DOWN])?;
    // Every byte acknowledged both ways, so the counters are final before any close.
    let ends = [(client_addr, server_addr), (server_addr, client_addr)];
    wait_until("all data acknowledged", || {
        Ok(ends
            .iter()
            .all(|&(l, r)| matches!(socket_state(l, r), Ok(Some((_, 0))))))
    })?;

    match close {
        Close::ClientFirst => {
            client.shutdown(Shutdown::Write)?;
            served.read_to_end(&mut Vec::new())?;
            drop(served);
            client.read_to_end(&mut Vec::new())?;
        }
        Close::ServerFirst => {
            served.shutdown(Shutdown::Write)?;
            client.read_to_end(&mut Vec::new())?;
            drop(client);
            served.read_to_end(&mut Vec::new())?;
            return Ok(Exchange {
                client: client_addr,
                server: server_addr,
            });
        }
        Close::Simultaneous => {
            let netns = netns.ok_or_else(|| io::Error::other("needs a namespace"))?;
            // A token bucket of one byte drops every packet: the FINs leave, none arrives.
            tc(&[
                "-n", netns, "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1mbit", "burst",
                "1", "limit", "1",
            ])?;
            client.shutdown(Shutdown::Write)?;
            served.shutdown(Shutdown::Write)?;
            let states = ends.map(|(l, r)| socket_state(l, r));
            tc(&["-n", netns, "qdisc", "del", "dev", "lo", "root"])?;
            for state in states {
                match state? {
                    Some((TCP_FIN_WAIT1, _)) => {}
                    other => {
                        return Err(io::Error::other(format!(
                            "the FINs did not cross: an end in {other:?}, not FIN_WAIT1"
                        )))
                    }
                }
            }
            // Both FINs go out again on the retransmission timer, and cross.
            served.read_to_end(&mut Vec::new())?;
            client.read_to_end(&mut Vec::new())?;
        }
        Close::ClientAborts => {
            set_socket_linger(&client, Some(Duration::ZERO))?;
            drop(client);
            match served.read_to_end(&mut Vec::new()) {
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
                other => {
                    return Err(io::Error::other(format!(
                        "the server should see a reset, saw {other:?}"
                    )))
                }
            }
            return Ok(Exchange {
                client: client_addr,
                server: server_addr,
            });
        }
        Close::HalfClosedThenAborted => {
            client.shutdown(Shutdown::Write)?;
            served.read_to_end(&mut Vec::new())?;
            wait_until("the client's FIN acknowledged", || {
                Ok(matches!(
                    socket_state(client_addr, server_addr)?,
                    Some((TCP_FIN_WAIT2, _))
                ))
            })?;
            set_socket_linger(&client, Some(Duration::ZERO))?;
            drop(client);
            // The server's socket leaves the table when the RST closes it.
            wait_until("the server's socket reset", || {
                Ok(socket_state(server_addr, client_addr)?.is_none())
            })?;
            return Ok(Exchange {
                client: client_addr,
                server: server_addr,
            });
        }
    }
    Ok(Exchange {
        client: client_addr,
        server: server_addr,
    })
}

/// Polls `done` until it holds or [`DEADLINE`] passes.
fn wait_until(what: &str, mut done: impl FnMut() -> io::Result<bool>) -> io::Result<()> {
    let deadline = Instant::now() + DEADLINE;
    while !done()? {
        if Instant::now() > deadline {
            return Err(io::Error::other(format!("timed out waiting for {what}")));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// The state and unacknowledged send bytes (`st`, `tx_queue`) of the socket `local` →
/// `remote` in the calling thread's network namespace, from `/proc/thread-self/net/tcp`
/// and `tcp6`; `None` when no such socket is in the kernel's tables.
fn socket_state(local: SocketAddr, remote: SocketAddr) -> io::Result<Option<(u8, u64)>> {
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/thread-self/net/{table}"))?;
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = |field: &str| {
                field
                    .rsplit_once(':')
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            };
            let (Some(l), Some(r), Some(st), Some(queues)) = (
                fields.get(1).and_then(|f| port(f)),
                fields.get(2).and_then(|f| port(f)),
                fields.get(3).and_then(|s| u8::from_str_radix(s, 16).ok()),
                fields.get(4),
            ) else {
                continue;
            };
            if (l, r) != (local.port(), remote.port()) {
                continue;
            }
            let tx = queues
                .split_once(':')
                .and_then(|(tx, _)| u64::from_str_radix(tx, 16).ok())
                .ok_or_else(|| io::Error::other(format!("unreadable queues in {line:?}")))?;
            return Ok(Some((st, tx)));
        }
    }
    Ok(None)
}

fn tc(args: &[&str]) -> io::Result<()> {
    let out = Command::new("tc").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "`tc {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// A network namespace of the test's own, with `lo` up (127.0.0.1 and ::1), deleted on
/// drop even when the test fails.
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> Result<Self, String> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "tenure-payload-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        let netns = Self { name };
        ip(&["-n", &netns.name, "link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// Runs `f` on a thread that has moved into the namespace; sockets it opens live there.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path)?;
            move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network))?;
            f()
        })
        .join()
        .map_err(|_| io::Error::other("namespace thread panicked"))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(error) = ip(&["netns", "del", &self.name]) {
            eprintln!("could not delete network namespace {}: {error}", self.name);
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running `ip {}`: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

#[tokio::test]
async fn ipv4_client_closes_first() {
    payload_is_exact(Close::ClientFirst, V4).await;
}

#[tokio::test]
async fn ipv6_client_closes_first() {
    payload_is_exact(Close::ClientFirst, V6).await;
}

#[tokio::test]
async fn ipv4_server_closes_first() {
    payload_is_exact(Close::ServerFirst, V4).await;
}

#[tokio::test]
async fn ipv6_server_closes_first() {
    payload_is_exact(Close::ServerFirst, V6).await;
}

#[tokio::test]
async fn ipv4_simultaneous_close() {
    payload_is_exact(Close::Simultaneous, V4).await;
}

#[tokio::test]
async fn ipv6_simultaneous_close() {
    payload_is_exact(Close::Simultaneous, V6).await;
}

#[tokio::test]
async fn ipv4_client_aborts() {
    payload_is_exact(Close::ClientAborts, V4).await;
}

#[tokio::test]
async fn ipv6_client_aborts() {
    payload_is_exact(Close::ClientAborts, V6).await;
}

#[tokio::test]
async fn ipv4_half_closed_then_aborted() {
    payload_is_exact(Close::HalfClosedThenAborted, V4).await;
}

#[tokio::test]
async fn ipv6_half_closed_then_aborted() {
    payload_is_exact(Close::HalfClosedThenAborted, V6).await;
}
