//! Helpers shared by the root-only capture tests.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use tenure_node_ebpf::{check_privileges, Capture, CapturedFlow};
use tokio::time::Instant;

/// How long a test waits for the kernel to report something before failing.
pub(crate) const DEADLINE: Duration = Duration::from_secs(10);

/// True when the test may load eBPF; otherwise prints why it is skipped, loudly.
pub(crate) fn privileged(test: &str) -> bool {
    match check_privileges() {
        Ok(()) => true,
        Err(error) => {
            skipped(&format!(
                "SKIPPED (needs root): {test}: {:#}",
                anyhow::Error::new(error)
            ));
            false
        }
    }
}

/// Writes straight to the process's stderr: libtest captures `eprintln!`, and a skip
/// must be seen in a normal run.
pub(crate) fn skipped(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The two ends of one exchange, as the test saw them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Exchange {
    pub(crate) client: SocketAddr,
    pub(crate) server: SocketAddr,
}

/// Runs one complete TCP exchange against `listener`: the client sends `up` bytes, the
/// server answers `down` bytes, then both close in an order that lets every FIN be
/// acknowledged before the sockets reach CLOSE, so the final counters are deterministic.
pub(crate) fn exchange(
    listener: &TcpListener,
    up: usize,
    down: usize,
) -> std::io::Result<Exchange> {
    let server_addr = listener.local_addr()?;
    let mut client = TcpStream::connect(server_addr)?;
    let client_addr = client.local_addr()?;
    let (mut served, _) = listener.accept()?;
    client.write_all(&vec![b'u'; up])?;
    let mut buf = vec![0u8; up];
    served.read_exact(&mut buf)?;
    served.write_all(&vec![b'd'; down])?;
    let mut buf = vec![0u8; down];
    client.read_exact(&mut buf)?;
    client.shutdown(std::net::Shutdown::Write)?;
    let mut rest = Vec::new();
    served.read_to_end(&mut rest)?;
    drop(served);
    client.read_to_end(&mut rest)?;
    drop(client);
    Ok(Exchange {
        client: client_addr,
        server: server_addr,
    })
}

/// Reads closed flows until `done` holds for the flows collected so far (only those
/// `wanted` keeps), or the deadline passes. Returns what was collected either way.
pub(crate) async fn collect_until(
    capture: &mut Capture,
    wanted: impl Fn(&CapturedFlow) -> bool,
    done: impl Fn(&[CapturedFlow]) -> bool,
) -> Vec<CapturedFlow> {
    let deadline = Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    while !done(&seen) {
        match tokio::time::timeout_at(deadline, capture.next_batch()).await {
            Ok(Ok(batch)) => seen.extend(batch.into_iter().filter(|f| wanted(f))),
            Ok(Err(error)) => panic!(
                "reading the ring buffer failed: {:#}",
                anyhow::Error::new(error)
            ),
            Err(_elapsed) => break,
        }
    }
    seen
}

/// True when the flow is one end of `ex`.
pub(crate) fn is_end_of(flow: &CapturedFlow, ex: &Exchange) -> bool {
    (flow.local == ex.client && flow.remote == ex.server)
        || (flow.local == ex.server && flow.remote == ex.client)
}
