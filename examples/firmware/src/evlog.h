/*
 * evlog.h - in-RAM ring of significant events, kept across warm resets.
 */
#ifndef EVLOG_H
#define EVLOG_H

#include <stdbool.h>
#include <stdint.h>

typedef enum {
    EV_BOOT = 1,
    EV_RESET_WATCHDOG,
    EV_FAULT_RECOVERED,
    EV_CONFIG_SAVED,
    EV_CONFIG_DEFAULTS,
    EV_BAUD_CHANGED,
    EV_SENSOR_TIMEOUT,
    EV_SENSOR_RECAL,
    EV_I2C_ERROR,
    EV_BUTTON,
    EV_DFU_BEGIN,
    EV_DFU_READY,
    EV_DFU_FAILED,
    EV_TIME_SET,
    EV_SUPPLY_LOW,
    EV_CODE_COUNT
} ev_code_t;

typedef struct {
    uint32_t uptime_ms;
    uint32_t boot;
    uint16_t code;
    uint16_t reserved;
    uint32_t arg;
} ev_record_t;

#define EVLOG_CAPACITY 32u

void        evlog_init(uint32_t boot_count);
void        evlog_add(ev_code_t code, uint32_t arg);
unsigned    evlog_count(void);
/* index 0 is the oldest retained record */
bool        evlog_get(unsigned index, ev_record_t *out);
void        evlog_clear(void);
const char *evlog_code_name(uint16_t code);
uint32_t    evlog_total(void);

#endif /* EVLOG_H */
