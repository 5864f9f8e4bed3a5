/*
 * wallclock.h - calendar time derived from the RTC and a UNIX epoch offset
 * set by the gateway (or by hand on the console).
 */
#ifndef WALLCLOCK_H
#define WALLCLOCK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint16_t year;
    uint8_t  month;    /* 1..12 */
    uint8_t  day;      /* 1..31 */
    uint8_t  hour;
    uint8_t  minute;
    uint8_t  second;
    uint8_t  weekday;  /* 0 = Sunday */
} civil_time_t;

void     wallclock_init(void);
bool     wallclock_is_set(void);
void     wallclock_set(uint32_t unix_seconds);
uint32_t wallclock_now(void);
/* Seconds since boot from the RTC, independent of SysTick. */
uint32_t wallclock_rtc_seconds(void);

void     wallclock_to_civil(uint32_t unix_seconds, civil_time_t *out);
bool     wallclock_from_civil(const civil_time_t *t, uint32_t *unix_seconds);
/* Parses "YYYY-MM-DDTHH:MM:SS" (the 'T' may also be a space or '_'). */
bool     wallclock_parse_iso(const char *s, uint32_t *unix_seconds);
int      wallclock_format_iso(uint32_t unix_seconds, char *buf, size_t size);

void     RTC1_IRQHandler(void);

#endif /* WALLCLOCK_H */
