#!/usr/bin/env bash
# CI for node-ebpf's C side: install the pinned BPF toolchain (idempotent, quiet) and check
# that the committed bpf/flows.bpf.o is exactly what bpf/flows.bpf.c builds to.
# Rust-side checks (fmt, clippy, tests) run with the rest of the workspace.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

need=()
command -v clang-14 >/dev/null 2>&1 || need+=(clang-14)
command -v llvm-strip-14 >/dev/null 2>&1 || need+=(llvm-14)
[ -f /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
if [ "${#need[@]}" -gt 0 ]; then
	sudo=""
	[ "$(id -u)" -eq 0 ] || sudo="sudo"
	export DEBIAN_FRONTEND=noninteractive
	$sudo apt-get update -qq >/dev/null
	$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

"$here/bpf/build.sh" --check
