/*
 * config.h - persistent device settings stored in the last flash page.
 */
#ifndef CONFIG_H
#define CONFIG_H

#include <stdbool.h>
#include <stdint.h>

#define CONFIG_MAGIC   0x53484346u  /* "SHCF" */
#define CONFIG_LAYOUT  2u

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
    uint8_t  telemetry_binary;
    uint8_t  leds_enabled;
    uint8_t  hw_flow_control;
    uint8_t  reserved0;
    char     node_name[16];
    uint32_t boot_count;
    uint32_t crc;              /* CRC-32 of everything above */
} settings_t;

typedef enum {
    CONFIG_SRC_DEFAULTS,
    CONFIG_SRC_FLASH,
    CONFIG_SRC_MIGRATED,
} config_source_t;

typedef enum {
    CFG_OK = 0,
    CFG_ERR_UNKNOWN_KEY,
    CFG_ERR_BAD_VALUE,
    CFG_ERR_RANGE,
} config_status_t;

void               config_load(void);
bool               config_save(void);
void               config_set_defaults(void);
settings_t        *config_get(void);
config_source_t    config_source(void);
const char        *config_source_name(void);
bool               config_dirty(void);
void               config_mark_dirty(void);

/* Key/value access for the command line. */
config_status_t    config_set_kv(const char *key, const char *value);
typedef void (*config_visit_fn)(const char *key, const char *value, void *ctx);
void               config_visit(config_visit_fn fn, void *ctx);
const char        *config_status_text(config_status_t st);

#endif /* CONFIG_H */
