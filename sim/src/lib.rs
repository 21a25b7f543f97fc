//! `tenure-sim`: a deterministic simulator of a tenure fleet and cluster.
//!
//! It runs the very [`tenure_node::core::NodeCore`] state machines the real collectors
//! run, and the exporters' real sans-io batch buffer, on a simulated network (delay, loss,
//! duplication, reordering, partitions), simulated clocks (skew and jumps within the
//! margin) and a simulated fleet whose IPs are reused quickly. Every message between
//! nodes and from exporters is encoded, sealed, framed, opened and validated as on a real
//! socket. One `u64` seed determines the whole run; the trace hash proves it.
//!
//! Modules: [`scenario`] (the TOML file), [`fleet`] (fleet and oracle), [`net`] (links
//! and partitions), [`disk`] (the collectors' journals), [`fault`] (swarm-drawn faults), [`world`] (the event loop), [`check`]
//! (truth and invariants), [`runner`] (many seeds, regressions), [`report`] (Markdown and
//! plots).

pub mod check;
pub mod disk;
pub mod fault;
pub mod fleet;
pub mod net;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod world;
