/*
 * twim.h - blocking I2C master transfers on TWIM0 (EasyDMA).
 */
#ifndef TWIM_H
#define TWIM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum {
    TWIM_OK = 0,
    TWIM_ERR_ANACK,      /* address not acknowledged: no device */
    TWIM_ERR_DNACK,      /* data byte not acknowledged */
    TWIM_ERR_OVERRUN,
    TWIM_ERR_TIMEOUT,
    TWIM_ERR_PARAM,
} twim_status_t;

typedef struct {
    uint32_t transfers;
    uint32_t nacks;
    uint32_t timeouts;
    uint32_t bus_recoveries;
} twim_stats_t;

void          twim_init(uint32_t scl_pin, uint32_t sda_pin, uint32_t freq_khz);
twim_status_t twim_write(uint8_t addr, const uint8_t *data, size_t len, bool stop);
twim_status_t twim_read(uint8_t addr, uint8_t *data, size_t len);
twim_status_t twim_write_read(uint8_t addr, const uint8_t *tx, size_t tx_len,
                              uint8_t *rx, size_t rx_len);
/* Probes every 7-bit address; cb is called for each device that ACKs. */
unsigned      twim_scan(void (*cb)(uint8_t addr, void *ctx), void *ctx);
void          twim_bus_recover(void);
const char   *twim_status_text(twim_status_t st);
const twim_stats_t *twim_stats(void);

#endif /* TWIM_H */
