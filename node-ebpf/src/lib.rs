//! Per-host TCP flow capture for tenure: a CO-RE eBPF program (C, `bpf/flows.bpf.c`)
//! and its aya loader.
//!
//! The kernel program notes each TCP socket's birth on the BTF tracepoint
//! `inet_sock_set_state` and emits one record through a ring buffer when
//! the socket closes; an `iter/tcp` program snapshots live sockets so long-lived flows can be
//! reported every heartbeat. The exporter role consumes this API:
//!
//! ```no_run
//! # async fn run() -> Result<(), tenure_node_ebpf::CaptureError> {
//! use tenure_node_ebpf::{check_privileges, Capture, CaptureOptions};
//!
//! check_privileges()?; // fail early with a useful message
//! let mut capture = Capture::load(CaptureOptions::default())?; // inside a tokio runtime
//! capture.set_workloads(&[("10.0.0.5".parse().unwrap(), 17)])?;
//! let closed = capture.next_batch().await?; // closed flows, as they come
//! let live = capture.snapshot()?; // ongoing flows, once per heartbeat
//! # let _ = (closed, live);
//! # Ok(()) }
//! ```
//!
//! - [`check_privileges`]`() -> Result<(), CaptureError>`
//! - [`Capture::load`]`(CaptureOptions) -> Result<Capture, CaptureError>`
//! - [`Capture::next_batch`]`(&mut self) -> impl Future<Output = Result<Vec<CapturedFlow>, CaptureError>>`
//! - [`Capture::snapshot`]`(&mut self) -> Result<Vec<CapturedFlow>, CaptureError>`
//! - [`Capture::set_workloads`]`(&mut self, &[(IpAddr, u32)]) -> Result<(), CaptureError>`
//! - [`Capture::set_port_workloads`]`(&mut self, &[(SocketAddr, u32)]) -> Result<(), CaptureError>`
//! - [`Capture::stats`]`(&self) -> Result<CaptureStats, CaptureError>`
//!
//! Code map: `kernel` is the only module that talks to the kernel; `record` (the shared
//! record layout and its decoding), `clock` (monotonic to Unix time), `workload` (map
//! replacement plans) and `privilege`'s decision are pure and tested without root.
//!
//! Limits: snapshots cover the network namespace the loader runs in (the kernel's tcp
//! iterator is per namespace); closed flows are captured in every namespace.

mod clock;
mod error;
mod flow;
mod kernel;
mod privilege;
pub mod record;
mod workload;

pub use clock::ClockOffset;
pub use error::CaptureError;
pub use flow::{CapturedFlow, Direction};
pub use kernel::{
    Capture, CaptureOptions, CaptureStats, BIRTHS_MAX, BIRTHS_MIN, WORKLOAD_ENTRIES_MAX,
};
pub use privilege::check_privileges;
