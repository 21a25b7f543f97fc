//! Overhead of the flow capture on connection-heavy work: opens and closes many loopback
//! TCP connections (64 bytes each way) with and without the program attached, alternating
//! rounds in one run so that drift on a shared machine hits both sides alike, and prints
//!
//! `RESULT connections_per_sec_without=<n> connections_per_sec_with=<n> overhead_pct=<x>`
//!
//! where the rates are the median round of each, and the overhead is the median over
//! pairs of rounds (each round with the program against the round without it just
//! before): on a shared virtual machine the speed of a whole round jumps between levels as
//! neighbours come and go, and a pair of adjacent rounds most often shares its level, so
//! the paired figure cancels what the two medians cannot. With the program attached a
//! tokio task drains the ring
//! buffer concurrently, as the exporter would. Needs root; without it prints `SKIPPED`.
//!
//! The seconds are CPU seconds of the thread that makes the connections, from
//! `CLOCK_THREAD_CPUTIME_ID`: both ends of every connection, their loopback packets (this
//! kernel processes them in the sending thread: no IRQ time accounting) and every run of
//! the program they trigger are charged to it. On a shared machine wall time mostly
//! measures the neighbours: the same rounds by wall clock are printed beside, for
//! reference.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tenure_node_ebpf::{check_privileges, Capture, CaptureOptions};

const ROUNDS_EACH: usize = 11;
const CONNECTIONS_PER_ROUND: usize = 4000;
const PAYLOAD_BYTES: usize = 64;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if let Err(error) = check_privileges() {
        eprintln!("SKIPPED (needs root): overhead benchmark: {error}");
        println!("RESULT SKIPPED (needs root)");
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;

    // Warm up the connection path once so the first round measures no page faults.
    connections(&listener, CONNECTIONS_PER_ROUND / 4)?;

    let (mut without, mut without_wall) = (Vec::new(), Vec::new());
    let (mut with, mut with_wall) = (Vec::new(), Vec::new());
    let mut flows_seen_total = 0u64;
    for round in 0..ROUNDS_EACH * 2 {
        if round % 2 == 0 {
            connections(&listener, CONNECTIONS_PER_ROUND / 8)?;
            let (cpu, wall) = timed(&listener)?;
            without.push(cpu);
            without_wall.push(wall);
        } else {
            let seen = Arc::new(AtomicU64::new(0));
            let capture = {
                let _enter = runtime.enter();
                Capture::load(CaptureOptions::default())?
            };
            let drain = {
                let seen = Arc::clone(&seen);
                runtime.spawn(async move {
                    let mut capture = capture;
                    while let Ok(batch) = capture.next_batch().await {
                        seen.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    }
                })
            };
            // Loading parsed the kernel's BTF and walked every socket, which leaves the
            // caches cold: warm up as the rounds without did before their first round.
            connections(&listener, CONNECTIONS_PER_ROUND / 8)?;
            let (cpu, wall) = timed(&listener)?;
            with.push(cpu);
            with_wall.push(wall);
            // Let the reader catch up (records below the wakeup threshold wait for its
            // timer) so the count below checks that every connection was captured.
            let want = 2 * (CONNECTIONS_PER_ROUND + CONNECTIONS_PER_ROUND / 8) as u64;
            for _ in 0..200 {
                if seen.load(Ordering::Relaxed) >= want {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            drain.abort();
            let _ = runtime.block_on(drain);
            flows_seen_total += seen.load(Ordering::Relaxed);
        }
    }
    let expected = (ROUNDS_EACH * (CONNECTIONS_PER_ROUND + CONNECTIONS_PER_ROUND / 8) * 2) as u64;
    eprintln!(
        "rounds without (conn per CPU-s): {without:.0?}\nrounds with    (conn per CPU-s): {with:.0?}\n\
         by wall clock, without: {without_wall:.0?}\nby wall clock, with:    {with_wall:.0?}\n\
         flows captured while attached: {flows_seen_total} (>= {expected} expected, 2 ends per connection, plus other traffic)"
    );
    let wall_overhead_pct = {
        let (a, b) = (median(&mut without_wall), median(&mut with_wall));
        (a - b) / a * 100.0
    };
    eprintln!("by wall clock (medians): overhead {wall_overhead_pct:.2}%");
    let mut paired: Vec<f64> = without
        .iter()
        .zip(&with)
        .map(|(off, on)| (off - on) / off * 100.0)
        .collect();
    eprintln!("overhead per pair of rounds (%): {paired:.1?}");
    let overhead_pct = median(&mut paired);
    let without = median(&mut without);
    let with = median(&mut with);
    println!(
        "RESULT connections_per_sec_without={without:.0} connections_per_sec_with={with:.0} overhead_pct={overhead_pct:.2}"
    );
    Ok(())
}

/// One round: connections per CPU-second of this thread, and per wall-clock second.
#[allow(
    clippy::disallowed_methods,
    reason = "a benchmark measures time; the rule guards the sans-io cores"
)]
fn timed(listener: &TcpListener) -> std::io::Result<(f64, f64)> {
    let cpu = || rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    let (cpu_start, wall_start) = (cpu(), Instant::now());
    connections(listener, CONNECTIONS_PER_ROUND)?;
    let wall = wall_start.elapsed().as_secs_f64();
    let (cpu_end, cpu_start) = (cpu(), cpu_start);
    let cpu = (cpu_end.tv_sec - cpu_start.tv_sec) as f64
        + (cpu_end.tv_nsec - cpu_start.tv_nsec) as f64 / 1e9;
    let count = CONNECTIONS_PER_ROUND as f64;
    Ok((count / cpu, count / wall))
}

/// `count` complete connections. The server closes first, so TIME_WAIT lands on the
/// server's side, where each client port makes a distinct 4-tuple and the ephemeral range
/// is never exhausted.
fn connections(listener: &TcpListener, count: usize) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let payload = [7u8; PAYLOAD_BYTES];
    let mut buf = [0u8; PAYLOAD_BYTES];
    for _ in 0..count {
        let mut client = TcpStream::connect(addr)?;
        let (mut served, _) = listener.accept()?;
        client.write_all(&payload)?;
        served.read_exact(&mut buf)?;
        served.write_all(&payload)?;
        served.shutdown(Shutdown::Both)?;
        drop(served);
        client.read_exact(&mut buf)?;
        let mut rest = Vec::new();
        client.read_to_end(&mut rest)?;
    }
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}
