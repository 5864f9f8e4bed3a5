/*
 * fmt.c - small printf engine.
 */
#include "fmt.h"
#include "fwlib.h"

#include <stdbool.h>

enum {
    FLAG_LEFT  = 1u << 0,
    FLAG_ZERO  = 1u << 1,
    FLAG_PLUS  = 1u << 2,
    FLAG_SPACE = 1u << 3,
    FLAG_ALT   = 1u << 4,
    FLAG_UPPER = 1u << 5,
    FLAG_PREC  = 1u << 6,
};

enum length_mod {
    LEN_DEFAULT,
    LEN_CHAR,
    LEN_SHORT,
    LEN_LONG,
    LEN_LLONG,
    LEN_SIZE,
};

typedef struct {
    fmt_sink_fn sink;
    void *ctx;
    int count;
} out_t;

static void out_char(out_t *o, char c)
{
    o->sink(o->ctx, c);
    o->count++;
}

static void out_repeat(out_t *o, char c, int n)
{
    while (n-- > 0) {
        out_char(o, c);
    }
}

static void out_string(out_t *o, const char *s, unsigned flags, int width, int prec)
{
    int len;

    if (s == NULL) {
        s = "(null)";
    }
    len = (int)((flags & FLAG_PREC) ? strnlen(s, (size_t)prec) : strlen(s));
    if (!(flags & FLAG_LEFT)) {
        out_repeat(o, ' ', width - len);
    }
    for (int i = 0; i < len; i++) {
        out_char(o, s[i]);
    }
    if (flags & FLAG_LEFT) {
        out_repeat(o, ' ', width - len);
    }
}

static void out_number(out_t *o, uint64_t value, bool negative, unsigned base,
                       unsigned flags, int width, int prec)
{
    static const char lower[] = "0123456789abcdef";
    static const char upper[] = "0123456789ABCDEF";
    const char *digits = (flags & FLAG_UPPER) ? upper : lower;
    char tmp[66];
    int ndigits = 0;
    char sign = '\0';
    const char *prefix = "";
    int prefix_len = 0;

    /* 32-bit values take the fast path; 64-bit division is expensive. */
    if (value <= UINT32_MAX) {
        uint32_t v = (uint32_t)value;
        do {
            tmp[ndigits++] = digits[v % base];
            v /= base;
        } while (v != 0u);
    } else {
        do {
            tmp[ndigits++] = digits[value % base];
            value /= base;
        } while (value != 0u);
    }
    if ((flags & FLAG_PREC) && prec == 0 && ndigits == 1 && tmp[0] == '0') {
        ndigits = 0; /* "%.0d" of zero prints nothing */
    }

    if (negative) {
        sign = '-';
    } else if (flags & FLAG_PLUS) {
        sign = '+';
    } else if (flags & FLAG_SPACE) {
        sign = ' ';
    }
    if ((flags & FLAG_ALT) && ndigits > 0) {
        if (base == 16u) {
            prefix = (flags & FLAG_UPPER) ? "0X" : "0x";
            prefix_len = 2;
        } else if (base == 8u && tmp[ndigits - 1] != '0') {
            prefix = "0";
            prefix_len = 1;
        } else if (base == 2u) {
            prefix = "0b";
            prefix_len = 2;
        }
    }

    int zeros = (flags & FLAG_PREC) ? prec - ndigits : 0;
    if (zeros < 0) {
        zeros = 0;
    }
    int total = ndigits + zeros + prefix_len + (sign != '\0' ? 1 : 0);
    int pad = width - total;

    if ((flags & FLAG_ZERO) && !(flags & (FLAG_LEFT | FLAG_PREC)) && pad > 0) {
        zeros += pad;
        pad = 0;
    }
    if (!(flags & FLAG_LEFT)) {
        out_repeat(o, ' ', pad);
    }
    if (sign != '\0') {
        out_char(o, sign);
    }
    for (int i = 0; i < prefix_len; i++) {
        out_char(o, prefix[i]);
    }
    out_repeat(o, '0', zeros);
    while (ndigits > 0) {
        out_char(o, tmp[--ndigits]);
    }
    if (flags & FLAG_LEFT) {
        out_repeat(o, ' ', pad);
    }
}

static uint64_t fetch_unsigned(va_list *ap, enum length_mod len)
{
    switch (len) {
    case LEN_CHAR:  return (uint8_t)va_arg(*ap, unsigned int);
    case LEN_SHORT: return (uint16_t)va_arg(*ap, unsigned int);
    case LEN_LONG:  return va_arg(*ap, unsigned long);
    case LEN_LLONG: return va_arg(*ap, unsigned long long);
    case LEN_SIZE:  return va_arg(*ap, size_t);
    case LEN_DEFAULT:
    default:        return va_arg(*ap, unsigned int);
    }
}

static int64_t fetch_signed(va_list *ap, enum length_mod len)
{
    switch (len) {
    case LEN_CHAR:  return (int8_t)va_arg(*ap, int);
    case LEN_SHORT: return (int16_t)va_arg(*ap, int);
    case LEN_LONG:  return va_arg(*ap, long);
    case LEN_LLONG: return va_arg(*ap, long long);
    case LEN_SIZE:  return (int64_t)va_arg(*ap, size_t);
    case LEN_DEFAULT:
    default:        return va_arg(*ap, int);
    }
}

int fmt_vformat(fmt_sink_fn sink, void *ctx, const char *fmt, va_list ap_in)
{
    out_t o = { .sink = sink, .ctx = ctx, .count = 0 };
    va_list ap;

    va_copy(ap, ap_in);
    while (*fmt != '\0') {
        if (*fmt != '%') {
            out_char(&o, *fmt++);
            continue;
        }
        fmt++;

        unsigned flags = 0;
        for (;; fmt++) {
            if (*fmt == '-') {
                flags |= FLAG_LEFT;
            } else if (*fmt == '0') {
                flags |= FLAG_ZERO;
            } else if (*fmt == '+') {
                flags |= FLAG_PLUS;
            } else if (*fmt == ' ') {
                flags |= FLAG_SPACE;
            } else if (*fmt == '#') {
                flags |= FLAG_ALT;
            } else {
                break;
            }
        }

        int width = 0;
        if (*fmt == '*') {
            width = va_arg(ap, int);
            if (width < 0) {
                flags |= FLAG_LEFT;
                width = -width;
            }
            fmt++;
        } else {
            while (fw_isdigit(*fmt)) {
                width = width * 10 + (*fmt++ - '0');
            }
        }

        int prec = 0;
        if (*fmt == '.') {
            flags |= FLAG_PREC;
            fmt++;
            if (*fmt == '*') {
                prec = va_arg(ap, int);
                if (prec < 0) {
                    flags &= ~(unsigned)FLAG_PREC;
                    prec = 0;
                }
                fmt++;
            } else {
                while (fw_isdigit(*fmt)) {
                    prec = prec * 10 + (*fmt++ - '0');
                }
            }
        }

        enum length_mod len = LEN_DEFAULT;
        if (*fmt == 'h') {
            fmt++;
            len = LEN_SHORT;
            if (*fmt == 'h') {
                fmt++;
                len = LEN_CHAR;
            }
        } else if (*fmt == 'l') {
            fmt++;
            len = LEN_LONG;
            if (*fmt == 'l') {
                fmt++;
                len = LEN_LLONG;
            }
        } else if (*fmt == 'z') {
            fmt++;
            len = LEN_SIZE;
        }

        char conv = *fmt;
        if (conv == '\0') {
            break;
        }
        fmt++;

        switch (conv) {
        case 'd':
        case 'i': {
            int64_t v = fetch_signed(&ap, len);
            bool neg = v < 0;
            uint64_t mag = neg ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
            out_number(&o, mag, neg, 10u, flags, width, prec);
            break;
        }
        case 'u':
            out_number(&o, fetch_unsigned(&ap, len), false, 10u, flags, width, prec);
            break;
        case 'X':
            flags |= FLAG_UPPER;
            out_number(&o, fetch_unsigned(&ap, len), false, 16u, flags, width, prec);
            break;
        case 'x':
            out_number(&o, fetch_unsigned(&ap, len), false, 16u, flags, width, prec);
            break;
        case 'o':
            out_number(&o, fetch_unsigned(&ap, len), false, 8u, flags, width, prec);
            break;
        case 'b':
            out_number(&o, fetch_unsigned(&ap, len), false, 2u, flags, width, prec);
            break;
        case 'p':
            flags |= FLAG_ALT | FLAG_PREC;
            out_number(&o, (uintptr_t)va_arg(ap, void *), false, 16u, flags,
                       width, 8);
            break;
        case 'c': {
            char c = (char)va_arg(ap, int);
            if (!(flags & FLAG_LEFT)) {
                out_repeat(&o, ' ', width - 1);
            }
            out_char(&o, c);
            if (flags & FLAG_LEFT) {
                out_repeat(&o, ' ', width - 1);
            }
            break;
        }
        case 's':
            out_string(&o, va_arg(ap, const char *), flags, width, prec);
            break;
        case '%':
            out_char(&o, '%');
            break;
        default:
            /* Unknown conversion: echo it so the mistake is visible. */
            out_char(&o, '%');
            out_char(&o, conv);
            break;
        }
    }
    va_end(ap);
    return o.count;
}

typedef struct {
    char *buf;
    size_t size;
    size_t pos;
} buf_sink_t;

static void buf_sink(void *ctx, char c)
{
    buf_sink_t *b = ctx;
    if (b->pos + 1u < b->size) {
        b->buf[b->pos] = c;
    }
    b->pos++;
}

int fw_vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
    buf_sink_t b = { .buf = buf, .size = size, .pos = 0 };
    int n = fmt_vformat(buf_sink, &b, fmt, ap);

    if (size > 0u) {
        buf[(b.pos < size) ? b.pos : size - 1u] = '\0';
    }
    return n;
}

int fw_snprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = fw_vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n;
}

int fmt_fixed(char *buf, size_t size, int32_t scaled, unsigned decimals)
{
    uint32_t div = 1u;
    uint32_t mag;
    const char *sign = "";

    for (unsigned i = 0; i < decimals; i++) {
        div *= 10u;
    }
    if (scaled < 0) {
        sign = "-";
        mag = (uint32_t)0 - (uint32_t)scaled;
    } else {
        mag = (uint32_t)scaled;
    }
    if (decimals == 0u) {
        return fw_snprintf(buf, size, "%s%lu", sign, (unsigned long)mag);
    }
    return fw_snprintf(buf, size, "%s%lu.%0*lu", sign, (unsigned long)(mag / div),
                       (int)decimals, (unsigned long)(mag % div));
}

static void sink_str(fmt_sink_fn sink, void *ctx, const char *s)
{
    while (*s != '\0') {
        sink(ctx, *s++);
    }
}

void fmt_hexdump(fmt_sink_fn sink, void *ctx, uint32_t base_addr,
                 const uint8_t *data, size_t len)
{
    char line[80];

    for (size_t off = 0; off < len; off += 16u) {
        size_t n = len - off;
        size_t pos;

        if (n > 16u) {
            n = 16u;
        }
        pos = (size_t)fw_snprintf(line, sizeof(line), "%08lx: ",
                                  (unsigned long)(base_addr + off));
        for (size_t i = 0; i < 16u; i++) {
            if (i < n) {
                pos += (size_t)fw_snprintf(line + pos, sizeof(line) - pos, "%02x ",
                                           data[off + i]);
            } else {
                pos += (size_t)fw_snprintf(line + pos, sizeof(line) - pos, "   ");
            }
            if (i == 7u) {
                line[pos++] = ' ';
            }
        }
        line[pos++] = '|';
        for (size_t i = 0; i < n; i++) {
            char c = (char)data[off + i];
            line[pos++] = fw_isprint(c) ? c : '.';
        }
        line[pos++] = '|';
        line[pos] = '\0';
        sink_str(sink, ctx, line);
        sink_str(sink, ctx, "\r\n");
    }
}
