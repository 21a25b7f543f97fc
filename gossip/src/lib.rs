//! The cluster layer of tenure, as sans-io state machines: region-aware SWIM membership
//! (foca), the hash ring, routing of claims and flows, handoff of ranges, and the sealed
//! wire format. Inputs (datagrams, frames, timer events) carry the current time; outputs
//! are datagrams and frames to send, timers to set and notifications. No tokio here.

// Wire format: framing, messages, sealing.
pub mod frame;
pub mod seal;
pub mod wire;

// Membership, ring, routing, handoff.
pub mod directory;
pub mod handoff;
pub mod identity;
pub mod membership;
pub mod ring;
pub mod route;
