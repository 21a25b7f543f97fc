//! The flow records the capture hands to the exporter.

use std::net::SocketAddr;

/// Which end opened the connection, as seen from this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// This host connected out (`CLOSE→SYN_SENT`).
    Outbound,
    /// A peer connected in and this host accepted (`LISTEN→SYN_RECV`).
    Inbound,
    /// Capture did not see the socket being born and found no listener on its local
    /// port; the exporter may still infer the direction from its own knowledge.
    Unknown,
}

/// One TCP flow as captured on this host: either closed (`ongoing == false`, counters
/// final) or a snapshot of a live socket (`ongoing == true`, counters cumulative so far).
///
/// Times are wall-clock Unix milliseconds converted from the kernel's monotonic clock
/// with the offset measured when the record was read, so they share the host clock's
/// skew with every other timestamp the exporter produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CapturedFlow {
    /// This host's end. IPv4 (including IPv4-mapped IPv6) is reported as IPv4.
    pub local: SocketAddr,
    /// The peer's end.
    pub remote: SocketAddr,
    /// Which side opened the connection.
    pub direction: Direction,
    /// When the socket was born, or, when `start_exact` is false, when capture first saw
    /// it: later than the real start, never earlier, so the flow never claims time it
    /// cannot prove.
    pub start_unix_ms: u64,
    /// When the socket closed, or when the snapshot was taken for an ongoing flow.
    pub end_unix_ms: u64,
    /// Payload bytes this host sent that the peer acknowledged: the kernel's
    /// `tcp_sock.bytes_acked` less the SYN and the FIN it counted (one sequence number
    /// each, RFC 4898). After a close in which everything was acknowledged, what the
    /// application wrote. Exact when capture saw the socket's birth (`start_exact`);
    /// otherwise the SYN is judged by the guessed direction.
    pub bytes_sent: u64,
    /// Payload bytes this host received in order: `tcp_sock.bytes_received` less the
    /// peer's FIN. What the application could read.
    pub bytes_received: u64,
    /// Segments received (`tcp_sock.segs_in`: pure ACKs and retransmissions included).
    pub segs_in: u32,
    /// Segments sent (`tcp_sock.segs_out`: pure ACKs and retransmissions included).
    pub segs_out: u32,
    /// Total retransmitted segments (`tcp_sock.total_retrans`).
    pub retransmits: u32,
    /// Smoothed round-trip time in microseconds (`tcp_sock.srtt_us / 8`); 0 before the
    /// first RTT sample.
    pub srtt_us: u32,
    /// The local workload from the workload maps at the time of the record; 0 = unknown.
    pub workload_id: u32,
    /// True for a snapshot of a socket that is still open.
    pub ongoing: bool,
    /// False when capture saw the socket only after its birth (it predates the capture,
    /// or its per-socket state was evicted); see `start_unix_ms`.
    pub start_exact: bool,
    /// The host's clock frame the times were converted in: Unix ms at monotonic 0 (see
    /// [`crate::ClockOffset::frame_ms`]). `start_unix_ms − frame_ms` is the monotonic
    /// start, which a step of the wall clock does not move.
    pub frame_ms: i64,
}
