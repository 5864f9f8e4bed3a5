/*
 * log.c - console logging with a millisecond timestamp prefix.
 */
#include "log.h"
#include "fmt.h"
#include "fwlib.h"
#include "sched.h"
#include "uart.h"

#include <stdarg.h>

#define LOG_LINE_MAX 160u

static log_level_t s_level = LOG_LEVEL_INFO;
static uint32_t s_dropped;
static uint32_t s_counts[LOG_LEVEL_COUNT];

static const char *const level_names[LOG_LEVEL_COUNT] = {
    "error", "warn", "info", "debug", "trace"
};
static const char level_tags[LOG_LEVEL_COUNT] = { 'E', 'W', 'I', 'D', 'T' };

void log_init(log_level_t level)
{
    log_set_level(level);
    s_dropped = 0;
    memset(s_counts, 0, sizeof(s_counts));
}

void log_set_level(log_level_t level)
{
    if ((unsigned)level < LOG_LEVEL_COUNT) {
        s_level = level;
    }
}

log_level_t log_get_level(void)
{
    return s_level;
}

const char *log_level_name(log_level_t level)
{
    return ((unsigned)level < LOG_LEVEL_COUNT) ? level_names[level] : "?";
}

int log_level_from_name(const char *name)
{
    for (unsigned i = 0; i < LOG_LEVEL_COUNT; i++) {
        if (fw_strcasecmp(name, level_names[i]) == 0) {
            return (int)i;
        }
    }
    return -1;
}

uint32_t log_dropped(void)
{
    return s_dropped;
}

uint32_t log_count(log_level_t level)
{
    return ((unsigned)level < LOG_LEVEL_COUNT) ? s_counts[level] : 0u;
}

void log_write(log_level_t level, const char *module, const char *fmt, ...)
{
    char line[LOG_LINE_MAX];
    va_list ap;
    int n;
    size_t len;

    if ((unsigned)level >= LOG_LEVEL_COUNT || level > s_level) {
        return;
    }
    s_counts[level]++;

    uint32_t now = systick_ms();
    n = fw_snprintf(line, sizeof(line), "[%5lu.%03lu] %c %-6s ",
                    (unsigned long)(now / 1000u), (unsigned long)(now % 1000u),
                    level_tags[level], module);
    len = (n < 0) ? 0u : (size_t)n;
    if (len >= sizeof(line)) {
        len = sizeof(line) - 1u;
    }

    va_start(ap, fmt);
    n = fw_vsnprintf(line + len, sizeof(line) - len, fmt, ap);
    va_end(ap);
    if (n > 0) {
        len += (size_t)n;
    }
    if (len > sizeof(line) - 3u) {
        len = sizeof(line) - 3u; /* truncated: keep room for CRLF */
    }
    line[len++] = '\r';
    line[len++] = '\n';

    if (uart_write(line, len) != len) {
        s_dropped++;
    }
}
