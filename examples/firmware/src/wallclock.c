/*
 * wallclock.c - RTC1 time base and Gregorian calendar conversion.
 *
 * RTC1 runs from the 32.768 kHz crystal with prescaler 0; its 24-bit counter
 * overflows every 512 s, which the interrupt accumulates.
 */
#include "wallclock.h"
#include "cpu.h"
#include "fmt.h"
#include "fwlib.h"
#include "nrf52.h"

#define RTC_HZ             32768u
#define SECONDS_PER_DAY    86400u
#define MIN_VALID_EPOCH    1577836800u   /* 2020-01-01: anything earlier is unset */

static volatile uint32_t s_overflows;
static uint32_t s_epoch_at_rtc0;         /* UNIX time when the RTC read zero */
static bool s_set;

void RTC1_IRQHandler(void)
{
    if (RTC1_EVENTS_OVRFLW != 0u) {
        RTC1_EVENTS_OVRFLW = 0u;
        s_overflows++;
    }
}

void wallclock_init(void)
{
    RTC1_TASKS_STOP = 1u;
    RTC1_PRESCALER = 0u;
    RTC1_TASKS_CLEAR = 1u;
    RTC1_EVENTS_OVRFLW = 0u;
    RTC1_EVTENSET = RTC_INT_OVRFLW;
    RTC1_INTENSET = RTC_INT_OVRFLW;
    nvic_set_priority(IRQ_RTC1, 6u);
    nvic_enable_irq(IRQ_RTC1);
    RTC1_TASKS_START = 1u;
    s_overflows = 0;
    s_set = false;
}

uint32_t wallclock_rtc_seconds(void)
{
    uint32_t ovf;
    uint32_t counter;

    /* Re-read if an overflow interrupt slipped in between the two reads. */
    do {
        ovf = s_overflows;
        counter = RTC1_COUNTER;
    } while (ovf != s_overflows);

    uint64_t ticks = ((uint64_t)ovf << RTC_COUNTER_BITS) | counter;
    return (uint32_t)(ticks / RTC_HZ);
}

bool wallclock_is_set(void)
{
    return s_set;
}

void wallclock_set(uint32_t unix_seconds)
{
    s_epoch_at_rtc0 = unix_seconds - wallclock_rtc_seconds();
    s_set = unix_seconds >= MIN_VALID_EPOCH;
}

uint32_t wallclock_now(void)
{
    return s_set ? s_epoch_at_rtc0 + wallclock_rtc_seconds() : wallclock_rtc_seconds();
}

/*
 * Day-count conversions use the era-based formulation of the proleptic
 * Gregorian calendar (400-year eras of 146097 days), which needs no tables.
 */
static int32_t days_from_civil(int32_t y, uint32_t m, uint32_t d)
{
    y -= (m <= 2u) ? 1 : 0;
    int32_t era = (y >= 0 ? y : y - 399) / 400;
    uint32_t yoe = (uint32_t)(y - era * 400);
    uint32_t mp = (m + 9u) % 12u;
    uint32_t doy = (153u * mp + 2u) / 5u + d - 1u;
    uint32_t doe = yoe * 365u + yoe / 4u - yoe / 100u + doy;
    return era * 146097 + (int32_t)doe - 719468;
}

void wallclock_to_civil(uint32_t unix_seconds, civil_time_t *out)
{
    uint32_t days = unix_seconds / SECONDS_PER_DAY;
    uint32_t rem = unix_seconds % SECONDS_PER_DAY;

    out->hour = (uint8_t)(rem / 3600u);
    out->minute = (uint8_t)((rem / 60u) % 60u);
    out->second = (uint8_t)(rem % 60u);
    out->weekday = (uint8_t)((days + 4u) % 7u); /* 1970-01-01 was a Thursday */

    uint32_t z = days + 719468u;
    uint32_t era = z / 146097u;
    uint32_t doe = z - era * 146097u;
    uint32_t yoe = (doe - doe / 1460u + doe / 36524u - doe / 146096u) / 365u;
    uint32_t doy = doe - (365u * yoe + yoe / 4u - yoe / 100u);
    uint32_t mp = (5u * doy + 2u) / 153u;
    uint32_t d = doy - (153u * mp + 2u) / 5u + 1u;
    uint32_t m = (mp < 10u) ? mp + 3u : mp - 9u;
    uint32_t y = yoe + era * 400u + ((m <= 2u) ? 1u : 0u);

    out->year = (uint16_t)y;
    out->month = (uint8_t)m;
    out->day = (uint8_t)d;
}

static uint8_t days_in_month(uint16_t year, uint8_t month)
{
    static const uint8_t dim[12] = { 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 };
    bool leap = (year % 4u == 0u && year % 100u != 0u) || year % 400u == 0u;
    return (month == 2u && leap) ? 29u : dim[month - 1u];
}

bool wallclock_from_civil(const civil_time_t *t, uint32_t *unix_seconds)
{
    if (t->year < 1970u || t->year > 2105u || t->month < 1u || t->month > 12u ||
        t->day < 1u || t->day > days_in_month(t->year, t->month) || t->hour > 23u ||
        t->minute > 59u || t->second > 59u) {
        return false;
    }
    int32_t days = days_from_civil(t->year, t->month, t->day);
    uint64_t secs = (uint64_t)days * SECONDS_PER_DAY + t->hour * 3600u +
                    t->minute * 60u + t->second;
    if (secs > UINT32_MAX) {
        return false;
    }
    *unix_seconds = (uint32_t)secs;
    return true;
}

static bool take_digits(const char **p, unsigned n, uint32_t *out)
{
    uint32_t v = 0;
    for (unsigned i = 0; i < n; i++) {
        char c = (*p)[i];
        if (!fw_isdigit(c)) {
            return false;
        }
        v = v * 10u + (uint32_t)(c - '0');
    }
    *p += n;
    *out = v;
    return true;
}

static bool take_char(const char **p, const char *allowed)
{
    if (**p != '\0' && strchr(allowed, **p) != NULL) {
        (*p)++;
        return true;
    }
    return false;
}

bool wallclock_parse_iso(const char *s, uint32_t *unix_seconds)
{
    uint32_t y, mo, d, h, mi, se;
    civil_time_t t;

    if (!take_digits(&s, 4u, &y) || !take_char(&s, "-") ||
        !take_digits(&s, 2u, &mo) || !take_char(&s, "-") ||
        !take_digits(&s, 2u, &d) || !take_char(&s, "T _") ||
        !take_digits(&s, 2u, &h) || !take_char(&s, ":") ||
        !take_digits(&s, 2u, &mi) || !take_char(&s, ":") ||
        !take_digits(&s, 2u, &se)) {
        return false;
    }
    take_char(&s, "Z");
    if (*s != '\0') {
        return false;
    }
    t.year = (uint16_t)y;
    t.month = (uint8_t)mo;
    t.day = (uint8_t)d;
    t.hour = (uint8_t)h;
    t.minute = (uint8_t)mi;
    t.second = (uint8_t)se;
    t.weekday = 0;
    return wallclock_from_civil(&t, unix_seconds);
}

int wallclock_format_iso(uint32_t unix_seconds, char *buf, size_t size)
{
    civil_time_t t;

    wallclock_to_civil(unix_seconds, &t);
    return fw_snprintf(buf, size, "%04u-%02u-%02uT%02u:%02u:%02uZ", t.year, t.month,
                       t.day, t.hour, t.minute, t.second);
}
