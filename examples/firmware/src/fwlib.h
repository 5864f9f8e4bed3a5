/*
 * fwlib.h - the small subset of the C library the firmware needs.
 *
 * The image is linked without a C library, so the usual string routines
 * (which the compiler may also emit calls to) are provided here.
 */
#ifndef FWLIB_H
#define FWLIB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

void  *memcpy(void *dst, const void *src, size_t n);
void  *memmove(void *dst, const void *src, size_t n);
void  *memset(void *dst, int c, size_t n);
int    memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
size_t strnlen(const char *s, size_t max);
int    strcmp(const char *a, const char *b);
int    strncmp(const char *a, const char *b, size_t n);
char  *strchr(const char *s, int c);

/* Bounded copy that always terminates dst (when size > 0). Returns strlen(src). */
size_t fw_strlcpy(char *dst, const char *src, size_t size);

bool   fw_isdigit(char c);
bool   fw_isxdigit(char c);
bool   fw_isspace(char c);
bool   fw_isprint(char c);
char   fw_tolower(char c);
int    fw_strcasecmp(const char *a, const char *b);

/*
 * Number parsing for the command line. Accepts decimal, 0x-prefixed hex and
 * 0b-prefixed binary; the whole string must be consumed. Returns false on
 * any syntax error or overflow and leaves *out untouched.
 */
bool   fw_parse_u32(const char *s, uint32_t *out);
bool   fw_parse_i32(const char *s, int32_t *out);
bool   fw_parse_bool(const char *s, bool *out);

/* Integer square root (floor). */
uint32_t fw_isqrt64(uint64_t v);

int32_t  fw_clamp_i32(int32_t v, int32_t lo, int32_t hi);

#endif /* FWLIB_H */
