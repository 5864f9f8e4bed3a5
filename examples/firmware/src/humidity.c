/*
 * humidity.c - SHT3x-style sensor: 16-bit commands, CRC-8 protected words.
 */
#include "humidity.h"
#include "crc.h"
#include "sched.h"
#include "twim.h"

#define CMD_MEASURE_HIGH_NOSTRETCH 0x2400u
#define CMD_SOFT_RESET             0x30A2u
#define CMD_HEATER_ON              0x306Du
#define CMD_HEATER_OFF             0x3066u
#define CMD_READ_SERIAL            0x3780u
#define CMD_CLEAR_STATUS           0x3041u

#define CONVERSION_TIME_MS 16u
#define RESET_TIME_MS      2u

typedef enum {
    RH_IDLE,
    RH_CONVERTING,
} rh_state_t;

static uint8_t s_addr;
static rh_state_t s_state;
static uint32_t s_started_ms;
static humidity_sample_t s_latest;
static humidity_info_t s_info;

static bool send_command(uint16_t cmd)
{
    uint8_t buf[2] = { (uint8_t)(cmd >> 8), (uint8_t)cmd };
    if (twim_write(s_addr, buf, sizeof(buf), true) != TWIM_OK) {
        s_info.bus_errors++;
        return false;
    }
    return true;
}

/* Reads `words` CRC-protected 16-bit words. */
static bool read_words(uint16_t *out, unsigned words)
{
    uint8_t buf[6];

    if (words == 0u || words > 2u) {
        return false;
    }
    if (twim_read(s_addr, buf, words * 3u) != TWIM_OK) {
        s_info.bus_errors++;
        return false;
    }
    for (unsigned i = 0; i < words; i++) {
        const uint8_t *w = &buf[3u * i];
        if (crc8_sensor(w, 2u) != w[2]) {
            s_info.crc_errors++;
            return false;
        }
        out[i] = (uint16_t)(((uint16_t)w[0] << 8) | w[1]);
    }
    return true;
}

bool humidity_init(uint8_t i2c_addr)
{
    uint16_t serial[2];

    s_addr = i2c_addr;
    s_state = RH_IDLE;
    s_latest.valid = false;
    s_info.present = false;

    if (!humidity_soft_reset()) {
        return false;
    }
    if (send_command(CMD_READ_SERIAL)) {
        systick_delay_ms(1u);
        if (read_words(serial, 2u)) {
            s_info.serial_hi = serial[0];
            s_info.serial_lo = serial[1];
        }
    }
    send_command(CMD_CLEAR_STATUS);
    s_info.present = true;
    return true;
}

bool humidity_soft_reset(void)
{
    if (!send_command(CMD_SOFT_RESET)) {
        return false;
    }
    systick_delay_ms(RESET_TIME_MS);
    s_info.heater_on = false;
    s_state = RH_IDLE;
    return true;
}

bool humidity_set_heater(bool on)
{
    if (!send_command(on ? CMD_HEATER_ON : CMD_HEATER_OFF)) {
        return false;
    }
    s_info.heater_on = on;
    return true;
}

static void convert(uint16_t raw_t, uint16_t raw_rh, uint32_t now_ms)
{
    /* T = -45 + 175 * raw / 65535 ; RH = 100 * raw / 65535 */
    s_latest.temp_centi = (int16_t)(-4500 + (int32_t)(((uint32_t)raw_t * 17500u + 32767u) / 65535u));
    s_latest.rh_centi = (uint16_t)(((uint32_t)raw_rh * 10000u + 32767u) / 65535u);
    s_latest.timestamp_ms = now_ms;
    s_latest.valid = true;
    s_info.measurements++;
}

void humidity_poll(uint32_t now_ms)
{
    uint16_t words[2];

    if (!s_info.present) {
        return;
    }
    switch (s_state) {
    case RH_IDLE:
        if (send_command(CMD_MEASURE_HIGH_NOSTRETCH)) {
            s_started_ms = now_ms;
            s_state = RH_CONVERTING;
        }
        break;
    case RH_CONVERTING:
        if ((now_ms - s_started_ms) < CONVERSION_TIME_MS) {
            break;
        }
        if (read_words(words, 2u)) {
            convert(words[0], words[1], now_ms);
        } else {
            s_latest.valid = false;
        }
        s_state = RH_IDLE;
        break;
    default:
        s_state = RH_IDLE;
        break;
    }
}

const humidity_sample_t *humidity_latest(void)
{
    return &s_latest;
}

const humidity_info_t *humidity_info(void)
{
    return &s_info;
}

/*
 * Magnus approximation in fixed point. gamma = ln(RH/100) + b*T/(c+T) with
 * b = 17.62, c = 243.12 degC; dew = c*gamma/(b-gamma). ln() is evaluated
 * with a small table over the RH range plus linear interpolation.
 */
static int32_t ln_percent_q16(uint32_t rh_centi)
{
    /* ln(x/100) * 65536 for x = 5, 10, ..., 100 %RH */
    static const int32_t table[] = {
        -196328, -150902, -124330, -105476, -90852, -78904, -68801, -60050,
        -52331,  -45426,  -39180,  -33477,  -28232,  -23375,  -18854,
        -14624,  -10651,   -6905,   -3362,       0,
    };
    if (rh_centi < 500u) {
        rh_centi = 500u;
    }
    if (rh_centi >= 10000u) {
        return 0;
    }
    uint32_t idx = rh_centi / 500u - 1u;
    uint32_t frac = rh_centi % 500u;
    int32_t a = table[idx];
    int32_t b = table[idx + 1u];
    return a + (int32_t)(((int64_t)(b - a) * frac) / 500);
}

int32_t humidity_dew_point_centi(int32_t temp_centi, uint32_t rh_centi)
{
    const int64_t b_q16 = 1154744;   /* 17.62 * 65536 */
    const int32_t c_centi = 24312;   /* 243.12 degC */

    if (temp_centi <= -c_centi) {
        return temp_centi;
    }
    int64_t gamma = ln_percent_q16(rh_centi) +
                    (b_q16 * temp_centi) / (c_centi + temp_centi);
    if (gamma >= b_q16) {
        return temp_centi;
    }
    return (int32_t)(((int64_t)c_centi * gamma) / (b_q16 - gamma));
}
