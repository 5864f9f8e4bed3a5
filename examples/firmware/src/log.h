/*
 * log.h - levelled, timestamped console logging.
 */
#ifndef LOG_H
#define LOG_H

#include <stdint.h>

typedef enum {
    LOG_LEVEL_ERROR = 0,
    LOG_LEVEL_WARN,
    LOG_LEVEL_INFO,
    LOG_LEVEL_DEBUG,
    LOG_LEVEL_TRACE,
    LOG_LEVEL_COUNT
} log_level_t;

void        log_init(log_level_t level);
void        log_set_level(log_level_t level);
log_level_t log_get_level(void);
const char *log_level_name(log_level_t level);
int         log_level_from_name(const char *name);
uint32_t    log_dropped(void);
uint32_t    log_count(log_level_t level);

void log_write(log_level_t level, const char *module, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define LOG_E(mod, ...) log_write(LOG_LEVEL_ERROR, (mod), __VA_ARGS__)
#define LOG_W(mod, ...) log_write(LOG_LEVEL_WARN,  (mod), __VA_ARGS__)
#define LOG_I(mod, ...) log_write(LOG_LEVEL_INFO,  (mod), __VA_ARGS__)
#define LOG_D(mod, ...) log_write(LOG_LEVEL_DEBUG, (mod), __VA_ARGS__)
#define LOG_T(mod, ...) log_write(LOG_LEVEL_TRACE, (mod), __VA_ARGS__)

#endif /* LOG_H */
