/*
 * uart.c - UARTE0 console driver.
 *
 * TX: bytes are queued in a ring buffer; the largest contiguous chunk is
 * handed to EasyDMA and the ENDTX interrupt retires it and starts the next.
 * RX: a one-byte DMA buffer with the ENDRX->STARTRX short; every ENDRX moves
 * the byte into the RX ring buffer.
 */
#include "uart.h"
#include "cpu.h"
#include "fmt.h"
#include "fw_config.h"
#include "nrf52.h"
#include "ringbuf.h"
#include "sched.h"

#include <stdarg.h>

#define UART_IRQ_PRIORITY 3u
#define TX_DMA_MAX_CHUNK  255u  /* TXD.MAXCNT is 8 bits wide on some parts */

typedef struct {
    uint32_t baud;
    uint32_t reg;
} baud_entry_t;

static const baud_entry_t baud_table[] = {
    {    1200u, 0x0004F000u },
    {    2400u, 0x0009D000u },
    {    4800u, 0x0013B000u },
    {    9600u, 0x00275000u },
    {   14400u, 0x003AF000u },
    {   19200u, 0x004EA000u },
    {   28800u, 0x0075C000u },
    {   38400u, 0x009D0000u },
    {   57600u, 0x00EB0000u },
    {   76800u, 0x013A9000u },
    {  115200u, 0x01D60000u },
    {  230400u, 0x03B00000u },
    {  250000u, 0x04000000u },
    {  460800u, 0x07400000u },
    {  921600u, 0x0F000000u },
    { 1000000u, 0x10000000u },
};

static uint8_t s_tx_storage[UART_TX_BUF_SIZE];
static uint8_t s_rx_storage[UART_RX_BUF_SIZE];
static ringbuf_t s_tx;
static ringbuf_t s_rx;

static volatile uint8_t s_rx_dma_byte;
static volatile bool s_tx_busy;
static volatile size_t s_tx_inflight;
static uint32_t s_baud;
static bool s_initialised;
static uart_stats_t s_stats;

static const baud_entry_t *find_baud(uint32_t baud)
{
    for (size_t i = 0; i < ARRAY_SIZE(baud_table); i++) {
        if (baud_table[i].baud == baud) {
            return &baud_table[i];
        }
    }
    return NULL;
}

bool uart_baud_supported(uint32_t baud)
{
    return find_baud(baud) != NULL;
}

void uart_list_bauds(void (*cb)(uint32_t baud, void *ctx), void *ctx)
{
    for (size_t i = 0; i < ARRAY_SIZE(baud_table); i++) {
        cb(baud_table[i].baud, ctx);
    }
}

/* Must be called with the UART interrupt masked or from the ISR. */
static void tx_kick(void)
{
    const uint8_t *chunk;
    size_t len;

    if (s_tx_busy) {
        return;
    }
    len = rb_linear_read(&s_tx, &chunk);
    if (len == 0u) {
        return;
    }
    if (len > TX_DMA_MAX_CHUNK) {
        len = TX_DMA_MAX_CHUNK;
    }
    s_tx_inflight = len;
    s_tx_busy = true;
    s_stats.dma_starts++;
    UARTE_REG(UARTE_EVENTS_ENDTX) = 0u;
    UARTE_REG(UARTE_TXD_PTR) = (uint32_t)(uintptr_t)chunk;
    UARTE_REG(UARTE_TXD_MAXCNT) = (uint32_t)len;
    UARTE_REG(UARTE_TASKS_STARTTX) = 1u;
}

static void rx_start(void)
{
    UARTE_REG(UARTE_RXD_PTR) = (uint32_t)(uintptr_t)&s_rx_dma_byte;
    UARTE_REG(UARTE_RXD_MAXCNT) = 1u;
    UARTE_REG(UARTE_EVENTS_ENDRX) = 0u;
    UARTE_REG(UARTE_TASKS_STARTRX) = 1u;
}

bool uart_init(const uart_config_t *cfg)
{
    const baud_entry_t *b = find_baud(cfg->baud);
    uint32_t config = 0;

    if (b == NULL) {
        return false;
    }
    nvic_disable_irq(IRQ_UARTE0);

    rb_init(&s_tx, s_tx_storage, sizeof(s_tx_storage));
    rb_init(&s_rx, s_rx_storage, sizeof(s_rx_storage));
    s_tx_busy = false;
    s_tx_inflight = 0;

    /* TX idles high; configure pins before enabling the peripheral. */
    P0_OUTSET = 1u << UART_TX_PIN;
    P0_PIN_CNF(UART_TX_PIN) = GPIO_CNF_DIR_OUTPUT | GPIO_CNF_INPUT_DISC;
    P0_PIN_CNF(UART_RX_PIN) = GPIO_CNF_PULLUP;

    UARTE_REG(UARTE_ENABLE) = 0u;
    UARTE_REG(UARTE_PSEL_TXD) = UART_TX_PIN;
    UARTE_REG(UARTE_PSEL_RXD) = UART_RX_PIN;
    if (cfg->hw_flow_control) {
        UARTE_REG(UARTE_PSEL_RTS) = UART_RTS_PIN;
        UARTE_REG(UARTE_PSEL_CTS) = UART_CTS_PIN;
        config |= UARTE_CONFIG_HWFC;
    } else {
        UARTE_REG(UARTE_PSEL_RTS) = UARTE_PSEL_DISCONNECTED;
        UARTE_REG(UARTE_PSEL_CTS) = UARTE_PSEL_DISCONNECTED;
    }
    if (cfg->parity_even) {
        config |= UARTE_CONFIG_PARITY_EVEN;
    }
    UARTE_REG(UARTE_CONFIG) = config;
    UARTE_REG(UARTE_BAUDRATE) = b->reg;
    UARTE_REG(UARTE_SHORTS) = UARTE_SHORTS_ENDRX_STARTRX;
    UARTE_REG(UARTE_ERRORSRC) = 0xFu;
    UARTE_REG(UARTE_INTENCLR) = 0xFFFFFFFFu;
    UARTE_REG(UARTE_INTENSET) = UARTE_INT_ENDRX | UARTE_INT_ENDTX | UARTE_INT_ERROR;
    UARTE_REG(UARTE_ENABLE) = UARTE_ENABLE_ENABLED;

    s_baud = cfg->baud;
    rx_start();

    nvic_clear_pending(IRQ_UARTE0);
    nvic_set_priority(IRQ_UARTE0, UART_IRQ_PRIORITY);
    nvic_enable_irq(IRQ_UARTE0);
    s_initialised = true;
    return true;
}

bool uart_set_baud(uint32_t baud)
{
    const baud_entry_t *b = find_baud(baud);

    if (b == NULL) {
        return false;
    }
    uart_flush(200u);
    UARTE_REG(UARTE_BAUDRATE) = b->reg;
    s_baud = baud;
    return true;
}

uint32_t uart_get_baud(void)
{
    return s_baud;
}

size_t uart_write(const void *data, size_t len)
{
    size_t written;

    if (!s_initialised) {
        return 0u;
    }
    nvic_disable_irq(IRQ_UARTE0);
    written = rb_write(&s_tx, data, len);
    tx_kick();
    nvic_enable_irq(IRQ_UARTE0);

    s_stats.tx_dropped += (uint32_t)(len - written);
    return written;
}

void uart_putc(char c)
{
    uart_write(&c, 1u);
}

void uart_puts(const char *s)
{
    size_t n = 0;
    while (s[n] != '\0') {
        n++;
    }
    uart_write(s, n);
}

typedef struct {
    char buf[64];
    size_t len;
} uart_sink_t;

static void uart_sink(void *ctx, char c)
{
    uart_sink_t *s = ctx;
    s->buf[s->len++] = c;
    if (s->len == sizeof(s->buf)) {
        uart_write(s->buf, s->len);
        s->len = 0;
    }
}

int uart_printf(const char *fmt, ...)
{
    uart_sink_t sink;
    va_list ap;
    int n;

    sink.len = 0;
    va_start(ap, fmt);
    n = fmt_vformat(uart_sink, &sink, fmt, ap);
    va_end(ap);
    if (sink.len > 0u) {
        uart_write(sink.buf, sink.len);
    }
    return n;
}

bool uart_getc(char *c)
{
    uint8_t b;
    if (!rb_get(&s_rx, &b)) {
        return false;
    }
    *c = (char)b;
    return true;
}

size_t uart_rx_available(void)
{
    return rb_count(&s_rx);
}

bool uart_flush(uint32_t timeout_ms)
{
    uint32_t start = systick_ms();

    while (!rb_is_empty(&s_tx) || s_tx_busy) {
        if ((systick_ms() - start) >= timeout_ms) {
            return false;
        }
        cpu_wfi();
    }
    return true;
}

void uart_panic_write(const char *s)
{
    static uint8_t panic_buf[32];

    /* Take the peripheral over: stop interrupts, then send in small polled
     * DMA transfers from a private buffer. */
    UARTE_REG(UARTE_INTENCLR) = 0xFFFFFFFFu;
    while (*s != '\0') {
        size_t n = 0;
        while (n < sizeof(panic_buf) && s[n] != '\0') {
            panic_buf[n] = (uint8_t)s[n];
            n++;
        }
        s += n;
        UARTE_REG(UARTE_EVENTS_ENDTX) = 0u;
        UARTE_REG(UARTE_TXD_PTR) = (uint32_t)(uintptr_t)panic_buf;
        UARTE_REG(UARTE_TXD_MAXCNT) = (uint32_t)n;
        UARTE_REG(UARTE_TASKS_STARTTX) = 1u;
        for (uint32_t guard = 0; guard < 1000000u; guard++) {
            if (UARTE_REG(UARTE_EVENTS_ENDTX) != 0u) {
                break;
            }
        }
    }
}

void uart_get_stats(uart_stats_t *out)
{
    CRITICAL_SECTION_ENTER();
    *out = s_stats;
    out->tx_high_water = s_tx.high_water;
    out->rx_high_water = s_rx.high_water;
    CRITICAL_SECTION_EXIT();
}

void uart_clear_stats(void)
{
    CRITICAL_SECTION_ENTER();
    uint32_t dma = s_stats.dma_starts;
    s_stats = (uart_stats_t){ .dma_starts = dma };
    s_tx.high_water = 0;
    s_rx.high_water = 0;
    CRITICAL_SECTION_EXIT();
}

void UARTE0_UART0_IRQHandler(void)
{
    if (UARTE_REG(UARTE_EVENTS_ERROR) != 0u) {
        UARTE_REG(UARTE_EVENTS_ERROR) = 0u;
        s_stats.last_errorsrc = UARTE_REG(UARTE_ERRORSRC);
        UARTE_REG(UARTE_ERRORSRC) = s_stats.last_errorsrc; /* W1C */
        s_stats.errors++;
    }

    if (UARTE_REG(UARTE_EVENTS_ENDRX) != 0u) {
        UARTE_REG(UARTE_EVENTS_ENDRX) = 0u;
        if (UARTE_REG(UARTE_RXD_AMOUNT) > 0u) {
            s_stats.rx_bytes++;
            if (!rb_put(&s_rx, s_rx_dma_byte)) {
                s_stats.rx_overruns++;
            }
        }
        /* The ENDRX->STARTRX short has already re-armed reception. */
    }

    if (UARTE_REG(UARTE_EVENTS_ENDTX) != 0u) {
        UARTE_REG(UARTE_EVENTS_ENDTX) = 0u;
        size_t sent = UARTE_REG(UARTE_TXD_AMOUNT);
        if (sent > s_tx_inflight) {
            sent = s_tx_inflight;
        }
        rb_consume(&s_tx, sent);
        s_stats.tx_bytes += (uint32_t)sent;
        s_tx_inflight = 0;
        s_tx_busy = false;
        tx_kick();
    }
}
