/*
 * humidity.h - driver for an SHT3x-style I2C temperature/humidity sensor.
 *
 * Measurements are non-blocking: humidity_poll() triggers a single-shot
 * conversion and collects the result on a later call once the conversion
 * time has elapsed.
 */
#ifndef HUMIDITY_H
#define HUMIDITY_H

#include <stdbool.h>
#include <stdint.h>

typedef struct {
    int16_t  temp_centi;     /* 0.01 degC */
    uint16_t rh_centi;       /* 0.01 %RH */
    uint32_t timestamp_ms;
    bool     valid;
} humidity_sample_t;

typedef struct {
    uint32_t measurements;
    uint32_t crc_errors;
    uint32_t bus_errors;
    uint16_t serial_hi;
    uint16_t serial_lo;
    bool     present;
    bool     heater_on;
} humidity_info_t;

bool  humidity_init(uint8_t i2c_addr);
void  humidity_poll(uint32_t now_ms);
bool  humidity_set_heater(bool on);
bool  humidity_soft_reset(void);
const humidity_sample_t *humidity_latest(void);
const humidity_info_t   *humidity_info(void);

/* Dew point in 0.01 degC from temperature (0.01 degC) and RH (0.01 %). */
int32_t humidity_dew_point_centi(int32_t temp_centi, uint32_t rh_centi);

#endif /* HUMIDITY_H */
