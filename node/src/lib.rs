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
pub mod report;
pub mod shell;
pub mod sink;
pub mod time;
pub mod ui;

/// `error` and its causes on one line, for a person: `outer: cause: cause`. A cause whose
/// text the line already ends with is left out: several of our error types put their
/// source in their own message too (`reading x.toml: No such file…`), which anyhow's
/// `{:#}` would print twice.
pub fn error_report(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::error_report;
    use anyhow::Context as _;

    #[derive(Debug, thiserror::Error)]
    #[error("reading x.toml: {source}")]
    struct Read {
        source: std::io::Error,
    }

    #[test]
    fn an_error_report_names_each_cause_once() {
        let missing = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let embedded = Err::<(), _>(Read { source: missing() }).context("starting");
        assert_eq!(
            error_report(&embedded.unwrap_err()),
            "starting: reading x.toml: no such file"
        );
        let chained = Err::<(), _>(missing())
            .context("reading y.toml")
            .context("starting");
        assert_eq!(
            error_report(&chained.unwrap_err()),
            "starting: reading y.toml: no such file"
        );
    }
}
