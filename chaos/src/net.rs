//! Partitions and packet loss with nftables on loopback (root only): a table of our own,
//! deleted on heal and on drop.

use std::io::Write;
use std::process::{Command, Stdio};

/// Why a network fault could not be set.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("nft is not available or not permitted: {0}")]
    Unavailable(String),
}

/// One nftables table, named after our process.
#[derive(Debug)]
pub struct Nft {
    table: String,
}

impl Nft {
    pub fn new(pid: u32) -> Nft {
        Nft {
            table: format!("tenure_chaos_{pid}"),
        }
    }

    fn apply(&self, script: &str) -> Result<(), NetError> {
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| NetError::Unavailable(e.to_string()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .map_err(|e| NetError::Unavailable(e.to_string()))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| NetError::Unavailable(e.to_string()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(NetError::Unavailable(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ))
        }
    }

    /// Drops `percent`% of the gossip datagrams to and from `gossip_port`, and (at 100%)
    /// every inbound data-plane segment to `data_port`: the node hears nobody and nobody
    /// reaches it.
    pub fn cut(&self, (gossip_port, data_port): (u16, u16), percent: u8) -> Result<(), NetError> {
        let verdict = if percent >= 100 {
            "drop".to_owned()
        } else {
            format!("numgen random mod 100 < {percent} drop")
        };
        let mut rules =
            format!("  udp dport {gossip_port} {verdict}\n  udp sport {gossip_port} {verdict}\n");
        if percent >= 100 {
            rules.push_str(&format!("  tcp dport {data_port} drop\n"));
        }
        let script = format!(
            "table inet {t} {{\n chain input {{\n  type filter hook input priority -10; policy accept;\n{rules} }}\n}}\n",
            t = self.table
        );
        self.apply(&script)
    }

    /// Removes every rule.
    pub fn heal(&self) -> Result<(), NetError> {
        self.apply(&format!("delete table inet {}\n", self.table))
    }
}

impl Drop for Nft {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .stderr(Stdio::null())
            .status();
    }
}
