//! The `LISTENING` line: what `tenure collector` prints on standard output once its
//! sockets are bound (ports chosen by the kernel included), and how a program that started
//! one reads it back. The load generator, the chaos harness and the process tests all
//! start collectors this way.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::Child;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Context as _;

use crate::shell::collector::Bound;

/// The addresses a collector listens on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listening {
    pub gossip: SocketAddr,
    pub data: SocketAddr,
    pub http: SocketAddr,
}

impl Listening {
    /// The line a collector bound as `bound` prints.
    pub fn line(bound: &Bound) -> String {
        format!(
            "LISTENING node={} region={} gossip={} data={} http={}",
            bound.node_id, bound.region, bound.gossip_addr, bound.data_addr, bound.http_addr
        )
    }

    /// The addresses in a line [`Listening::line`] wrote.
    pub fn parse(line: &str) -> anyhow::Result<Listening> {
        let field = |name: &str| -> anyhow::Result<SocketAddr> {
            let prefix = format!("{name}=");
            line.strip_prefix("LISTENING ")
                .and_then(|rest| {
                    rest.split_whitespace()
                        .find_map(|w| w.strip_prefix(&prefix))
                })
                .with_context(|| format!("no {name} address in {line:?}"))?
                .parse()
                .with_context(|| format!("the {name} address in {line:?}"))
        };
        Ok(Listening {
            gossip: field("gossip")?,
            data: field("data")?,
            http: field("http")?,
        })
    }

    /// Waits up to `timeout` for the first line `child` prints on its standard output
    /// (which must be piped) and reads the addresses from it. The rest of its output is
    /// read and dropped on a thread until it exits, so that it never blocks writing. When
    /// no address comes, the child is killed and reaped.
    pub fn wait(child: &mut Child, timeout: Duration) -> anyhow::Result<Listening> {
        let read = Self::wait_for_line(child, timeout).and_then(|line| Self::parse(&line));
        if let Err(e) = read {
            // Its exit status, when it ended by itself, says why.
            let exited = child.try_wait().ok().flatten();
            let _ = child.kill();
            let _ = child.wait();
            return Err(match exited {
                Some(status) => e.context(format!("the collector exited ({status})")),
                None => e,
            });
        }
        read
    }

    fn wait_for_line(child: &mut Child, timeout: Duration) -> anyhow::Result<String> {
        let stdout = child
            .stdout
            .take()
            .context("the collector's standard output is not piped")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // Once the first line is taken nobody listens; reading goes on regardless.
                let _ = tx.send(line);
            }
        });
        match rx.recv_timeout(timeout) {
            Ok(line) => Ok(line),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                anyhow::bail!("no LISTENING line within {} ms", timeout.as_millis())
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                anyhow::bail!("its standard output closed before a LISTENING line")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_printed_line_reads_back() {
        let bound = Bound {
            node_id: "n1".to_owned(),
            region: "eu".to_owned(),
            gossip_addr: "127.0.0.1:7001".parse().unwrap(),
            data_addr: "[::1]:7002".parse().unwrap(),
            http_addr: "127.0.0.1:7003".parse().unwrap(),
        };
        let read = Listening::parse(&Listening::line(&bound)).unwrap();
        assert_eq!(
            read,
            Listening {
                gossip: bound.gossip_addr,
                data: bound.data_addr,
                http: bound.http_addr,
            }
        );
    }

    #[test]
    fn a_line_without_an_address_says_which() {
        let e =
            Listening::parse("LISTENING node=n1 gossip=127.0.0.1:1 data=127.0.0.1:2").unwrap_err();
        assert!(format!("{e:#}").contains("no http address"), "{e:#}");
        let e = Listening::parse("LISTENING gossip=127.0.0.1:1 data=nowhere http=127.0.0.1:3")
            .unwrap_err();
        assert!(format!("{e:#}").contains("the data address"), "{e:#}");
        assert!(Listening::parse("starting gossip=127.0.0.1:1").is_err());
    }

    #[test]
    fn a_child_that_exits_without_listening_is_an_error() {
        let mut child = std::process::Command::new("true")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let e = Listening::wait(&mut child, Duration::from_secs(20)).unwrap_err();
        assert!(
            format!("{e:#}").contains("closed before a LISTENING line"),
            "{e:#}"
        );
    }
}
