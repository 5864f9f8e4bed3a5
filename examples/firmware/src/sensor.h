/*
 * sensor.h - SAADC sampling and conversion for the node's analog inputs.
 */
#ifndef SENSOR_H
#define SENSOR_H

#include <stdbool.h>
#include <stdint.h>

#include "filter.h"

typedef enum {
    SENSOR_CH_TEMP = 0,   /* NTC divider on AIN0, reported in 0.1 degC */
    SENSOR_CH_SUPPLY,     /* VDD, reported in mV */
    SENSOR_CH_AUX,        /* AIN2, reported in mV */
    SENSOR_CH_COUNT
} sensor_channel_t;

typedef struct {
    const char *name;
    const char *unit;
    uint8_t decimals;      /* fractional digits of the engineering value */
} sensor_channel_info_t;

typedef struct {
    int16_t  raw;          /* last ADC code */
    int16_t  value;        /* engineering units, unfiltered */
    int16_t  filtered;     /* output of the filter chain */
    bool     valid;
} sensor_reading_t;

typedef struct {
    uint32_t samples;
    uint32_t timeouts;
    uint32_t out_of_range;
    uint32_t calibrations;
} sensor_stats_t;

void  sensor_init(uint16_t alpha_q15, uint8_t ma_window);
bool  sensor_calibrate(void);
/* Runs one conversion of every channel and feeds the filters. */
bool  sensor_sample(void);

const sensor_reading_t      *sensor_reading(sensor_channel_t ch);
const sensor_channel_info_t *sensor_channel_info(sensor_channel_t ch);
filter_chain_t              *sensor_filter(sensor_channel_t ch);
const sensor_stats_t        *sensor_stats(void);

void  sensor_set_filter(uint16_t alpha_q15, uint8_t ma_window);
void  sensor_reset_filters(void);

/* Exposed for the command line's self-test. */
int16_t sensor_ntc_mv_to_decic(int32_t mv);
int32_t sensor_code_to_mv(int16_t code);

#endif /* SENSOR_H */
