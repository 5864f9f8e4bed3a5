/*
 * telemetry.c - status record assembly, text and COBS/CRC framing.
 */
#include "telemetry.h"
#include "board.h"
#include "config.h"
#include "crc.h"
#include "fmt.h"
#include "fw_config.h"
#include "fwlib.h"
#include "humidity.h"
#include "nrf52.h"
#include "sched.h"
#include "sensor.h"
#include "uart.h"
#include "wallclock.h"

#define SUPPLY_LOW_MV 2200

static uint16_t s_seq;
static uint32_t s_sent;

void telemetry_init(void)
{
    s_seq = 0;
    s_sent = 0;
}

uint32_t telemetry_sent(void)
{
    return s_sent;
}

size_t cobs_encode(const uint8_t *src, size_t len, uint8_t *dst, size_t dst_size)
{
    size_t out = 1;        /* first code byte is filled in later */
    size_t code_pos = 0;
    uint8_t code = 1;

    if (dst_size == 0u) {
        return 0;
    }
    for (size_t i = 0; i < len; i++) {
        if (out >= dst_size) {
            return 0;
        }
        if (src[i] == 0u) {
            dst[code_pos] = code;
            code_pos = out++;
            code = 1;
        } else {
            dst[out++] = src[i];
            code++;
            if (code == 0xFFu) {
                if (out >= dst_size) {
                    return 0;
                }
                dst[code_pos] = code;
                code_pos = out++;
                code = 1;
            }
        }
    }
    dst[code_pos] = code;
    return out;
}

size_t cobs_decode(const uint8_t *src, size_t len, uint8_t *dst, size_t dst_size)
{
    size_t in = 0;
    size_t out = 0;

    while (in < len) {
        uint8_t code = src[in++];
        if (code == 0u) {
            return 0; /* zero inside a frame is invalid */
        }
        for (uint8_t i = 1; i < code; i++) {
            if (in >= len || out >= dst_size) {
                return 0;
            }
            dst[out++] = src[in++];
        }
        if (code != 0xFFu && in < len) {
            if (out >= dst_size) {
                return 0;
            }
            dst[out++] = 0u;
        }
    }
    return out;
}

void telemetry_collect(telemetry_record_t *rec)
{
    const sensor_reading_t *t = sensor_reading(SENSOR_CH_TEMP);
    const sensor_reading_t *v = sensor_reading(SENSOR_CH_SUPPLY);
    const sensor_reading_t *a = sensor_reading(SENSOR_CH_AUX);
    const settings_t *cfg = config_get();

    memset(rec, 0, sizeof(*rec));
    rec->type = TELEMETRY_RECORD_TYPE_STATUS;
    rec->proto = TELEMETRY_PROTO_VERSION;
    rec->seq = s_seq;
    rec->uptime_s = (uint32_t)(systick_ms64() / 1000u);
    rec->temp_decic = t->filtered;
    rec->supply_mv = (uint16_t)v->filtered;
    rec->aux_mv = (uint16_t)a->filtered;
    rec->fw_major = FW_VERSION_MAJOR;
    rec->fw_minor = FW_VERSION_MINOR;
    rec->idle_pct = (uint8_t)sched_idle_percent();
    rec->boot_count = cfg->boot_count;
    if (t->valid) {
        rec->flags |= TELEMETRY_FLAG_TEMP_VALID;
    }
    if (v->filtered < SUPPLY_LOW_MV) {
        rec->flags |= TELEMETRY_FLAG_SUPPLY_LOW;
    }
    if (config_dirty()) {
        rec->flags |= TELEMETRY_FLAG_CONFIG_DIRTY;
    }
    if (board_reset_info()->raw & RESETREAS_DOG) {
        rec->flags |= TELEMETRY_FLAG_WDT_RESET;
    }
    const humidity_sample_t *rh = humidity_latest();
    if (rh->valid) {
        rec->flags |= TELEMETRY_FLAG_RH_VALID;
        rec->rh_centi = rh->rh_centi;
        rec->dew_point_centi =
            (int16_t)humidity_dew_point_centi(rh->temp_centi, rh->rh_centi);
    }
    if (wallclock_is_set()) {
        rec->flags |= TELEMETRY_FLAG_TIME_SET;
    }
    rec->wall_time = wallclock_now();
}

static void send_binary(const telemetry_record_t *rec)
{
    uint8_t raw[sizeof(*rec) + 2u];
    uint8_t frame[sizeof(raw) + sizeof(raw) / 254u + 3u];

    memcpy(raw, rec, sizeof(*rec));
    uint16_t crc = crc16_ccitt(raw, sizeof(*rec));
    raw[sizeof(*rec)] = (uint8_t)(crc >> 8);
    raw[sizeof(*rec) + 1u] = (uint8_t)crc;

    size_t n = cobs_encode(raw, sizeof(raw), frame, sizeof(frame) - 1u);
    if (n == 0u) {
        return;
    }
    frame[n++] = 0u; /* frame delimiter */
    uart_write(frame, n);
}

static void send_text(const telemetry_record_t *rec)
{
    char temp[12];
    char rh[12];
    char dew[12];
    char when[24];

    fmt_fixed(temp, sizeof(temp), rec->temp_decic, 1u);
    fmt_fixed(rh, sizeof(rh), rec->rh_centi, 2u);
    fmt_fixed(dew, sizeof(dew), rec->dew_point_centi, 2u);
    if (rec->flags & TELEMETRY_FLAG_TIME_SET) {
        wallclock_format_iso(rec->wall_time, when, sizeof(when));
    } else {
        fw_snprintf(when, sizeof(when), "+%lus", (unsigned long)rec->wall_time);
    }
    uart_printf("TLM seq=%u t=%s up=%lu name=%s temp=%s rh=%s dew=%s vdd=%u aux=%u "
                "idle=%u%% flags=0x%02x boots=%lu\r\n",
                rec->seq, when, (unsigned long)rec->uptime_s, config_get()->node_name,
                (rec->flags & TELEMETRY_FLAG_TEMP_VALID) ? temp : "n/a",
                (rec->flags & TELEMETRY_FLAG_RH_VALID) ? rh : "n/a",
                (rec->flags & TELEMETRY_FLAG_RH_VALID) ? dew : "n/a",
                rec->supply_mv, rec->aux_mv, rec->idle_pct, rec->flags,
                (unsigned long)rec->boot_count);
}

void telemetry_send(bool binary)
{
    telemetry_record_t rec;

    telemetry_collect(&rec);
    if (binary) {
        send_binary(&rec);
    } else {
        send_text(&rec);
    }
    s_seq++;
    s_sent++;
}
