//! The kernel's table of socket births keeps its promises when it is far too small and
//! two CPUs race on it: with 8 slots and dozens of live sockets, opened on one thread
//! while another thread closes older ones, every socket is reported at close exactly
//! once, and its start is either its own (inside the window in which its connection was
//! made, with the right direction) or flagged inexact (and then the close time): never
//! another socket's. Needs root; without it the test prints `SKIPPED (needs root)` and
//! passes.

mod common;

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::num::NonZeroU32;
use std::sync::mpsc;
use std::time::Duration;

use common::{collect_until, privileged};
use tenure_node_ebpf::{Capture, CaptureOptions, Direction, BIRTHS_MIN};

const CONNECTIONS: usize = 48;
/// Connections the closing thread keeps open: 32 live sockets for 8 slots.
const OPEN_AT_ONCE: usize = 16;
/// Pause between two connections, so that no two connection windows share a
/// millisecond (flow times are Unix milliseconds), even with 1 ms of slack each side.
const PACING: Duration = Duration::from_millis(3);

/// When one connection was made, in Unix milliseconds, and its client's address.
struct Window {
    client: SocketAddr,
    begin_ms: u64,
    end_ms: u64,
}

fn unix_ms() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Realtime);
    u64::try_from(now.tv_sec).unwrap_or(0) * 1000
        + u64::try_from(now.tv_nsec).unwrap_or(0) / 1_000_000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_start_time_is_the_sockets_own_or_flagged() {
    if !privileged("a_start_time_is_the_sockets_own_or_flagged") {
        return;
    }
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let server = listener.local_addr().expect("addr");
    let options = CaptureOptions {
        births_max: NonZeroU32::new(BIRTHS_MIN).expect("nonzero"),
        ..CaptureOptions::default()
    };
    let mut capture = Capture::load(options).expect("load capture");

    let (opened, to_close) = mpsc::channel::<(TcpStream, TcpStream)>();
    let opener = std::thread::spawn(move || -> std::io::Result<Vec<Window>> {
        let mut windows = Vec::new();
        for _ in 0..CONNECTIONS {
            let begin_ms = unix_ms();
            let client = TcpStream::connect(server)?;
            let (served, _) = listener.accept()?;
            let end_ms = unix_ms();
            windows.push(Window {
                client: client.local_addr()?,
                begin_ms,
                end_ms,
            });
            if opened.send((client, served)).is_err() {
                break;
            }
            std::thread::sleep(PACING);
        }
        Ok(windows)
    });
    let closer = std::thread::spawn(move || {
        let mut open = VecDeque::new();
        for pair in to_close {
            open.push_back(pair);
            if open.len() > OPEN_AT_ONCE {
                drop(open.pop_front());
            }
        }
    });
    let windows = opener.join().expect("opener thread").expect("connections");
    closer.join().expect("closer thread");

    let flows = collect_until(
        &mut capture,
        |f| f.local == server || f.remote == server,
        |seen| seen.len() >= 2 * CONNECTIONS,
    )
    .await;
    let (mut exact, mut inexact) = (0, 0);
    for window in &windows {
        let ends: Vec<_> = flows
            .iter()
            .filter(|f| f.local == window.client || f.remote == window.client)
            .collect();
        assert_eq!(
            ends.len(),
            2,
            "both ends of {} once: {ends:#?}",
            window.client
        );
        for flow in ends {
            let want = if flow.local == window.client {
                Direction::Outbound
            } else {
                Direction::Inbound
            };
            if flow.start_exact {
                exact += 1;
                assert!(
                    (window.begin_ms.saturating_sub(1)..=window.end_ms + 1)
                        .contains(&flow.start_unix_ms),
                    "start outside the socket's own window [{}, {}]: {flow:#?}",
                    window.begin_ms,
                    window.end_ms
                );
                assert_eq!(flow.direction, want, "{flow:#?}");
            } else {
                inexact += 1;
                assert_eq!(flow.start_unix_ms, flow.end_unix_ms, "{flow:#?}");
            }
        }
    }
    // Both paths ran: more live sockets than slots forces evictions, and the sockets born
    // last keep their slots until they close.
    assert!(exact > 0 && inexact > 0, "exact {exact}, inexact {inexact}");
    let stats = capture.stats().expect("stats");
    assert!(stats.untracked_closes >= inexact, "{stats:?}");
}
