/*
 * twim.c - TWIM0 driver. Transfers are short (a few bytes to a sensor), so
 * they are performed synchronously with a bounded busy-wait.
 */
#include "twim.h"
#include "cpu.h"
#include "nrf52.h"

#define TWIM_TIMEOUT_LOOPS 200000u
#define TWIM_MAX_LEN       255u

static uint32_t s_scl;
static uint32_t s_sda;
static twim_stats_t s_stats;

static void pin_open_drain(uint32_t pin)
{
    /* Input connected, pull-up, standard-0/disconnect-1 drive. */
    P0_PIN_CNF(pin) = GPIO_CNF_PULLUP | (6u << 8);
}

void twim_init(uint32_t scl_pin, uint32_t sda_pin, uint32_t freq_khz)
{
    s_scl = scl_pin;
    s_sda = sda_pin;

    TWIM_ENABLE = 0u;
    pin_open_drain(scl_pin);
    pin_open_drain(sda_pin);
    twim_bus_recover();

    TWIM_PSEL_SCL = scl_pin;
    TWIM_PSEL_SDA = sda_pin;
    if (freq_khz >= 400u) {
        TWIM_FREQUENCY = TWIM_FREQ_K400;
    } else if (freq_khz >= 250u) {
        TWIM_FREQUENCY = TWIM_FREQ_K250;
    } else {
        TWIM_FREQUENCY = TWIM_FREQ_K100;
    }
    TWIM_SHORTS = 0u;
    TWIM_ENABLE = TWIM_ENABLE_ENABLED;
}

static void delay_loops(uint32_t n)
{
    while (n-- > 0u) {
        cpu_nop();
    }
}

void twim_bus_recover(void)
{
    /* A slave interrupted mid-byte may hold SDA low; clock it out with up to
     * nine SCL pulses, then issue a STOP by hand. */
    uint32_t enable = TWIM_ENABLE;
    TWIM_ENABLE = 0u;

    P0_OUTSET = (1u << s_scl) | (1u << s_sda);
    P0_PIN_CNF(s_scl) = GPIO_CNF_DIR_OUTPUT | GPIO_CNF_PULLUP | (6u << 8);
    P0_PIN_CNF(s_sda) = GPIO_CNF_DIR_OUTPUT | GPIO_CNF_PULLUP | (6u << 8);
    delay_loops(400u);

    for (unsigned i = 0; i < 9u && (P0_IN & (1u << s_sda)) == 0u; i++) {
        P0_OUTCLR = 1u << s_scl;
        delay_loops(400u);
        P0_OUTSET = 1u << s_scl;
        delay_loops(400u);
    }
    P0_OUTCLR = 1u << s_sda;
    delay_loops(400u);
    P0_OUTSET = 1u << s_sda;

    pin_open_drain(s_scl);
    pin_open_drain(s_sda);
    s_stats.bus_recoveries++;
    TWIM_ENABLE = enable;
}

static twim_status_t wait_done(void)
{
    for (uint32_t i = 0; i < TWIM_TIMEOUT_LOOPS; i++) {
        if (TWIM_EVENTS_ERROR != 0u) {
            TWIM_EVENTS_ERROR = 0u;
            TWIM_TASKS_STOP = 1u;
            uint32_t src = TWIM_ERRORSRC;
            TWIM_ERRORSRC = src;
            for (uint32_t j = 0; j < TWIM_TIMEOUT_LOOPS && TWIM_EVENTS_STOPPED == 0u; j++) {
            }
            TWIM_EVENTS_STOPPED = 0u;
            s_stats.nacks++;
            if (src & TWIM_ERRORSRC_ANACK) {
                return TWIM_ERR_ANACK;
            }
            if (src & TWIM_ERRORSRC_DNACK) {
                return TWIM_ERR_DNACK;
            }
            return TWIM_ERR_OVERRUN;
        }
        if (TWIM_EVENTS_STOPPED != 0u) {
            TWIM_EVENTS_STOPPED = 0u;
            return TWIM_OK;
        }
        if (TWIM_EVENTS_SUSPENDED != 0u) {
            TWIM_EVENTS_SUSPENDED = 0u;
            return TWIM_OK; /* write without STOP: bus is held */
        }
    }
    s_stats.timeouts++;
    twim_bus_recover();
    return TWIM_ERR_TIMEOUT;
}

static void clear_events(void)
{
    TWIM_EVENTS_STOPPED = 0u;
    TWIM_EVENTS_ERROR = 0u;
    TWIM_EVENTS_SUSPENDED = 0u;
    TWIM_EVENTS_LASTRX = 0u;
    TWIM_EVENTS_LASTTX = 0u;
}

twim_status_t twim_write(uint8_t addr, const uint8_t *data, size_t len, bool stop)
{
    if (len == 0u || len > TWIM_MAX_LEN || addr > 0x7Fu) {
        return TWIM_ERR_PARAM;
    }
    clear_events();
    TWIM_ADDRESS = addr;
    TWIM_TXD_PTR = (uint32_t)(uintptr_t)data;
    TWIM_TXD_MAXCNT = (uint32_t)len;
    TWIM_SHORTS = stop ? TWIM_SHORTS_LASTTX_STOP : (1u << 8); /* LASTTX_SUSPEND */
    TWIM_TASKS_RESUME = 1u;
    TWIM_TASKS_STARTTX = 1u;
    s_stats.transfers++;
    return wait_done();
}

twim_status_t twim_read(uint8_t addr, uint8_t *data, size_t len)
{
    if (len == 0u || len > TWIM_MAX_LEN || addr > 0x7Fu) {
        return TWIM_ERR_PARAM;
    }
    clear_events();
    TWIM_ADDRESS = addr;
    TWIM_RXD_PTR = (uint32_t)(uintptr_t)data;
    TWIM_RXD_MAXCNT = (uint32_t)len;
    TWIM_SHORTS = TWIM_SHORTS_LASTRX_STOP;
    TWIM_TASKS_STARTRX = 1u;
    s_stats.transfers++;
    return wait_done();
}

twim_status_t twim_write_read(uint8_t addr, const uint8_t *tx, size_t tx_len,
                              uint8_t *rx, size_t rx_len)
{
    if (tx_len == 0u || rx_len == 0u || tx_len > TWIM_MAX_LEN ||
        rx_len > TWIM_MAX_LEN || addr > 0x7Fu) {
        return TWIM_ERR_PARAM;
    }
    clear_events();
    TWIM_ADDRESS = addr;
    TWIM_TXD_PTR = (uint32_t)(uintptr_t)tx;
    TWIM_TXD_MAXCNT = (uint32_t)tx_len;
    TWIM_RXD_PTR = (uint32_t)(uintptr_t)rx;
    TWIM_RXD_MAXCNT = (uint32_t)rx_len;
    /* Repeated start: TX then RX, then STOP, all in hardware. */
    TWIM_SHORTS = TWIM_SHORTS_LASTTX_STARTRX | TWIM_SHORTS_LASTRX_STOP;
    TWIM_TASKS_STARTTX = 1u;
    s_stats.transfers++;
    return wait_done();
}

unsigned twim_scan(void (*cb)(uint8_t addr, void *ctx), void *ctx)
{
    static uint8_t dummy;
    unsigned found = 0;

    for (uint8_t addr = 0x08u; addr < 0x78u; addr++) {
        if (twim_read(addr, &dummy, 1u) == TWIM_OK) {
            found++;
            if (cb != NULL) {
                cb(addr, ctx);
            }
        }
    }
    return found;
}

const char *twim_status_text(twim_status_t st)
{
    switch (st) {
    case TWIM_OK:          return "ok";
    case TWIM_ERR_ANACK:   return "address nack";
    case TWIM_ERR_DNACK:   return "data nack";
    case TWIM_ERR_OVERRUN: return "overrun";
    case TWIM_ERR_TIMEOUT: return "timeout";
    case TWIM_ERR_PARAM:   return "bad parameter";
    default:               return "error";
    }
}

const twim_stats_t *twim_stats(void)
{
    return &s_stats;
}
