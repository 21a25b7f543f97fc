//! Showing an error to a person: its message and every cause behind it, on one line.
//!
//! An error type of ours either prints its cause or returns it from `source()`, never
//! both, so an error's own message can leave the reason out. The binaries print
//! `anyhow::Error`s with `{:#}`; [`Chain`] prints the same for any error, for log fields
//! (tracing's JSON formatter prints a field's message only), HTTP answers and panics.

use std::error::Error;
use std::fmt;

/// Displays an error and its causes as `message: cause: cause`, walking `source()`: what
/// anyhow's `{:#}` prints. In a log field: `error = %Chain(&e)`; for an `anyhow::Error`,
/// `Chain(&*e)`.
#[derive(Clone, Copy, Debug)]
pub struct Chain<'a>(pub &'a dyn Error);

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::path::Path;

    use anyhow::Context as _;

    use super::Chain;
    use crate::config::{self, CollectorConfig};

    #[derive(Debug, thiserror::Error)]
    #[error("framing")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("reading x.toml")]
    struct Middle(#[source] io::Error);

    fn missing() -> io::Error {
        io::Error::new(io::ErrorKind::NotFound, "no such file")
    }

    #[test]
    fn a_chain_names_every_cause_once_in_order() {
        assert_eq!(
            Chain(&Outer(Middle(missing()))).to_string(),
            "framing: reading x.toml: no such file"
        );
        assert_eq!(Chain(&missing()).to_string(), "no such file");
    }

    #[test]
    fn a_chain_prints_what_anyhow_prints() {
        let error = Err::<(), _>(Outer(Middle(missing())))
            .context("starting")
            .unwrap_err();
        assert_eq!(Chain(&*error).to_string(), format!("{error:#}"));
        assert_eq!(
            Chain(&*error).to_string(),
            "starting: framing: reading x.toml: no such file"
        );
    }

    /// What `tenure collector --config <missing file>` prints after `tenure: `: the path
    /// and the OS's reason, each once.
    #[test]
    fn a_config_read_error_names_each_cause_once() {
        let path = Path::new("/nonexistent/tenure-report-test.toml");
        let reason = match std::fs::read(path) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{} exists", path.display()),
        };
        let error = config::load::<CollectorConfig>(path).unwrap_err();
        let expected = format!("reading {}: {reason}", path.display());
        assert_eq!(Chain(&error).to_string(), expected);
        let shown = format!("{:#}", anyhow::Error::from(error));
        assert_eq!(shown, expected);
        assert_eq!(shown.matches(&reason).count(), 1, "{shown}");
    }
}
