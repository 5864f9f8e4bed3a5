/*
 * fmt.h - bounded printf-style formatting.
 *
 * Supported conversions: %d %i %u %x %X %o %b %c %s %p %%, with the flags
 * '-', '0', '+', ' ', '#', a field width and precision (either may be '*'),
 * and the length modifiers h, hh, l, ll, z. Floating point is deliberately
 * not supported; the firmware works in fixed point throughout.
 */
#ifndef FMT_H
#define FMT_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

typedef void (*fmt_sink_fn)(void *ctx, char c);

/* Core formatter: emits every character through sink, returns the count. */
int fmt_vformat(fmt_sink_fn sink, void *ctx, const char *fmt, va_list ap);

int fw_vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int fw_snprintf(char *buf, size_t size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/*
 * Render a signed fixed-point value with `decimals` fractional digits,
 * given the value already scaled by 10^decimals (e.g. 2345, 2 -> "23.45").
 */
int fmt_fixed(char *buf, size_t size, int32_t scaled, unsigned decimals);

/* Hex dump in the classic "addr: xx xx ..  |ascii|" layout via sink. */
void fmt_hexdump(fmt_sink_fn sink, void *ctx, uint32_t base_addr,
                 const uint8_t *data, size_t len);

#endif /* FMT_H */
