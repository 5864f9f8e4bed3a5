#!/usr/bin/env bash
# Build both releases of the shoal-node example firmware.
#
#   build.sh OUTDIR
#
# Produces OUTDIR/fw-v1.{bin,hex} and OUTDIR/fw-v2.{bin,hex}. The image is
# freestanding (own startup, libc subset and printf), so only the compiler
# and libgcc are needed; no newlib install is required.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi

CROSS=${CROSS:-arm-none-eabi-}
CC="${CROSS}gcc"
OBJCOPY="${CROSS}objcopy"
SIZE="${CROSS}size"

if ! command -v "$CC" >/dev/null 2>&1; then
    echo "error: $CC not found (install gcc-arm-none-eabi)" >&2
    exit 1
fi
if ! command -v "$OBJCOPY" >/dev/null 2>&1; then
    echo "error: $OBJCOPY not found (install binutils-arm-none-eabi)" >&2
    exit 1
fi

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/shoal-fw.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

CFLAGS=(
    -mcpu=cortex-m4 -mthumb -mfloat-abi=soft
    -std=c11 -Os -g0
    -ffreestanding -fno-common -fno-builtin-printf
    -ffunction-sections -fdata-sections
    -fno-tree-loop-distribute-patterns
    -Wall -Wextra -Werror=implicit-function-declaration
    -I"$HERE/src"
)
LDFLAGS=(
    -mcpu=cortex-m4 -mthumb -mfloat-abi=soft
    -nostdlib -nostartfiles
    -T"$HERE/linker.ld"
    -Wl,--gc-sections -Wl,--build-id=none
)

SOURCES=(
    startup.c fw_header.c main.c board.c sched.c uart.c ringbuf.c
    fmt.c fwlib.c log.c crc.c filter.c sensor.c config.c telemetry.c dfu.c twim.c humidity.c evlog.c wallclock.c cli.c
)

for minor in 1 2; do
    objdir="$WORK/v$minor"
    mkdir -p "$objdir"
    objs=()
    for src in "${SOURCES[@]}"; do
        obj="$objdir/${src%.c}.o"
        "$CC" "${CFLAGS[@]}" -DFW_VERSION_MINOR="$minor" -c "$HERE/src/$src" -o "$obj"
        objs+=("$obj")
    done
    elf="$objdir/fw-v$minor.elf"
    "$CC" "${LDFLAGS[@]}" "${objs[@]}" -lgcc -Wl,-Map="$objdir/fw-v$minor.map" -o "$elf"
    "$OBJCOPY" -O binary "$elf" "$OUT/fw-v$minor.bin"
    "$OBJCOPY" -O ihex "$elf" "$OUT/fw-v$minor.hex"
    if command -v "$SIZE" >/dev/null 2>&1; then
        "$SIZE" "$elf" | sed -n 2p | awk -v v="v$minor" \
            '{ printf "fw-%s: text=%s data=%s bss=%s\n", v, $1, $2, $3 }'
    fi
done

for minor in 1 2; do
    printf 'wrote %s (%s bytes)\n' "$OUT/fw-v$minor.bin" "$(wc -c < "$OUT/fw-v$minor.bin")"
done
