/*
 * telemetry.h - periodic status reports to the gateway.
 *
 * Text mode prints one key=value line per report. Binary mode sends a
 * COBS-framed record terminated by 0x00 and protected by CRC-16/CCITT, which
 * the gateway parses without a line discipline.
 */
#ifndef TELEMETRY_H
#define TELEMETRY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TELEMETRY_RECORD_TYPE_STATUS 0x01u
#define TELEMETRY_PROTO_VERSION      2u

typedef struct __attribute__((packed)) {
    uint8_t  type;
    uint8_t  proto;
    uint16_t seq;
    uint32_t uptime_s;
    int16_t  temp_decic;
    uint16_t supply_mv;
    uint16_t aux_mv;
    uint8_t  fw_major;
    uint8_t  fw_minor;
    uint8_t  idle_pct;
    uint8_t  flags;
    uint32_t boot_count;
    uint16_t rh_centi;
    int16_t  dew_point_centi;
    uint32_t wall_time;
} telemetry_record_t;

#define TELEMETRY_FLAG_TEMP_VALID   (1u << 0)
#define TELEMETRY_FLAG_SUPPLY_LOW   (1u << 1)
#define TELEMETRY_FLAG_CONFIG_DIRTY (1u << 2)
#define TELEMETRY_FLAG_WDT_RESET    (1u << 3)
#define TELEMETRY_FLAG_RH_VALID     (1u << 4)
#define TELEMETRY_FLAG_TIME_SET     (1u << 5)

void     telemetry_init(void);
void     telemetry_collect(telemetry_record_t *rec);
void     telemetry_send(bool binary);
uint32_t telemetry_sent(void);

/* COBS helpers, exposed for testing from the command line. */
size_t   cobs_encode(const uint8_t *src, size_t len, uint8_t *dst, size_t dst_size);
size_t   cobs_decode(const uint8_t *src, size_t len, uint8_t *dst, size_t dst_size);

#endif /* TELEMETRY_H */
