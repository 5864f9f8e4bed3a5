/*
 * board.c - board support for the nRF52840-class node.
 */
#include "board.h"
#include "fw_config.h"
#include "nrf52.h"

#define BUTTON_DEBOUNCE_MS 30u
#define HFXO_TIMEOUT_LOOPS 200000u

static const uint8_t led_pins[LED_COUNT] = {
    LED1_PIN, LED2_PIN, LED3_PIN, LED4_PIN
};

static reset_info_t s_reset;

static struct {
    bool stable_pressed;
    bool last_raw;
    uint32_t last_change_ms;
} s_button;

static const char *reset_reason_text(uint32_t reas)
{
    if (reas == 0u) {
        return "power-on";
    }
    if (reas & RESETREAS_DOG) {
        return "watchdog";
    }
    if (reas & RESETREAS_LOCKUP) {
        return "lockup";
    }
    if (reas & RESETREAS_SREQ) {
        return "soft-reset";
    }
    if (reas & RESETREAS_RESETPIN) {
        return "reset-pin";
    }
    if (reas & RESETREAS_OFF) {
        return "wake-from-off";
    }
    if (reas & RESETREAS_DIF) {
        return "debug-interface";
    }
    return "other";
}

void board_clock_init(void)
{
    uint32_t loops = 0;

    CLOCK_EVENTS_HFCLKSTARTED = 0u;
    CLOCK_TASKS_HFCLKSTART = 1u;
    while (CLOCK_EVENTS_HFCLKSTARTED == 0u && loops < HFXO_TIMEOUT_LOOPS) {
        loops++;
    }

    CLOCK_LFCLKSRC = CLOCK_LFCLKSRC_XTAL;
    CLOCK_EVENTS_LFCLKSTARTED = 0u;
    CLOCK_TASKS_LFCLKSTART = 1u;
}

bool board_hfxo_running(void)
{
    /* HFCLKSTAT: SRC bit 0 = Xtal, STATE bit 16 = running */
    return (CLOCK_HFCLKSTAT & 0x10001u) == 0x10001u;
}

void board_init(void)
{
    s_reset.raw = POWER_RESETREAS;
    s_reset.text = reset_reason_text(s_reset.raw);
    POWER_RESETREAS = s_reset.raw; /* write-1-to-clear */

    POWER_DCDCEN = 1u;
    board_clock_init();

    /* Enable the cycle counter used for task profiling. */
    DEMCR |= DEMCR_TRCENA;
    DWT_CYCCNT = 0u;
    DWT_CTRL |= DWT_CTRL_CYCCNTENA;

    /* Trap divide-by-zero and route faults to their own handlers. */
    SCB_CCR |= SCB_CCR_DIV_0_TRP;
    SCB_SHCSR |= SCB_SHCSR_USGFAULTENA | SCB_SHCSR_BUSFAULTENA | SCB_SHCSR_MEMFAULTENA;

    for (unsigned i = 0; i < LED_COUNT; i++) {
        P0_PIN_CNF(led_pins[i]) = GPIO_CNF_DIR_OUTPUT | GPIO_CNF_INPUT_DISC;
        P0_OUTSET = 1u << led_pins[i]; /* active low: off */
    }
    P0_PIN_CNF(BUTTON1_PIN) = GPIO_CNF_PULLUP;
    s_button.stable_pressed = false;
    s_button.last_raw = false;
    s_button.last_change_ms = 0u;
}

void board_led_set(board_led_t led, bool on)
{
    if ((unsigned)led >= LED_COUNT) {
        return;
    }
    if (on) {
        P0_OUTCLR = 1u << led_pins[led];
    } else {
        P0_OUTSET = 1u << led_pins[led];
    }
}

bool board_led_get(board_led_t led)
{
    if ((unsigned)led >= LED_COUNT) {
        return false;
    }
    return (P0_OUT & (1u << led_pins[led])) == 0u;
}

void board_led_toggle(board_led_t led)
{
    board_led_set(led, !board_led_get(led));
}

bool board_button_pressed(void)
{
    return (P0_IN & (1u << BUTTON1_PIN)) == 0u;
}

bool board_button_poll(uint32_t now_ms)
{
    bool raw = board_button_pressed();

    if (raw != s_button.last_raw) {
        s_button.last_raw = raw;
        s_button.last_change_ms = now_ms;
        return false;
    }
    if (raw != s_button.stable_pressed &&
        (now_ms - s_button.last_change_ms) >= BUTTON_DEBOUNCE_MS) {
        s_button.stable_pressed = raw;
        return raw;
    }
    return false;
}

void board_wdt_start(uint32_t timeout_s)
{
    if (WDT_RUNSTATUS & 1u) {
        return; /* cannot be reconfigured once running */
    }
    WDT_CONFIG = WDT_CONFIG_SLEEP_RUN | WDT_CONFIG_HALT_PAUSE;
    WDT_CRV = timeout_s * 32768u - 1u;
    WDT_RREN = 1u;
    WDT_TASKS_START = 1u;
}

void board_wdt_feed(void)
{
    WDT_RR(0) = WDT_RELOAD_VALUE;
}

bool board_wdt_running(void)
{
    return (WDT_RUNSTATUS & 1u) != 0u;
}

const reset_info_t *board_reset_info(void)
{
    return &s_reset;
}

void board_device_id(uint32_t id[2])
{
    id[0] = FICR_DEVICEID(0);
    id[1] = FICR_DEVICEID(1);
}

uint32_t board_flash_size_kib(void)
{
    return FICR_INFO_FLASH;
}

uint32_t board_ram_size_kib(void)
{
    return FICR_INFO_RAM;
}

uint32_t board_random_u32(void)
{
    uint32_t value = 0;

    RNG_CONFIG = 1u; /* bias correction */
    RNG_TASKS_START = 1u;
    for (unsigned i = 0; i < 4u; i++) {
        uint32_t guard = 0;
        RNG_EVENTS_VALRDY = 0u;
        while (RNG_EVENTS_VALRDY == 0u && guard++ < 10000u) {
        }
        value = (value << 8) | (RNG_VALUE & 0xFFu);
    }
    RNG_TASKS_STOP = 1u;
    return value;
}

int32_t board_die_temp_centi(void)
{
    uint32_t guard = 0;
    int32_t quarter_deg;

    TEMP_EVENTS_DATARDY = 0u;
    TEMP_TASKS_START = 1u;
    while (TEMP_EVENTS_DATARDY == 0u && guard++ < 100000u) {
    }
    quarter_deg = (int32_t)TEMP_TEMP;
    TEMP_TASKS_STOP = 1u;
    return quarter_deg * 25;
}

void board_system_reset(void)
{
    cpu_dsb();
    SCB_AIRCR = SCB_AIRCR_VECTKEY | (SCB_AIRCR & (7u << 8)) | SCB_AIRCR_SYSRESETREQ;
    cpu_dsb();
    for (;;) {
        cpu_nop();
    }
}
