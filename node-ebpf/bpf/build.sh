#!/usr/bin/env bash
# Rebuilds bpf/flows.bpf.o, the committed object that the crate embeds, byte for byte.
#
#   node-ebpf/bpf/build.sh           rebuild and replace the committed object
#   node-ebpf/bpf/build.sh --check   rebuild into a temp dir; exit 1 if the committed
#                                    object differs (stale, or built by another toolchain)
#
# Needs clang-14 and llvm-strip-14 and libbpf's headers (Debian: clang-14 llvm-14
# libbpf-dev). The output is reproducible because the compiler, the headers and the
# source paths recorded in the object are all fixed: paths are rewritten to "." with
# -fdebug-prefix-map, and the DWARF is stripped while .BTF/.BTF.ext stay, because aya needs
# them for CO-RE relocations and map definitions.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CLANG="${CLANG:-clang-14}"
STRIP="${LLVM_STRIP:-llvm-strip-14}"

for tool in "$CLANG" "$STRIP"; do
	if ! command -v "$tool" >/dev/null 2>&1; then
		echo "build.sh: $tool not found; install it with: apt-get install -y clang-14 llvm-14 libbpf-dev" >&2
		exit 2
	fi
done
if [ ! -f /usr/include/bpf/bpf_helpers.h ]; then
	echo "build.sh: libbpf headers not found; install them with: apt-get install -y libbpf-dev" >&2
	exit 2
fi

build() {
	local out="$1"
	# Compile from inside bpf/ with relative paths so nothing machine-specific is recorded.
	(
		cd "$here"
		"$CLANG" -O2 -g -target bpf -mcpu=v3 -Wall -Werror \
			-fdebug-prefix-map="$here"=. \
			-fdebug-compilation-dir=. \
			-c flows.bpf.c -o "$out"
	)
	"$STRIP" -g "$out"
}

case "${1:-}" in
--check)
	tmp="$(mktemp -d)"
	trap 'rm -rf "$tmp"' EXIT
	build "$tmp/flows.bpf.o"
	if cmp -s "$tmp/flows.bpf.o" "$here/flows.bpf.o"; then
		echo "build.sh --check: bpf/flows.bpf.o is up to date"
	else
		echo "build.sh --check: bpf/flows.bpf.o is stale or not reproducible;" \
			"run node-ebpf/bpf/build.sh and commit the result" >&2
		exit 1
	fi
	;;
"")
	build "$here/flows.bpf.o"
	echo "build.sh: wrote $here/flows.bpf.o"
	;;
*)
	echo "usage: $0 [--check]" >&2
	exit 2
	;;
esac
