/*
 * evlog.c - event ring buffer in .noinit RAM, validated by a CRC so that a
 * cold boot (random RAM contents) starts with an empty log.
 */
#include "evlog.h"
#include "cpu.h"
#include "crc.h"
#include "fwlib.h"
#include "sched.h"

#define EVLOG_MAGIC 0x45564C47u /* "EVLG" */

typedef struct {
    uint32_t magic;
    uint32_t head;      /* total records ever written */
    uint32_t boot;
    ev_record_t records[EVLOG_CAPACITY];
    uint32_t crc;       /* over magic, head and records */
} evlog_store_t;

__attribute__((section(".noinit")))
static evlog_store_t s_log;

static const char *const code_names[EV_CODE_COUNT] = {
    [0]                   = "none",
    [EV_BOOT]             = "boot",
    [EV_RESET_WATCHDOG]   = "wdt-reset",
    [EV_FAULT_RECOVERED]  = "fault",
    [EV_CONFIG_SAVED]     = "cfg-saved",
    [EV_CONFIG_DEFAULTS]  = "cfg-defaults",
    [EV_BAUD_CHANGED]     = "baud",
    [EV_SENSOR_TIMEOUT]   = "adc-timeout",
    [EV_SENSOR_RECAL]     = "adc-recal",
    [EV_I2C_ERROR]        = "i2c-error",
    [EV_BUTTON]           = "button",
    [EV_DFU_BEGIN]        = "dfu-begin",
    [EV_DFU_READY]        = "dfu-ready",
    [EV_DFU_FAILED]       = "dfu-failed",
    [EV_TIME_SET]         = "time-set",
    [EV_SUPPLY_LOW]       = "supply-low",
};

static uint32_t store_crc(void)
{
    return crc32((const uint8_t *)&s_log, offsetof(evlog_store_t, crc));
}

void evlog_init(uint32_t boot_count)
{
    if (s_log.magic != EVLOG_MAGIC || s_log.crc != store_crc()) {
        memset(&s_log, 0, sizeof(s_log));
        s_log.magic = EVLOG_MAGIC;
    }
    s_log.boot = boot_count;
    s_log.crc = store_crc();
}

void evlog_add(ev_code_t code, uint32_t arg)
{
    CRITICAL_SECTION_ENTER();
    ev_record_t *r = &s_log.records[s_log.head % EVLOG_CAPACITY];
    r->uptime_ms = systick_ms();
    r->boot = s_log.boot;
    r->code = (uint16_t)code;
    r->reserved = 0u;
    r->arg = arg;
    s_log.head++;
    s_log.crc = store_crc();
    CRITICAL_SECTION_EXIT();
}

unsigned evlog_count(void)
{
    return (s_log.head < EVLOG_CAPACITY) ? (unsigned)s_log.head : EVLOG_CAPACITY;
}

bool evlog_get(unsigned index, ev_record_t *out)
{
    unsigned count = evlog_count();

    if (index >= count) {
        return false;
    }
    uint32_t first = s_log.head - count;
    *out = s_log.records[(first + index) % EVLOG_CAPACITY];
    return true;
}

void evlog_clear(void)
{
    CRITICAL_SECTION_ENTER();
    uint32_t boot = s_log.boot;
    memset(&s_log, 0, sizeof(s_log));
    s_log.magic = EVLOG_MAGIC;
    s_log.boot = boot;
    s_log.crc = store_crc();
    CRITICAL_SECTION_EXIT();
}

const char *evlog_code_name(uint16_t code)
{
    return (code < EV_CODE_COUNT && code_names[code] != NULL) ? code_names[code] : "?";
}

uint32_t evlog_total(void)
{
    return s_log.head;
}
