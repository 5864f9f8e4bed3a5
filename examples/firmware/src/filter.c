/*
 * filter.c - median, moving average and single-pole IIR low-pass filters.
 */
#include "filter.h"
#include "fwlib.h"

/*
 * Single-pole low-pass: y[n] = y[n-1] + alpha * (x[n] - y[n-1]).
 *
 * v1.1 kept the state at input resolution and truncated the product with an
 * arithmetic shift. Because the shift floors towards minus infinity, a small
 * positive error is dropped while a small negative one becomes -1, so the
 * output settled up to 1/alpha counts below a constant input (about -10 mV
 * at alpha = 0.1) and slowly crept downwards on noisy inputs.
 *
 * v1.2 carries IIR_FRAC_BITS extra fractional bits in the state and rounds
 * the product to nearest, which removes the bias.
 */
#if FW_VERSION_MINOR >= 2
#define IIR_FRAC_BITS 8
#else
#define IIR_FRAC_BITS 0
#endif

void iir_init(iir_lp_t *f, uint16_t alpha_q15)
{
    if (alpha_q15 == 0u || alpha_q15 > Q15_ONE) {
        alpha_q15 = FILTER_IIR_ALPHA_DEFAULT;
    }
    f->alpha_q15 = alpha_q15;
    iir_reset(f);
}

void iir_reset(iir_lp_t *f)
{
    f->state = 0;
    f->primed = false;
}

int16_t iir_update(iir_lp_t *f, int16_t x)
{
    int32_t xs = (int32_t)x * (1 << IIR_FRAC_BITS);

    if (!f->primed) {
        /* Start from the first sample rather than ramping up from zero. */
        f->state = xs;
        f->primed = true;
        return x;
    }

    int32_t err = xs - f->state;
#if FW_VERSION_MINOR >= 2
    int64_t prod = (int64_t)err * f->alpha_q15;
    prod += (prod >= 0) ? (1 << 14) : -(1 << 14);
    f->state += (int32_t)(prod / 32768);
#else
    f->state += (err * (int32_t)f->alpha_q15) >> 15;
#endif
    return iir_output(f);
}

int16_t iir_output(const iir_lp_t *f)
{
#if IIR_FRAC_BITS > 0
    int32_t half = 1 << (IIR_FRAC_BITS - 1);
    int32_t y = (f->state >= 0) ? (f->state + half) >> IIR_FRAC_BITS
                                : -((-f->state + half) >> IIR_FRAC_BITS);
    return (int16_t)fw_clamp_i32(y, INT16_MIN, INT16_MAX);
#else
    return (int16_t)fw_clamp_i32(f->state, INT16_MIN, INT16_MAX);
#endif
}

bool ma_init(moving_avg_t *m, uint8_t window)
{
    if (window == 0u || window > FILTER_MA_MAX_WINDOW) {
        return false;
    }
    memset(m, 0, sizeof(*m));
    m->window = window;
    return true;
}

int16_t ma_update(moving_avg_t *m, int16_t x)
{
    if (m->filled < m->window) {
        m->filled++;
    } else {
        m->sum -= m->samples[m->index];
    }
    m->samples[m->index] = x;
    m->sum += x;
    m->index = (uint8_t)((m->index + 1u) % m->window);
    return ma_output(m);
}

int16_t ma_output(const moving_avg_t *m)
{
    int32_t n = m->filled;
    if (n == 0) {
        return 0;
    }
    /* Round half away from zero. */
    int32_t q = (m->sum >= 0) ? (m->sum + n / 2) / n : (m->sum - n / 2) / n;
    return (int16_t)q;
}

void median3_init(median3_t *m)
{
    memset(m, 0, sizeof(*m));
}

static int16_t median_of_three(int16_t a, int16_t b, int16_t c)
{
    if (a > b) {
        int16_t t = a;
        a = b;
        b = t;
    }
    if (b > c) {
        b = c;
    }
    return (a > b) ? a : b;
}

int16_t median3_update(median3_t *m, int16_t x)
{
    m->hist[0] = m->hist[1];
    m->hist[1] = m->hist[2];
    m->hist[2] = x;
    if (m->filled < 3u) {
        m->filled++;
        return x;
    }
    return median_of_three(m->hist[0], m->hist[1], m->hist[2]);
}

void stats_reset(running_stats_t *s)
{
    s->count = 0;
    s->min = INT32_MAX;
    s->max = INT32_MIN;
    s->sum = 0;
    s->sum_sq = 0;
}

void stats_add(running_stats_t *s, int32_t x)
{
    if (s->count == UINT32_MAX) {
        return;
    }
    s->count++;
    if (x < s->min) {
        s->min = x;
    }
    if (x > s->max) {
        s->max = x;
    }
    s->sum += x;
    s->sum_sq += (uint64_t)((int64_t)x * x);
}

int32_t stats_mean(const running_stats_t *s)
{
    if (s->count == 0u) {
        return 0;
    }
    return (int32_t)(s->sum / (int64_t)s->count);
}

uint32_t stats_stddev(const running_stats_t *s)
{
    if (s->count < 2u) {
        return 0;
    }
    /* var = (sum_sq - sum^2/n) / (n - 1) */
    int64_t n = (int64_t)s->count;
    int64_t mean_sq_term = (s->sum * s->sum) / n;
    int64_t num = (int64_t)s->sum_sq - mean_sq_term;
    if (num <= 0) {
        return 0;
    }
    return fw_isqrt64((uint64_t)(num / (n - 1)));
}

void chain_init(filter_chain_t *c, uint16_t alpha_q15, uint8_t ma_window,
                int16_t spike_limit)
{
    median3_init(&c->median);
    if (!ma_init(&c->avg, ma_window)) {
        ma_init(&c->avg, FILTER_MA_WINDOW_DEFAULT);
    }
    iir_init(&c->iir, alpha_q15);
    c->spike_limit = spike_limit;
    c->last_output = 0;
    c->spikes_rejected = 0;
    stats_reset(&c->raw_stats);
}

void chain_reset(filter_chain_t *c)
{
    chain_init(c, c->iir.alpha_q15, c->avg.window, c->spike_limit);
}

int16_t chain_update(filter_chain_t *c, int16_t x)
{
    stats_add(&c->raw_stats, x);

    /* Spike rejection: a sample that jumps further than spike_limit from
     * the current output is replaced by the current output, unless the
     * median of the last three agrees that the level really moved. */
    int16_t med = median3_update(&c->median, x);
    if (c->spike_limit > 0 && c->iir.primed) {
        int32_t step = (int32_t)x - c->last_output;
        if (step > c->spike_limit || step < -c->spike_limit) {
            int32_t med_step = (int32_t)med - c->last_output;
            if (med_step <= c->spike_limit && med_step >= -c->spike_limit) {
                c->spikes_rejected++;
                x = med;
            }
        }
    }

    int16_t avg = ma_update(&c->avg, x);
    c->last_output = iir_update(&c->iir, avg);
    return c->last_output;
}

uint16_t q15_from_milli(uint32_t milli)
{
    if (milli >= 1000u) {
        return Q15_ONE;
    }
    return (uint16_t)((milli * 32768u + 500u) / 1000u);
}

uint32_t q15_to_milli(uint16_t q15)
{
    return ((uint32_t)q15 * 1000u + 16384u) / 32768u;
}
