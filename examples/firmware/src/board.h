/*
 * board.h - clocks, GPIO, LEDs, button, watchdog and reset bookkeeping.
 */
#ifndef BOARD_H
#define BOARD_H

#include <stdbool.h>
#include <stdint.h>

typedef enum {
    LED_STATUS = 0,
    LED_ACTIVITY,
    LED_ERROR,
    LED_AUX,
    LED_COUNT
} board_led_t;

typedef struct {
    uint32_t raw;          /* POWER.RESETREAS as read at boot */
    const char *text;      /* short human readable cause */
} reset_info_t;

void     board_init(void);
void     board_clock_init(void);
bool     board_hfxo_running(void);

void     board_led_set(board_led_t led, bool on);
void     board_led_toggle(board_led_t led);
bool     board_led_get(board_led_t led);

bool     board_button_pressed(void);
/* Debounced edge detector; call periodically. Returns true once per press. */
bool     board_button_poll(uint32_t now_ms);

void     board_wdt_start(uint32_t timeout_s);
void     board_wdt_feed(void);
bool     board_wdt_running(void);

const reset_info_t *board_reset_info(void);
void     board_device_id(uint32_t id[2]);
uint32_t board_flash_size_kib(void);
uint32_t board_ram_size_kib(void);
uint32_t board_random_u32(void);
int32_t  board_die_temp_centi(void);

__attribute__((noreturn)) void board_system_reset(void);

#endif /* BOARD_H */
