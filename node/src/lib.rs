//! The tenure node: the sans-io [`core`] composing attribution and cluster, the tokio
//! [`shell`] around it, the collector and exporter roles, sinks, HTTP, the service-map
//! page ([`ui`]) and the demo.
//!
//! Architecture invariant: nothing in [`core`], [`exporter::batcher`] or [`fleet`] reads a
//! clock, touches a socket or draws OS randomness; the shell reads the clock in one place
//! (`shell::clock`).

pub mod config;
pub mod core;
pub mod demo;
pub mod deps;
pub mod exporter;
pub mod fleet;
pub mod httpc;
pub mod journal;
pub mod listening;
pub mod loadgen;
pub mod registry;
pub mod report;
pub mod shell;
pub mod sink;
pub mod time;
pub mod ui;
