#!/bin/sh
# tests/bench/neon_instructions.sh: instructions per byte of ChaCha20-Poly1305
# seal, portable path against NEON path, on aarch64 and armv7 under qemu-user
# (a benchmark, not a test).
#
#   tests/bench/neon_instructions.sh [BYTES]      (default 16384)
#
# qemu runs one instruction per translation block (-singlestep) and logs every
# block it executes (-d nochain,exec); the count for BYTES minus the count for
# an empty message is the cost of the bytes.  These are instructions retired
# on an emulator, not cycles: a NEON instruction does four lanes of work but
# may take more than one cycle.  Last line: JSON.
set -eu

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SRC=$ROOT/native
BYTES=${1:-16384}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

cat >"$WORK/seal.c" <<'EOF'
#include <stdlib.h>
#include "meshbox_crypto.h"

static unsigned char buf[1 << 20];

int main(int argc, char **argv)
{
	unsigned char key[32] = {1}, nonce[12] = {2};
	size_t n = argc > 2 ? (size_t)atol(argv[2]) : 0;

	if (argc < 3 || n + 16 > sizeof buf)
		return 2;
	mb_use_neon(atoi(argv[1]));
	return mb_aead_seal(buf, key, nonce, 0, 0, buf, n);
}
EOF

count() { # qemu binary args...
	"$@" 2>/dev/null | grep -c '^Trace' || true
}

json=""
for arch in aarch64 armv7; do
	case $arch in
	aarch64) cc=aarch64-linux-gnu-gcc; qemu=qemu-aarch64-static; flags="" ;;
	armv7) cc=arm-linux-gnueabihf-gcc; qemu=qemu-arm-static
		flags="-march=armv7-a -mfloat-abi=hard -mfpu=vfpv3-d16" ;;
	esac
	if ! command -v "$cc" >/dev/null || ! command -v "$qemu" >/dev/null; then
		echo "$arch: $cc or $qemu missing (apt-get install gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf qemu-user-static)"
		continue
	fi
	common="-std=c99 -O3 -ffreestanding -fno-builtin -fno-tree-loop-distribute-patterns -DMB_WITH_NEON $flags"
	# shellcheck disable=SC2086
	$cc $common -c "$SRC/meshbox_crypto.c" -o "$WORK/m.o"
	neon=""; [ "$arch" = armv7 ] && neon=-mfpu=neon
	# shellcheck disable=SC2086
	$cc $common $neon -c "$SRC/chacha20_neon.c" -o "$WORK/n.o"
	# shellcheck disable=SC2086
	$cc $flags -O2 -static -I"$SRC" -o "$WORK/seal-$arch" "$WORK/seal.c" "$WORK/m.o" "$WORK/n.o"
	for path in 0 1; do
		base=$(count $qemu -singlestep -d nochain,exec -D /dev/stdout "$WORK/seal-$arch" $path 0)
		full=$(count $qemu -singlestep -d nochain,exec -D /dev/stdout "$WORK/seal-$arch" $path "$BYTES")
		per=$(awk -v a="$full" -v b="$base" -v n="$BYTES" 'BEGIN { printf "%.2f", (a - b) / n }')
		label=$([ $path = 1 ] && echo neon || echo portable)
		echo "$arch $label: $per instructions/byte ($BYTES-byte seal)"
		json="$json${json:+, }\"$arch/$label\": $per"
	done
done
echo "{\"bytes\": $BYTES, \"instructions_per_byte\": {$json}}"
