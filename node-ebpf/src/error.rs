//! Everything that can go wrong while capturing, each variant saying what to do about it.

use std::io;

/// An error from [`crate::Capture`] or [`crate::check_privileges`]. A variant with a
/// cause returns it from `source()` and leaves it out of its message: show the whole
/// chain (anyhow's `{:#}`).
///
/// Variants raised by [`crate::Capture::load`] mean nothing stays loaded: the programs
/// and maps created so far are released when the error is returned.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The process lacks the capabilities to load eBPF. Nothing was loaded.
    #[error(
        "loading the flow capture needs root, or CAP_BPF and CAP_PERFMON; this process \
         (effective uid {euid}) lacks {missing}. Run as root, or grant them with \
         `setcap cap_bpf,cap_perfmon+ep <binary>`"
    )]
    NotPrivileged {
        /// The effective user id.
        euid: u32,
        /// The missing capabilities, for example `CAP_BPF and CAP_PERFMON`.
        missing: String,
    },

    /// The process's own capabilities could not be read (`capget` failed).
    #[error("could not read this process's capabilities")]
    CapabilityQuery {
        /// The `capget` failure.
        #[source]
        source: io::Error,
    },

    /// The kernel exposes no BTF, which CO-RE needs. Nothing was loaded.
    #[error(
        "the flow capture needs a kernel built with CONFIG_DEBUG_INFO_BTF=y, and its BTF at \
         /sys/kernel/btf/vmlinux is missing or unreadable"
    )]
    NoBtf {
        /// Why the BTF could not be read or parsed.
        #[source]
        source: aya::BtfError,
    },

    /// The kernel verifier refused a program. This is a bug in `bpf/flows.bpf.c` or a
    /// kernel this object was never tested on; the log says which instruction.
    #[error(
        "the kernel verifier rejected eBPF program `{program}`; verifier log:\n{verifier_log}\n\
         the BPF_PROG_LOAD syscall failed"
    )]
    VerifierRejected {
        /// The program's name in the object.
        program: &'static str,
        /// The `BPF_PROG_LOAD` failure.
        #[source]
        source: io::Error,
        /// The verifier's log, without a trailing newline.
        verifier_log: String,
    },

    /// Parsing, relocating (CO-RE) or creating the object's maps failed.
    #[error(
        "loading the eBPF object failed (a CO-RE relocation error means the kernel lacks a \
         field the program reads; see bpf/kernel_types.h)"
    )]
    Object {
        /// aya's error.
        #[source]
        source: aya::EbpfError,
    },

    /// A program could not be loaded, attached or run for another reason than the
    /// verifier.
    #[error("eBPF program `{program}` failed")]
    Program {
        /// The program's name in the object.
        program: &'static str,
        /// aya's error.
        #[source]
        source: aya::programs::ProgramError,
    },

    /// The object lacks a program or map the loader expects: the embedded object and the
    /// loader are out of step. Rebuild with `node-ebpf/bpf/build.sh`.
    #[error("the eBPF object has no {kind} `{name}`; rebuild it with node-ebpf/bpf/build.sh")]
    Missing {
        /// `program` or `map`.
        kind: &'static str,
        /// The missing name.
        name: &'static str,
    },

    /// A map operation failed. For updates, entries before the failing one were applied.
    #[error("eBPF map `{map}` failed")]
    Map {
        /// The map's name in the object.
        map: &'static str,
        /// aya's error.
        #[source]
        source: aya::maps::MapError,
    },

    /// A workload table larger than the map. The map was not changed.
    #[error("{given} entries do not fit eBPF map `{map}` (capacity {max}); nothing was changed")]
    TooManyEntries {
        /// The map's name.
        map: &'static str,
        /// Distinct entries given.
        given: usize,
        /// Capacity.
        max: usize,
    },

    /// [`crate::CaptureOptions::births_max`] is not a power of two within its bounds.
    /// Nothing was loaded.
    #[error("births_max = {given} must be a power of two from {min} to {max}")]
    BirthsMax {
        /// The value given.
        given: u32,
        /// The smallest allowed.
        min: u32,
        /// The largest allowed.
        max: u32,
    },

    /// [`crate::Capture::load`] ran outside a tokio runtime; the ring buffer is read
    /// through tokio's reactor. Nothing stays loaded.
    #[error("Capture::load must be called from within a tokio runtime (it registers the ring buffer with the reactor)")]
    NoRuntime,

    /// Waiting on or reading the ring buffer or the snapshot stream failed.
    #[error("{what} failed")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The failure.
        #[source]
        source: io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::CaptureError;

    /// The cause comes once, after the message: the verifier's log, then why the syscall
    /// failed.
    #[test]
    fn a_verifier_rejection_reads_log_then_cause() {
        let error = CaptureError::VerifierRejected {
            program: "flows",
            source: std::io::Error::from_raw_os_error(13),
            verifier_log: "0: (b7) r0 = 0\n1: (95) exit".to_owned(),
        };
        let cause = std::io::Error::from_raw_os_error(13).to_string();
        assert_eq!(
            format!("{:#}", anyhow::Error::new(error)),
            format!(
                "the kernel verifier rejected eBPF program `flows`; verifier log:\n\
                 0: (b7) r0 = 0\n1: (95) exit\nthe BPF_PROG_LOAD syscall failed: {cause}"
            )
        );
    }
}
