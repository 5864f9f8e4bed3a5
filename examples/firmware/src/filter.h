/*
 * filter.h - fixed-point signal conditioning for sensor channels.
 *
 * Samples are signed 16-bit values in channel units (millivolts, or
 * centi-degrees). Coefficients are Q15.
 */
#ifndef FILTER_H
#define FILTER_H

#include <stdbool.h>
#include <stdint.h>

#include "fw_config.h"

#define Q15_ONE               32767
#define FILTER_MA_MAX_WINDOW  32u

/*
 * Default IIR smoothing factor (Q15). v1.1 used 0.1; v1.2 settles a little
 * faster (0.125) now that the rounding fix removed the steady-state error.
 */
#if FW_VERSION_MINOR >= 2
#define FILTER_IIR_ALPHA_DEFAULT 4096u   /* 0.125 */
#else
#define FILTER_IIR_ALPHA_DEFAULT 3277u   /* 0.1 */
#endif

#define FILTER_MA_WINDOW_DEFAULT   8u
#define FILTER_SPIKE_LIMIT_DEFAULT 400   /* channel units */

typedef struct {
    int32_t  state;       /* see filter.c for the fixed-point format */
    uint16_t alpha_q15;
    bool     primed;
} iir_lp_t;

typedef struct {
    int16_t  samples[FILTER_MA_MAX_WINDOW];
    int32_t  sum;
    uint8_t  window;
    uint8_t  index;
    uint8_t  filled;
} moving_avg_t;

typedef struct {
    int16_t  hist[3];
    uint8_t  filled;
} median3_t;

typedef struct {
    uint32_t count;
    int32_t  min;
    int32_t  max;
    int64_t  sum;
    uint64_t sum_sq;
} running_stats_t;

typedef struct {
    median3_t      median;
    moving_avg_t   avg;
    iir_lp_t       iir;
    int16_t        spike_limit;   /* reject steps larger than this; 0 = off */
    int16_t        last_output;
    uint32_t       spikes_rejected;
    running_stats_t raw_stats;
} filter_chain_t;

void    iir_init(iir_lp_t *f, uint16_t alpha_q15);
void    iir_reset(iir_lp_t *f);
int16_t iir_update(iir_lp_t *f, int16_t x);
int16_t iir_output(const iir_lp_t *f);

bool    ma_init(moving_avg_t *m, uint8_t window);
int16_t ma_update(moving_avg_t *m, int16_t x);
int16_t ma_output(const moving_avg_t *m);

void    median3_init(median3_t *m);
int16_t median3_update(median3_t *m, int16_t x);

void    stats_reset(running_stats_t *s);
void    stats_add(running_stats_t *s, int32_t x);
int32_t stats_mean(const running_stats_t *s);
uint32_t stats_stddev(const running_stats_t *s);

void    chain_init(filter_chain_t *c, uint16_t alpha_q15, uint8_t ma_window,
                   int16_t spike_limit);
int16_t chain_update(filter_chain_t *c, int16_t x);
void    chain_reset(filter_chain_t *c);

/* Convert between Q15 and thousandths, for the command line. */
uint16_t q15_from_milli(uint32_t milli);
uint32_t q15_to_milli(uint16_t q15);

#endif /* FILTER_H */
