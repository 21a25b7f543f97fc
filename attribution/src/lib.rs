//! Ownership ranges per IP, learned from heartbeats, and the attribution of flows by them.
//!
//! This crate is a sans-io library: it never reads a clock, never does IO and never draws
//! randomness. Every operation takes the current time as an argument.

pub mod region;
pub mod snapshot;
pub mod time;

pub use region::{Locate, RegionError, RegionMap};
pub use snapshot::{IpRanges, SegmentOwner, SegmentSnapshot};
pub use time::{UnixMillis, Window};
