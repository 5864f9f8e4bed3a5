/*
 * fwlib.c - freestanding implementations of string and parsing helpers.
 */
#include "fwlib.h"

void *memcpy(void *dst, const void *src, size_t n)
{
    uint8_t *d = dst;
    const uint8_t *s = src;

    /* Word copy when both pointers share alignment; the common case for
     * struct copies and DMA buffers. */
    if ((((uintptr_t)d ^ (uintptr_t)s) & 3u) == 0u) {
        while (n > 0u && ((uintptr_t)d & 3u) != 0u) {
            *d++ = *s++;
            n--;
        }
        uint32_t *dw = (uint32_t *)(void *)d;
        const uint32_t *sw = (const uint32_t *)(const void *)s;
        while (n >= 4u) {
            *dw++ = *sw++;
            n -= 4u;
        }
        d = (uint8_t *)dw;
        s = (const uint8_t *)sw;
    }
    while (n-- > 0u) {
        *d++ = *s++;
    }
    return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
    uint8_t *d = dst;
    const uint8_t *s = src;

    if (d == s || n == 0u) {
        return dst;
    }
    if (d < s || d >= s + n) {
        return memcpy(dst, src, n);
    }
    d += n;
    s += n;
    while (n-- > 0u) {
        *--d = *--s;
    }
    return dst;
}

void *memset(void *dst, int c, size_t n)
{
    uint8_t *d = dst;
    uint8_t b = (uint8_t)c;

    while (n > 0u && ((uintptr_t)d & 3u) != 0u) {
        *d++ = b;
        n--;
    }
    if (n >= 4u) {
        uint32_t w = (uint32_t)b * 0x01010101u;
        uint32_t *dw = (uint32_t *)(void *)d;
        while (n >= 4u) {
            *dw++ = w;
            n -= 4u;
        }
        d = (uint8_t *)dw;
    }
    while (n-- > 0u) {
        *d++ = b;
    }
    return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const uint8_t *pa = a;
    const uint8_t *pb = b;

    for (size_t i = 0; i < n; i++) {
        if (pa[i] != pb[i]) {
            return (int)pa[i] - (int)pb[i];
        }
    }
    return 0;
}

size_t strlen(const char *s)
{
    const char *p = s;
    while (*p != '\0') {
        p++;
    }
    return (size_t)(p - s);
}

size_t strnlen(const char *s, size_t max)
{
    size_t n = 0;
    while (n < max && s[n] != '\0') {
        n++;
    }
    return n;
}

int strcmp(const char *a, const char *b)
{
    while (*a != '\0' && *a == *b) {
        a++;
        b++;
    }
    return (int)(uint8_t)*a - (int)(uint8_t)*b;
}

int strncmp(const char *a, const char *b, size_t n)
{
    for (; n > 0u; n--, a++, b++) {
        if (*a != *b || *a == '\0') {
            return (int)(uint8_t)*a - (int)(uint8_t)*b;
        }
    }
    return 0;
}

char *strchr(const char *s, int c)
{
    char ch = (char)c;
    for (;; s++) {
        if (*s == ch) {
            return (char *)(uintptr_t)s;
        }
        if (*s == '\0') {
            return NULL;
        }
    }
}

size_t fw_strlcpy(char *dst, const char *src, size_t size)
{
    size_t len = strlen(src);

    if (size > 0u) {
        size_t n = (len < size - 1u) ? len : size - 1u;
        memcpy(dst, src, n);
        dst[n] = '\0';
    }
    return len;
}

bool fw_isdigit(char c)  { return c >= '0' && c <= '9'; }
bool fw_isspace(char c)  { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }
bool fw_isprint(char c)  { return c >= 0x20 && c < 0x7F; }

bool fw_isxdigit(char c)
{
    return fw_isdigit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

char fw_tolower(char c)
{
    return (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c;
}

int fw_strcasecmp(const char *a, const char *b)
{
    for (;; a++, b++) {
        char ca = fw_tolower(*a);
        char cb = fw_tolower(*b);
        if (ca != cb || ca == '\0') {
            return (int)(uint8_t)ca - (int)(uint8_t)cb;
        }
    }
}

static int digit_value(char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    c = fw_tolower(c);
    if (c >= 'a' && c <= 'z') {
        return c - 'a' + 10;
    }
    return 99;
}

bool fw_parse_u32(const char *s, uint32_t *out)
{
    uint32_t base = 10u;
    uint32_t value = 0u;

    if (s == NULL || *s == '\0') {
        return false;
    }
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16u;
        s += 2;
    } else if (s[0] == '0' && (s[1] == 'b' || s[1] == 'B')) {
        base = 2u;
        s += 2;
    }
    if (*s == '\0') {
        return false;
    }
    for (; *s != '\0'; s++) {
        if (*s == '_') {
            continue; /* allow 0x2000_0000 style grouping */
        }
        int d = digit_value(*s);
        if (d < 0 || (uint32_t)d >= base) {
            return false;
        }
        if (value > (UINT32_MAX - (uint32_t)d) / base) {
            return false;
        }
        value = value * base + (uint32_t)d;
    }
    *out = value;
    return true;
}

bool fw_parse_i32(const char *s, int32_t *out)
{
    bool negative = false;
    uint32_t mag;

    if (s == NULL) {
        return false;
    }
    if (*s == '-' || *s == '+') {
        negative = (*s == '-');
        s++;
    }
    if (!fw_parse_u32(s, &mag)) {
        return false;
    }
    if (negative) {
        if (mag > 0x80000000u) {
            return false;
        }
        *out = (mag == 0x80000000u) ? INT32_MIN : -(int32_t)mag;
    } else {
        if (mag > (uint32_t)INT32_MAX) {
            return false;
        }
        *out = (int32_t)mag;
    }
    return true;
}

bool fw_parse_bool(const char *s, bool *out)
{
    static const char *const truthy[] = { "1", "on", "yes", "true", "enable" };
    static const char *const falsy[]  = { "0", "off", "no", "false", "disable" };

    for (size_t i = 0; i < sizeof(truthy) / sizeof(truthy[0]); i++) {
        if (fw_strcasecmp(s, truthy[i]) == 0) {
            *out = true;
            return true;
        }
        if (fw_strcasecmp(s, falsy[i]) == 0) {
            *out = false;
            return true;
        }
    }
    return false;
}

uint32_t fw_isqrt64(uint64_t v)
{
    uint64_t result = 0;
    uint64_t bit = (uint64_t)1 << 62;

    while (bit > v) {
        bit >>= 2;
    }
    while (bit != 0u) {
        if (v >= result + bit) {
            v -= result + bit;
            result = (result >> 1) + bit;
        } else {
            result >>= 1;
        }
        bit >>= 2;
    }
    return (uint32_t)result;
}

int32_t fw_clamp_i32(int32_t v, int32_t lo, int32_t hi)
{
    if (v < lo) {
        return lo;
    }
    if (v > hi) {
        return hi;
    }
    return v;
}
