/*
 * sensor.c - SAADC driver and conversion to engineering units.
 *
 * All channels use the internal 0.6 V reference with 1/6 gain, giving a
 * 0..3.6 V input range, 12-bit resolution with 4x oversampling.
 */
#include "sensor.h"
#include "cpu.h"
#include "fwlib.h"
#include "nrf52.h"

#define ADC_FULL_SCALE_MV  3600
#define ADC_MAX_CODE       4095
#define SAADC_TIMEOUT      50000u

typedef struct {
    int16_t decic;    /* temperature, 0.1 degC */
    int16_t mv;       /* divider voltage at that temperature */
} ntc_point_t;

/* 10k/B3950 NTC on the low side of a 10k divider from 3.0 V. */
static const ntc_point_t ntc_table[] = {
    { -400, 2927 }, { -350, 2897 }, { -300, 2857 }, { -250, 2806 },
    { -200, 2740 }, { -150, 2659 }, { -100, 2560 }, {  -50, 2445 },
    {    0, 2312 }, {   50, 2165 }, {  100, 2006 }, {  150, 1839 },
    {  200, 1669 }, {  250, 1500 }, {  300, 1337 }, {  350, 1182 },
    {  400, 1039 }, {  450,  909 }, {  500,  792 }, {  550,  688 },
    {  600,  597 }, {  650,  518 }, {  700,  449 }, {  750,  389 },
    {  800,  338 }, {  850,  294 }, {  900,  256 }, {  950,  224 },
    { 1000,  196 }, { 1050,  172 }, { 1100,  151 }, { 1150,  133 },
    { 1200,  117 }, { 1250,  104 },
};

static const sensor_channel_info_t channel_info[SENSOR_CH_COUNT] = {
    [SENSOR_CH_TEMP]   = { .name = "temp",   .unit = "C",  .decimals = 1 },
    [SENSOR_CH_SUPPLY] = { .name = "supply", .unit = "mV", .decimals = 0 },
    [SENSOR_CH_AUX]    = { .name = "aux",    .unit = "mV", .decimals = 0 },
};

static volatile int16_t s_dma_result[SENSOR_CH_COUNT];
static sensor_reading_t s_readings[SENSOR_CH_COUNT];
static filter_chain_t s_filters[SENSOR_CH_COUNT];
static sensor_stats_t s_stats;

static bool wait_event(volatile uint32_t *event)
{
    for (uint32_t i = 0; i < SAADC_TIMEOUT; i++) {
        if (*event != 0u) {
            *event = 0u;
            return true;
        }
    }
    s_stats.timeouts++;
    return false;
}

int32_t sensor_code_to_mv(int16_t code)
{
    if (code < 0) {
        code = 0; /* single-ended inputs can read slightly negative */
    }
    return ((int32_t)code * ADC_FULL_SCALE_MV + ADC_MAX_CODE / 2) / ADC_MAX_CODE;
}

int16_t sensor_ntc_mv_to_decic(int32_t mv)
{
    const size_t n = ARRAY_SIZE(ntc_table);

    /* Table is monotonically decreasing in mV. Clamp outside its range. */
    if (mv >= ntc_table[0].mv) {
        return ntc_table[0].decic;
    }
    if (mv <= ntc_table[n - 1u].mv) {
        return ntc_table[n - 1u].decic;
    }

    size_t lo = 0;
    size_t hi = n - 1u;
    while (hi - lo > 1u) {
        size_t mid = (lo + hi) / 2u;
        if (ntc_table[mid].mv > mv) {
            lo = mid;
        } else {
            hi = mid;
        }
    }

    int32_t mv_span = ntc_table[lo].mv - ntc_table[hi].mv;
    int32_t t_span = ntc_table[hi].decic - ntc_table[lo].decic;
    int32_t offset = ntc_table[lo].mv - mv;
    return (int16_t)(ntc_table[lo].decic + (offset * t_span + mv_span / 2) / mv_span);
}

void sensor_init(uint16_t alpha_q15, uint8_t ma_window)
{
    SAADC_ENABLE = 0u;
    SAADC_RESOLUTION = SAADC_RES_12BIT;
    SAADC_OVERSAMPLE = SAADC_OVERSAMPLE_4X;
    SAADC_SAMPLERATE = 0u; /* sampling triggered by SAMPLE task */

    const uint32_t cfg = SAADC_CFG_GAIN1_6 | SAADC_CFG_REFSEL_INTERNAL |
                         SAADC_CFG_TACQ_10US | SAADC_CFG_BURST;
    SAADC_CH_PSELP(SENSOR_CH_TEMP) = SAADC_PSEL_AIN(0u);
    SAADC_CH_PSELN(SENSOR_CH_TEMP) = 0u;
    SAADC_CH_CONFIG(SENSOR_CH_TEMP) = cfg | SAADC_CFG_TACQ_40US; /* high-Z divider */
    SAADC_CH_PSELP(SENSOR_CH_SUPPLY) = SAADC_PSEL_VDD;
    SAADC_CH_PSELN(SENSOR_CH_SUPPLY) = 0u;
    SAADC_CH_CONFIG(SENSOR_CH_SUPPLY) = cfg;
    SAADC_CH_PSELP(SENSOR_CH_AUX) = SAADC_PSEL_AIN(2u);
    SAADC_CH_PSELN(SENSOR_CH_AUX) = 0u;
    SAADC_CH_CONFIG(SENSOR_CH_AUX) = cfg;
    SAADC_ENABLE = 1u;

    memset(s_readings, 0, sizeof(s_readings));
    memset(&s_stats, 0, sizeof(s_stats));
    sensor_set_filter(alpha_q15, ma_window);
}

bool sensor_calibrate(void)
{
    SAADC_EVENTS_CALDONE = 0u;
    SAADC_TASKS_CALIBRATE = 1u;
    if (!wait_event(&SAADC_EVENTS_CALDONE)) {
        return false;
    }
    s_stats.calibrations++;
    return true;
}

static int16_t to_engineering(sensor_channel_t ch, int16_t code, bool *in_range)
{
    int32_t mv = sensor_code_to_mv(code);

    *in_range = true;
    switch (ch) {
    case SENSOR_CH_TEMP:
        /* Open or shorted thermistor reads at the rails. */
        if (mv > 2990 || mv < 20) {
            *in_range = false;
        }
        return sensor_ntc_mv_to_decic(mv);
    case SENSOR_CH_SUPPLY:
        if (mv < 1700 || mv > 3600) {
            *in_range = false;
        }
        return (int16_t)mv;
    case SENSOR_CH_AUX:
    default:
        return (int16_t)mv;
    }
}

bool sensor_sample(void)
{
    SAADC_RESULT_PTR = (uint32_t)(uintptr_t)s_dma_result;
    SAADC_RESULT_MAXCNT = SENSOR_CH_COUNT;
    SAADC_EVENTS_STARTED = 0u;
    SAADC_EVENTS_END = 0u;
    SAADC_TASKS_START = 1u;
    if (!wait_event(&SAADC_EVENTS_STARTED)) {
        return false;
    }
    SAADC_TASKS_SAMPLE = 1u;
    if (!wait_event(&SAADC_EVENTS_END)) {
        SAADC_TASKS_STOP = 1u;
        return false;
    }

    s_stats.samples++;
    for (unsigned ch = 0; ch < SENSOR_CH_COUNT; ch++) {
        sensor_reading_t *r = &s_readings[ch];
        bool in_range;

        r->raw = s_dma_result[ch];
        r->value = to_engineering((sensor_channel_t)ch, r->raw, &in_range);
        r->valid = in_range;
        if (!in_range) {
            s_stats.out_of_range++;
            continue;
        }
        r->filtered = chain_update(&s_filters[ch], r->value);
    }
    return true;
}

const sensor_reading_t *sensor_reading(sensor_channel_t ch)
{
    return ((unsigned)ch < SENSOR_CH_COUNT) ? &s_readings[ch] : NULL;
}

const sensor_channel_info_t *sensor_channel_info(sensor_channel_t ch)
{
    return ((unsigned)ch < SENSOR_CH_COUNT) ? &channel_info[ch] : NULL;
}

filter_chain_t *sensor_filter(sensor_channel_t ch)
{
    return ((unsigned)ch < SENSOR_CH_COUNT) ? &s_filters[ch] : NULL;
}

const sensor_stats_t *sensor_stats(void)
{
    return &s_stats;
}

void sensor_set_filter(uint16_t alpha_q15, uint8_t ma_window)
{
    for (unsigned ch = 0; ch < SENSOR_CH_COUNT; ch++) {
        /* Temperature moves slowly: a tighter spike limit is safe there. */
        int16_t limit = (ch == SENSOR_CH_TEMP) ? 50 : FILTER_SPIKE_LIMIT_DEFAULT;
        chain_init(&s_filters[ch], alpha_q15, ma_window, limit);
    }
}

void sensor_reset_filters(void)
{
    for (unsigned ch = 0; ch < SENSOR_CH_COUNT; ch++) {
        chain_reset(&s_filters[ch]);
    }
}
