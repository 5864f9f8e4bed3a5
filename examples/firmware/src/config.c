/*
 * config.c - settings persistence via the NVMC.
 */
#include "config.h"
#include "cpu.h"
#include "crc.h"
#include "filter.h"
#include "fmt.h"
#include "fw_config.h"
#include "fwlib.h"
#include "log.h"
#include "nrf52.h"
#include "uart.h"

#include <stddef.h>

#define NVMC_TIMEOUT 1000000u

static settings_t s_settings;
static config_source_t s_source = CONFIG_SRC_DEFAULTS;
static bool s_dirty;

static uint32_t settings_crc(const settings_t *s)
{
    return crc32((const uint8_t *)s, offsetof(settings_t, crc));
}

void config_set_defaults(void)
{
    memset(&s_settings, 0, sizeof(s_settings));
    s_settings.magic = CONFIG_MAGIC;
    s_settings.layout = CONFIG_LAYOUT;
    s_settings.size = sizeof(settings_t);
    s_settings.baud = FW_DEFAULT_BAUD;
    s_settings.report_period_ms = PERIOD_TELEMETRY_MS;
    s_settings.sample_period_ms = PERIOD_SENSOR_MS;
    s_settings.filter_alpha_q15 = FILTER_IIR_ALPHA_DEFAULT;
    s_settings.filter_window = FILTER_MA_WINDOW_DEFAULT;
    s_settings.log_level = LOG_LEVEL_INFO;
    s_settings.telemetry_binary = 0u;
    s_settings.leds_enabled = 1u;
    s_settings.hw_flow_control = 0u;
    fw_strlcpy(s_settings.node_name, "node", sizeof(s_settings.node_name));
    s_dirty = true;
}

static bool nvmc_wait_ready(void)
{
    for (uint32_t i = 0; i < NVMC_TIMEOUT; i++) {
        if (NVMC_READY & 1u) {
            return true;
        }
    }
    return false;
}

static bool flash_erase_page(uint32_t addr)
{
    bool ok;

    NVMC_CONFIG = NVMC_CONFIG_EEN;
    ok = nvmc_wait_ready();
    if (ok) {
        NVMC_ERASEPAGE = addr;
        ok = nvmc_wait_ready();
    }
    NVMC_CONFIG = NVMC_CONFIG_REN;
    return ok;
}

static bool flash_write_words(uint32_t addr, const uint32_t *src, size_t words)
{
    bool ok = true;

    NVMC_CONFIG = NVMC_CONFIG_WEN;
    for (size_t i = 0; i < words && ok; i++) {
        ok = nvmc_wait_ready();
        if (ok) {
            REG32(addr + 4u * i) = src[i];
        }
    }
    ok = ok && nvmc_wait_ready();
    NVMC_CONFIG = NVMC_CONFIG_REN;
    return ok;
}

/* Layout 1 lacked the node name and flow-control flag; carry the rest over. */
typedef struct {
    uint32_t magic;
    uint16_t layout;
    uint16_t size;
    uint32_t baud;
    uint32_t report_period_ms;
    uint32_t sample_period_ms;
    uint16_t filter_alpha_q15;
    uint8_t  filter_window;
    uint8_t  log_level;
    uint32_t boot_count;
    uint32_t crc;
} settings_v1_t;

static bool try_migrate_v1(const uint8_t *flash)
{
    settings_v1_t old;

    memcpy(&old, flash, sizeof(old));
    if (old.magic != CONFIG_MAGIC || old.layout != 1u || old.size != sizeof(old)) {
        return false;
    }
    if (crc32((const uint8_t *)&old, offsetof(settings_v1_t, crc)) != old.crc) {
        return false;
    }
    config_set_defaults();
    s_settings.baud = old.baud;
    s_settings.report_period_ms = old.report_period_ms;
    s_settings.sample_period_ms = old.sample_period_ms;
    s_settings.filter_alpha_q15 = old.filter_alpha_q15;
    s_settings.filter_window = old.filter_window;
    s_settings.log_level = old.log_level;
    s_settings.boot_count = old.boot_count;
    return true;
}

static bool validate(const settings_t *s)
{
    if (s->magic != CONFIG_MAGIC || s->layout != CONFIG_LAYOUT ||
        s->size != sizeof(settings_t)) {
        return false;
    }
    if (settings_crc(s) != s->crc) {
        return false;
    }
    if (!uart_baud_supported(s->baud) || s->filter_window == 0u ||
        s->filter_window > FILTER_MA_MAX_WINDOW || s->filter_alpha_q15 == 0u) {
        return false;
    }
    return s->node_name[sizeof(s->node_name) - 1u] == '\0';
}

void config_load(void)
{
    const uint8_t *flash = (const uint8_t *)(uintptr_t)CONFIG_FLASH_ADDR;
    settings_t candidate;

    memcpy(&candidate, flash, sizeof(candidate));
    if (validate(&candidate)) {
        s_settings = candidate;
        s_source = CONFIG_SRC_FLASH;
        s_dirty = false;
    } else if (try_migrate_v1(flash)) {
        s_source = CONFIG_SRC_MIGRATED;
        s_dirty = true;
    } else {
        config_set_defaults();
        s_source = CONFIG_SRC_DEFAULTS;
    }
    s_settings.boot_count++;
}

bool config_save(void)
{
    s_settings.magic = CONFIG_MAGIC;
    s_settings.layout = CONFIG_LAYOUT;
    s_settings.size = sizeof(settings_t);
    s_settings.crc = settings_crc(&s_settings);

    /* The CPU stalls during flash operations; keep interrupts off so that
     * no handler runs from flash mid-erase. */
    CRITICAL_SECTION_ENTER();
    bool ok = flash_erase_page(CONFIG_FLASH_ADDR) &&
              flash_write_words(CONFIG_FLASH_ADDR, (const uint32_t *)(const void *)&s_settings,
                                sizeof(s_settings) / 4u);
    CRITICAL_SECTION_EXIT();

    if (ok) {
        ok = memcmp((const void *)(uintptr_t)CONFIG_FLASH_ADDR, &s_settings,
                    sizeof(s_settings)) == 0;
    }
    if (ok) {
        s_dirty = false;
        s_source = CONFIG_SRC_FLASH;
    }
    return ok;
}

settings_t *config_get(void)
{
    return &s_settings;
}

config_source_t config_source(void)
{
    return s_source;
}

const char *config_source_name(void)
{
    switch (s_source) {
    case CONFIG_SRC_FLASH:    return "flash";
    case CONFIG_SRC_MIGRATED: return "migrated";
    case CONFIG_SRC_DEFAULTS:
    default:                  return "defaults";
    }
}

bool config_dirty(void)
{
    return s_dirty;
}

void config_mark_dirty(void)
{
    s_dirty = true;
}

typedef enum { KV_U32, KV_U8, KV_BOOL, KV_ALPHA, KV_STR, KV_LEVEL } kv_type_t;

typedef struct {
    const char *key;
    kv_type_t type;
    uint16_t offset;
    uint32_t min;
    uint32_t max;
} kv_desc_t;

#define KV(k, t, field, lo, hi) \
    { .key = (k), .type = (t), .offset = (uint16_t)offsetof(settings_t, field), .min = (lo), .max = (hi) }

static const kv_desc_t kv_table[] = {
    KV("baud",        KV_U32,   baud,              1200u, 1000000u),
    KV("report_ms",   KV_U32,   report_period_ms,  100u,  3600000u),
    KV("sample_ms",   KV_U32,   sample_period_ms,  10u,   60000u),
    KV("alpha",       KV_ALPHA, filter_alpha_q15,  1u,    1000u),
    KV("window",      KV_U8,    filter_window,     1u,    FILTER_MA_MAX_WINDOW),
    KV("log_level",   KV_LEVEL, log_level,         0u,    LOG_LEVEL_COUNT - 1u),
    KV("binary",      KV_BOOL,  telemetry_binary,  0u,    1u),
    KV("leds",        KV_BOOL,  leds_enabled,      0u,    1u),
    KV("flow_ctrl",   KV_BOOL,  hw_flow_control,   0u,    1u),
    KV("name",        KV_STR,   node_name,         1u,    15u),
};

static void *field_ptr(const kv_desc_t *d)
{
    return (uint8_t *)&s_settings + d->offset;
}

config_status_t config_set_kv(const char *key, const char *value)
{
    for (size_t i = 0; i < ARRAY_SIZE(kv_table); i++) {
        const kv_desc_t *d = &kv_table[i];
        uint32_t v = 0;
        bool b = false;

        if (strcmp(d->key, key) != 0) {
            continue;
        }
        switch (d->type) {
        case KV_BOOL:
            if (!fw_parse_bool(value, &b)) {
                return CFG_ERR_BAD_VALUE;
            }
            *(uint8_t *)field_ptr(d) = b ? 1u : 0u;
            break;
        case KV_STR: {
            size_t len = strlen(value);
            if (len < d->min || len > d->max) {
                return CFG_ERR_RANGE;
            }
            fw_strlcpy(field_ptr(d), value, d->max + 1u);
            break;
        }
        case KV_LEVEL: {
            int lvl = log_level_from_name(value);
            if (lvl < 0) {
                if (!fw_parse_u32(value, &v)) {
                    return CFG_ERR_BAD_VALUE;
                }
                lvl = (int)v;
            }
            if ((uint32_t)lvl > d->max) {
                return CFG_ERR_RANGE;
            }
            *(uint8_t *)field_ptr(d) = (uint8_t)lvl;
            log_set_level((log_level_t)lvl);
            break;
        }
        case KV_U32:
        case KV_U8:
        case KV_ALPHA:
        default:
            if (!fw_parse_u32(value, &v)) {
                return CFG_ERR_BAD_VALUE;
            }
            if (v < d->min || v > d->max) {
                return CFG_ERR_RANGE;
            }
            if (d->type == KV_U32) {
                if (d->offset == offsetof(settings_t, baud) && !uart_baud_supported(v)) {
                    return CFG_ERR_RANGE;
                }
                *(uint32_t *)field_ptr(d) = v;
            } else if (d->type == KV_U8) {
                *(uint8_t *)field_ptr(d) = (uint8_t)v;
            } else {
                /* alpha is entered in thousandths */
                *(uint16_t *)field_ptr(d) = q15_from_milli(v);
            }
            break;
        }
        s_dirty = true;
        return CFG_OK;
    }
    return CFG_ERR_UNKNOWN_KEY;
}

void config_visit(config_visit_fn fn, void *ctx)
{
    char value[24];

    for (size_t i = 0; i < ARRAY_SIZE(kv_table); i++) {
        const kv_desc_t *d = &kv_table[i];
        const void *p = field_ptr(d);

        switch (d->type) {
        case KV_U32:
            fw_snprintf(value, sizeof(value), "%lu", (unsigned long)*(const uint32_t *)p);
            break;
        case KV_U8:
            fw_snprintf(value, sizeof(value), "%u", *(const uint8_t *)p);
            break;
        case KV_BOOL:
            fw_snprintf(value, sizeof(value), "%s", *(const uint8_t *)p ? "on" : "off");
            break;
        case KV_ALPHA:
            fw_snprintf(value, sizeof(value), "0.%03lu (q15 %u)",
                        (unsigned long)q15_to_milli(*(const uint16_t *)p),
                        *(const uint16_t *)p);
            break;
        case KV_LEVEL:
            fw_snprintf(value, sizeof(value), "%s",
                        log_level_name((log_level_t)*(const uint8_t *)p));
            break;
        case KV_STR:
        default:
            fw_snprintf(value, sizeof(value), "%s", (const char *)p);
            break;
        }
        fn(d->key, value, ctx);
    }
}

const char *config_status_text(config_status_t st)
{
    switch (st) {
    case CFG_OK:              return "ok";
    case CFG_ERR_UNKNOWN_KEY: return "unknown key";
    case CFG_ERR_BAD_VALUE:   return "bad value";
    case CFG_ERR_RANGE:       return "out of range";
    default:                  return "error";
    }
}
