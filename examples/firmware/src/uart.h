/*
 * uart.h - interrupt/EasyDMA driven console UART (UARTE0).
 */
#ifndef UART_H
#define UART_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint32_t baud;
    bool hw_flow_control;
    bool parity_even;
} uart_config_t;

typedef struct {
    uint32_t tx_bytes;
    uint32_t rx_bytes;
    uint32_t tx_dropped;
    uint32_t rx_overruns;
    uint32_t errors;
    uint32_t last_errorsrc;
    uint32_t dma_starts;
    uint16_t tx_high_water;
    uint16_t rx_high_water;
} uart_stats_t;

bool     uart_init(const uart_config_t *cfg);
bool     uart_set_baud(uint32_t baud);
uint32_t uart_get_baud(void);
bool     uart_baud_supported(uint32_t baud);
void     uart_list_bauds(void (*cb)(uint32_t baud, void *ctx), void *ctx);

size_t   uart_write(const void *data, size_t len);
void     uart_putc(char c);
void     uart_puts(const char *s);
int      uart_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

bool     uart_getc(char *c);
size_t   uart_rx_available(void);

/* Busy-waits (with timeout) until everything queued has been sent. */
bool     uart_flush(uint32_t timeout_ms);
/* Polled, unbuffered output for fault handlers; never uses interrupts. */
void     uart_panic_write(const char *s);

void     uart_get_stats(uart_stats_t *out);
void     uart_clear_stats(void);

void     UARTE0_UART0_IRQHandler(void);

#endif /* UART_H */
