/*
 * cli.c - line editor, tokenizer and the built-in commands.
 */
#include "cli.h"
#include "board.h"
#include "config.h"
#include "cpu.h"
#include "crc.h"
#include "dfu.h"
#include "evlog.h"
#include "filter.h"
#include "fmt.h"
#include "fw_config.h"
#include "fw_header.h"
#include "fwlib.h"
#include "humidity.h"
#include "log.h"
#include "sched.h"
#include "sensor.h"
#include "startup.h"
#include "telemetry.h"
#include "twim.h"
#include "uart.h"
#include "wallclock.h"

#define KEY_CTRL_C  0x03
#define KEY_BS      0x08
#define KEY_TAB     0x09
#define KEY_CTRL_U  0x15
#define KEY_ESC     0x1B
#define KEY_DEL     0x7F

#define MD_MAX_LEN  256u
#define DFU_CHUNK_MAX 32u

typedef enum {
    ESC_NONE,
    ESC_GOT_ESC,
    ESC_GOT_BRACKET,
} esc_state_t;

static struct {
    char line[CLI_LINE_MAX];
    char history[CLI_LINE_MAX];
    size_t len;
    const char *prompt;
    esc_state_t esc;
    bool last_was_cr;
    uint32_t executed;
    uint32_t errors;
} s_cli;

/* ------------------------------------------------------------------------ */
/* Output helpers                                                           */
/* ------------------------------------------------------------------------ */

static void uart_sink_char(void *ctx, char c)
{
    (void)ctx;
    uart_putc(c);
}

static void print_fixed(int32_t scaled, unsigned decimals)
{
    char buf[16];
    fmt_fixed(buf, sizeof(buf), scaled, decimals);
    uart_puts(buf);
}

static const cli_command_t *find_command(const char *name)
{
    for (size_t i = 0; i < cli_command_count(); i++) {
        const cli_command_t *c = cli_command_at(i);
        if (strcmp(c->name, name) == 0) {
            return c;
        }
    }
    return NULL;
}

static int usage_error(const char *cmd)
{
    const cli_command_t *c = find_command(cmd);
    if (c != NULL) {
        uart_printf("usage: %s %s\r\n", c->name, c->usage);
    }
    return CLI_ERR_USAGE;
}

static bool contains_byte(const void *buf, size_t len, uint8_t value)
{
    const uint8_t *p = buf;
    for (size_t i = 0; i < len; i++) {
        if (p[i] == value) {
            return true;
        }
    }
    return false;
}

static int arg_error(const char *what, const char *value)
{
    uart_printf("error: invalid %s '%s'\r\n", what, value);
    return CLI_ERR_ARG;
}

/* ------------------------------------------------------------------------ */
/* Commands                                                                 */
/* ------------------------------------------------------------------------ */

static int cmd_help(int argc, char **argv)
{
    if (argc > 1) {
        const cli_command_t *c = find_command(argv[1]);
        if (c == NULL) {
            return arg_error("command", argv[1]);
        }
        uart_printf("%s %s\r\n  %s\r\n", c->name, c->usage, c->help);
        return CLI_OK;
    }
    uart_puts("Commands:\r\n");
    for (size_t i = 0; i < cli_command_count(); i++) {
        const cli_command_t *c = cli_command_at(i);
        uart_printf("  %-9s %s\r\n", c->name, c->help);
    }
    uart_puts("Use 'help <command>' for usage.\r\n");
    return CLI_OK;
}

static int cmd_version(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    uart_printf("%s %s (%s) hw=0x%05lx header=v%u\r\n",
                FW_PRODUCT_NAME, FW_VERSION_STRING, FW_RELEASE_NAME,
                (unsigned long)g_fw_header.hw_id, g_fw_header.header_version);
    return CLI_OK;
}

static int cmd_uptime(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    uint64_t ms = systick_ms64();
    uint32_t s = (uint32_t)(ms / 1000u);
    uart_printf("up %lud %02lu:%02lu:%02lu.%03lu, boot #%lu, reset: %s\r\n",
                (unsigned long)(s / 86400u), (unsigned long)((s / 3600u) % 24u),
                (unsigned long)((s / 60u) % 60u), (unsigned long)(s % 60u),
                (unsigned long)(ms % 1000u), (unsigned long)config_get()->boot_count,
                board_reset_info()->text);
    return CLI_OK;
}

static int cmd_info(int argc, char **argv)
{
    uint32_t id[2];
    uint32_t size = (uint32_t)((const uint8_t *)g_fw_header.image_end -
                               (const uint8_t *)g_fw_header.image_start);
    (void)argc;
    (void)argv;

    board_device_id(id);
    uart_printf("device id  : %08lx%08lx\r\n", (unsigned long)id[1], (unsigned long)id[0]);
    uart_printf("flash/ram  : %lu KiB / %lu KiB\r\n",
                (unsigned long)board_flash_size_kib(), (unsigned long)board_ram_size_kib());
    uart_printf("image      : %p..%p (%lu bytes)\r\n",
                g_fw_header.image_start, g_fw_header.image_end, (unsigned long)size);
    uart_printf("image crc  : stored %08lx, computed %08lx\r\n",
                (unsigned long)g_fw_header.image_crc32,
                (unsigned long)fw_header_compute_crc());
    uart_printf("stack free : %lu bytes\r\n", (unsigned long)startup_stack_unused());
    uart_printf("clock      : %s\r\n", board_hfxo_running() ? "HFXO" : "HFINT");
    uart_printf("watchdog   : %s (%us)\r\n",
                board_wdt_running() ? "running" : "stopped", WDT_TIMEOUT_S);
    uart_printf("die temp   : ");
    print_fixed(board_die_temp_centi(), 2u);
    uart_puts(" C\r\n");
    return CLI_OK;
}

static int cmd_tasks(int argc, char **argv)
{
    bool reset = (argc > 1 && strcmp(argv[1], "reset") == 0);

    if (reset) {
        sched_reset_stats();
        uart_puts("task statistics cleared\r\n");
        return CLI_OK;
    }
    uart_puts("task        period    runs  overrun  last_us   max_us   avg_us\r\n");
    for (unsigned i = 0; i < sched_task_count(); i++) {
        const task_t *t = sched_task(i);
        uint32_t avg = t->runs ? (uint32_t)(t->total_cycles / t->runs) : 0u;
        uart_printf("%-10s %7lu %7lu %8lu %8lu %8lu %8lu%s\r\n", t->name,
                    (unsigned long)t->period_ms, (unsigned long)t->runs,
                    (unsigned long)t->overruns,
                    (unsigned long)(t->last_cycles / (SYSTEM_CORE_CLOCK / 1000000u)),
                    (unsigned long)(t->max_cycles / (SYSTEM_CORE_CLOCK / 1000000u)),
                    (unsigned long)(avg / (SYSTEM_CORE_CLOCK / 1000000u)),
                    t->enabled ? "" : " (off)");
    }
    uart_printf("idle: %lu%%\r\n", (unsigned long)sched_idle_percent());
    return CLI_OK;
}

#if FW_VERSION_MINOR >= 2
/* stats: one-screen health summary for field triage (added in v1.2). */
static int cmd_stats(int argc, char **argv)
{
    uart_stats_t us;
    const sensor_stats_t *ss = sensor_stats();

    if (argc > 1 && strcmp(argv[1], "clear") == 0) {
        uart_clear_stats();
        sched_reset_stats();
        uart_puts("statistics cleared\r\n");
        return CLI_OK;
    }
    uart_get_stats(&us);
    uart_printf("uart   tx=%lu rx=%lu dropped=%lu err=%lu tx_hw=%u/%u\r\n",
                (unsigned long)us.tx_bytes, (unsigned long)us.rx_bytes,
                (unsigned long)us.tx_dropped, (unsigned long)us.errors,
                us.tx_high_water, UART_TX_BUF_SIZE);
    uart_printf("sensor samples=%lu timeouts=%lu out_of_range=%lu\r\n",
                (unsigned long)ss->samples, (unsigned long)ss->timeouts,
                (unsigned long)ss->out_of_range);
    for (unsigned ch = 0; ch < SENSOR_CH_COUNT; ch++) {
        const sensor_channel_info_t *info = sensor_channel_info((sensor_channel_t)ch);
        const filter_chain_t *f = sensor_filter((sensor_channel_t)ch);
        const running_stats_t *rs = &f->raw_stats;
        uart_printf("  %-7s n=%lu min=%ld max=%ld mean=%ld sd=%lu spikes=%lu [%s%s]\r\n",
                    info->name, (unsigned long)rs->count,
                    (long)(rs->count ? rs->min : 0), (long)(rs->count ? rs->max : 0),
                    (long)stats_mean(rs), (unsigned long)stats_stddev(rs),
                    (unsigned long)f->spikes_rejected, info->decimals ? "0.1 " : "",
                    info->unit);
    }
    uart_printf("log    err=%lu warn=%lu dropped=%lu, cli errors=%lu\r\n",
                (unsigned long)log_count(LOG_LEVEL_ERROR),
                (unsigned long)log_count(LOG_LEVEL_WARN), (unsigned long)log_dropped(),
                (unsigned long)s_cli.errors);
    return CLI_OK;
}
#endif /* FW_VERSION_MINOR >= 2 */

static int cmd_sensor(int argc, char **argv)
{
    bool raw = (argc > 1 && strcmp(argv[1], "raw") == 0);

    if (argc > 1 && strcmp(argv[1], "cal") == 0) {
        bool ok = sensor_calibrate();
        uart_printf("calibration %s\r\n", ok ? "done" : "timed out");
        return ok ? CLI_OK : CLI_ERR_FAIL;
    }
    if (!sensor_sample()) {
        uart_puts("error: ADC conversion timed out\r\n");
        return CLI_ERR_FAIL;
    }
    for (unsigned ch = 0; ch < SENSOR_CH_COUNT; ch++) {
        const sensor_channel_info_t *info = sensor_channel_info((sensor_channel_t)ch);
        const sensor_reading_t *r = sensor_reading((sensor_channel_t)ch);

        uart_printf("%-7s ", info->name);
        if (raw) {
            uart_printf("code=%5d mv=%5ld ", r->raw, (long)sensor_code_to_mv(r->raw));
        }
        print_fixed(r->value, info->decimals);
        uart_puts(" -> ");
        print_fixed(r->filtered, info->decimals);
        uart_printf(" %s%s\r\n", info->unit, r->valid ? "" : "  [out of range]");
    }
    return CLI_OK;
}

static int cmd_filter(int argc, char **argv)
{
    settings_t *cfg = config_get();
    uint32_t v;

    if (argc == 1 || strcmp(argv[1], "show") == 0) {
        uart_printf("alpha=0.%03lu (q15 %u) window=%u spike_limit=%d\r\n",
                    (unsigned long)q15_to_milli(cfg->filter_alpha_q15),
                    cfg->filter_alpha_q15, cfg->filter_window,
                    sensor_filter(SENSOR_CH_SUPPLY)->spike_limit);
        return CLI_OK;
    }
    if (strcmp(argv[1], "reset") == 0) {
        sensor_reset_filters();
        uart_puts("filters reset\r\n");
        return CLI_OK;
    }
    if (argc < 3) {
        return usage_error(argv[0]);
    }
    if (!fw_parse_u32(argv[2], &v)) {
        return arg_error("number", argv[2]);
    }
    if (strcmp(argv[1], "alpha") == 0) {
        if (v == 0u || v > 1000u) {
            return arg_error("alpha (1..1000 thousandths)", argv[2]);
        }
        cfg->filter_alpha_q15 = q15_from_milli(v);
    } else if (strcmp(argv[1], "window") == 0) {
        if (v == 0u || v > FILTER_MA_MAX_WINDOW) {
            return arg_error("window (1..32)", argv[2]);
        }
        cfg->filter_window = (uint8_t)v;
    } else {
        return usage_error(argv[0]);
    }
    config_mark_dirty();
    sensor_set_filter(cfg->filter_alpha_q15, cfg->filter_window);
    uart_puts("filter updated (use 'config save' to persist)\r\n");
    return CLI_OK;
}

static void config_print_cb(const char *key, const char *value, void *ctx)
{
    (void)ctx;
    uart_printf("  %-10s = %s\r\n", key, value);
}

static int cmd_config(int argc, char **argv)
{
    if (argc == 1 || strcmp(argv[1], "show") == 0) {
        uart_printf("settings (source: %s%s, boot #%lu):\r\n", config_source_name(),
                    config_dirty() ? ", modified" : "",
                    (unsigned long)config_get()->boot_count);
        config_visit(config_print_cb, NULL);
        return CLI_OK;
    }
    if (strcmp(argv[1], "save") == 0) {
        if (!config_save()) {
            uart_puts("error: flash write failed\r\n");
            return CLI_ERR_FAIL;
        }
        evlog_add(EV_CONFIG_SAVED, config_get()->boot_count);
        uart_puts("saved\r\n");
        return CLI_OK;
    }
    if (strcmp(argv[1], "defaults") == 0) {
        uint32_t boots = config_get()->boot_count;
        config_set_defaults();
        config_get()->boot_count = boots;
        evlog_add(EV_CONFIG_DEFAULTS, 0u);
        uart_puts("defaults restored (not saved)\r\n");
        return CLI_OK;
    }
    if (strcmp(argv[1], "set") == 0 && argc >= 4) {
        config_status_t st = config_set_kv(argv[2], argv[3]);
        if (st != CFG_OK) {
            uart_printf("error: %s: %s\r\n", argv[2], config_status_text(st));
            return CLI_ERR_ARG;
        }
        uart_puts("ok\r\n");
        return CLI_OK;
    }
    return usage_error(argv[0]);
}

static void baud_list_cb(uint32_t baud, void *ctx)
{
    (void)ctx;
    uart_printf(" %lu", (unsigned long)baud);
}

static int cmd_baud(int argc, char **argv)
{
    uint32_t baud;

    if (argc == 1) {
        uart_printf("baud: %lu (default %lu)\r\n", (unsigned long)uart_get_baud(),
                    (unsigned long)FW_DEFAULT_BAUD);
        return CLI_OK;
    }
    if (strcmp(argv[1], "list") == 0) {
        uart_puts("supported:");
        uart_list_bauds(baud_list_cb, NULL);
        uart_puts("\r\n");
        return CLI_OK;
    }
    if (!fw_parse_u32(argv[1], &baud) || !uart_baud_supported(baud)) {
        return arg_error("baud rate", argv[1]);
    }
    uart_printf("switching to %lu baud\r\n", (unsigned long)baud);
    uart_set_baud(baud);
    evlog_add(EV_BAUD_CHANGED, baud);
    config_get()->baud = baud;
    config_mark_dirty();
    return CLI_OK;
}

static int cmd_crc(int argc, char **argv)
{
    if (strcmp(argv[1], "image") == 0) {
        uint32_t crc = fw_header_compute_crc();
        uart_printf("image crc32 = %08lx (%s)\r\n", (unsigned long)crc,
                    crc == g_fw_header.image_crc32 ? "match" : "unsigned/mismatch");
        return CLI_OK;
    }
    if (argc < 3) {
        return usage_error(argv[0]);
    }
    const uint8_t *data = (const uint8_t *)argv[2];
    size_t len = strlen(argv[2]);

    if (strcmp(argv[1], "crc8") == 0) {
        uart_printf("crc8 = %02x\r\n", crc8_sensor(data, len));
    } else if (strcmp(argv[1], "crc16") == 0) {
        uart_printf("crc16 = %04x\r\n", crc16_ccitt(data, len));
    } else if (strcmp(argv[1], "crc32") == 0) {
        uart_printf("crc32 = %08lx\r\n", (unsigned long)crc32(data, len));
    } else {
        return usage_error(argv[0]);
    }
    return CLI_OK;
}

static bool address_readable(uint32_t addr, uint32_t len)
{
    uint32_t end = addr + len;
    if (end < addr) {
        return false;
    }
    /* Flash, FICR/UICR and RAM; peripherals are excluded on purpose since
     * reads can have side effects. */
    return (end <= 0x00100000u) ||
           (addr >= 0x10000000u && end <= 0x10002000u) ||
           (addr >= 0x20000000u && end <= 0x20040000u);
}

static int cmd_md(int argc, char **argv)
{
    uint32_t addr;
    uint32_t len = 64u;

    if (!fw_parse_u32(argv[1], &addr)) {
        return arg_error("address", argv[1]);
    }
    if (argc > 2 && (!fw_parse_u32(argv[2], &len) || len == 0u || len > MD_MAX_LEN)) {
        return arg_error("length (1..256)", argv[2]);
    }
    if (!address_readable(addr, len)) {
        uart_printf("error: range %08lx+%lu not readable\r\n", (unsigned long)addr,
                    (unsigned long)len);
        return CLI_ERR_ARG;
    }
    fmt_hexdump(uart_sink_char, NULL, addr, (const uint8_t *)(uintptr_t)addr, len);
    return CLI_OK;
}

static int cmd_led(int argc, char **argv)
{
    uint32_t n;
    bool on;

    if (!fw_parse_u32(argv[1], &n) || n < 1u || n > LED_COUNT) {
        return arg_error("led (1..4)", argv[1]);
    }
    board_led_t led = (board_led_t)(n - 1u);
    if (argc < 3 || strcmp(argv[2], "toggle") == 0) {
        board_led_toggle(led);
    } else if (fw_parse_bool(argv[2], &on)) {
        board_led_set(led, on);
    } else {
        return arg_error("state", argv[2]);
    }
    uart_printf("led%lu %s\r\n", (unsigned long)n, board_led_get(led) ? "on" : "off");
    return CLI_OK;
}

static int cmd_log(int argc, char **argv)
{
    if (argc == 1) {
        uart_printf("log level: %s (dropped %lu)\r\n", log_level_name(log_get_level()),
                    (unsigned long)log_dropped());
        return CLI_OK;
    }
    int lvl = log_level_from_name(argv[1]);
    if (lvl < 0) {
        return arg_error("level (error|warn|info|debug|trace)", argv[1]);
    }
    log_set_level((log_level_t)lvl);
    config_get()->log_level = (uint8_t)lvl;
    config_mark_dirty();
    uart_printf("log level: %s\r\n", log_level_name((log_level_t)lvl));
    return CLI_OK;
}

static int cmd_tlm(int argc, char **argv)
{
    bool binary = config_get()->telemetry_binary != 0u;

    if (argc > 1) {
        if (strcmp(argv[1], "text") == 0) {
            binary = false;
        } else if (strcmp(argv[1], "binary") == 0) {
            binary = true;
        } else if (strcmp(argv[1], "now") != 0) {
            return usage_error(argv[0]);
        }
        if (strcmp(argv[1], "now") != 0) {
            config_get()->telemetry_binary = binary ? 1u : 0u;
            config_mark_dirty();
            uart_printf("telemetry mode: %s\r\n", binary ? "binary" : "text");
            return CLI_OK;
        }
    }
    telemetry_send(binary);
    return CLI_OK;
}

static int cmd_dfu(int argc, char **argv)
{
    const dfu_info_t *info = dfu_info();
    dfu_status_t st;

    if (argc == 1 || strcmp(argv[1], "status") == 0) {
        uint32_t pm = dfu_progress_permille();
        uart_printf("dfu: %s, %lu/%lu bytes (%lu.%lu%%), %lu chunks, %lu pages erased\r\n",
                    dfu_state_name(info->state), (unsigned long)info->received,
                    (unsigned long)info->total_size, (unsigned long)(pm / 10u),
                    (unsigned long)(pm % 10u), (unsigned long)info->chunks,
                    (unsigned long)info->pages_erased);
        if (info->state == DFU_FAILED) {
            uart_printf("     last error: %s\r\n", dfu_status_text(info->last_error));
        } else if (info->state == DFU_READY) {
            uart_printf("     staged version %u.%u.%u\r\n", info->staged_major,
                        info->staged_minor, info->staged_patch);
        }
        return CLI_OK;
    }
    if (strcmp(argv[1], "begin") == 0 && argc >= 4) {
        uint32_t size;
        uint32_t crc;
        if (!fw_parse_u32(argv[2], &size)) {
            return arg_error("size", argv[2]);
        }
        if (!fw_parse_u32(argv[3], &crc)) {
            return arg_error("crc", argv[3]);
        }
        st = dfu_begin(size, crc);
    } else if (strcmp(argv[1], "write") == 0 && argc >= 4) {
        uint8_t chunk[DFU_CHUNK_MAX];
        uint32_t offset;
        if (!fw_parse_u32(argv[2], &offset)) {
            return arg_error("offset", argv[2]);
        }
        int n = dfu_hex_decode(argv[3], chunk, sizeof(chunk));
        if (n <= 0) {
            return arg_error("hex data", argv[3]);
        }
        st = dfu_write(offset, chunk, (size_t)n);
        if (st == DFU_ERR_OFFSET) {
            uart_printf("error: expected offset %lu\r\n", (unsigned long)info->received);
            return CLI_ERR_ARG;
        }
    } else if (strcmp(argv[1], "finish") == 0) {
        st = dfu_finish(argc > 2 && strcmp(argv[2], "force") == 0);
    } else if (strcmp(argv[1], "abort") == 0) {
        dfu_abort();
        st = DFU_OK;
    } else if (strcmp(argv[1], "activate") == 0) {
        st = dfu_activate();
    } else {
        return usage_error(argv[0]);
    }
    uart_printf("%s\r\n", dfu_status_text(st));
    return (st == DFU_OK) ? CLI_OK : CLI_ERR_FAIL;
}

static int cmd_crash(int argc, char **argv)
{
    const crash_record_t *cr = crash_record_get();

    if (argc > 1 && strcmp(argv[1], "clear") == 0) {
        crash_record_clear();
        uart_puts("crash record cleared\r\n");
        return CLI_OK;
    }
    if (argc > 1 && strcmp(argv[1], "test") == 0) {
        uart_puts("triggering usage fault...\r\n");
        uart_flush(100u);
        volatile uint32_t zero = 0u;
        volatile uint32_t r = 1u / zero;
        (void)r;
        return CLI_OK;
    }
    if (cr == NULL) {
        uart_puts("no crash recorded\r\n");
        return CLI_OK;
    }
    uart_printf("crash #%lu: pc=%08lx lr=%08lx xpsr=%08lx exc_ret=%08lx\r\n",
                (unsigned long)cr->count, (unsigned long)cr->pc, (unsigned long)cr->lr,
                (unsigned long)cr->xpsr, (unsigned long)cr->exc_return);
    uart_printf("  r0=%08lx r1=%08lx r2=%08lx r3=%08lx r12=%08lx\r\n",
                (unsigned long)cr->r0, (unsigned long)cr->r1, (unsigned long)cr->r2,
                (unsigned long)cr->r3, (unsigned long)cr->r12);
    uart_printf("  cfsr=%08lx hfsr=%08lx mmfar=%08lx bfar=%08lx\r\n",
                (unsigned long)cr->cfsr, (unsigned long)cr->hfsr,
                (unsigned long)cr->mmfar, (unsigned long)cr->bfar);
    return CLI_OK;
}

typedef struct {
    const char *name;
    bool (*fn)(void);
} selftest_t;

static bool test_crc(void)
{
    static const uint8_t check[] = "123456789";
    return crc32(check, 9u) == 0xCBF43926u && crc16_ccitt(check, 9u) == 0x29B1u &&
           crc8_sensor((const uint8_t *)"\xBE\xEF", 2u) == 0x92u;
}

static bool test_cobs(void)
{
    static const uint8_t in[] = { 0x11, 0x00, 0x22, 0x33, 0x00, 0x00, 0x44 };
    uint8_t enc[16];
    uint8_t dec[16];
    size_t n = cobs_encode(in, sizeof(in), enc, sizeof(enc));

    if (n != sizeof(in) + 1u || contains_byte(enc, n, 0u)) {
        return false;
    }
    return cobs_decode(enc, n, dec, sizeof(dec)) == sizeof(in) &&
           memcmp(in, dec, sizeof(in)) == 0;
}

static bool test_filter(void)
{
    iir_lp_t f;
    iir_init(&f, FILTER_IIR_ALPHA_DEFAULT);
    iir_update(&f, 0);
    for (int i = 0; i < 400; i++) {
        iir_update(&f, 1000);
    }
    /* Step response must settle within the filter's resolution. */
    int16_t y = iir_output(&f);
    return y >= 990 && y <= 1000;
}

static bool test_ntc(void)
{
    return sensor_ntc_mv_to_decic(1500) == 250 && sensor_ntc_mv_to_decic(5000) == -400 &&
           sensor_ntc_mv_to_decic(0) == 1250;
}

static bool test_parse(void)
{
    uint32_t u = 0;
    int32_t i = 0;
    return fw_parse_u32("0x2000_0000", &u) && u == 0x20000000u &&
           fw_parse_i32("-42", &i) && i == -42 && !fw_parse_u32("12a", &u) &&
           !fw_parse_u32("4294967296", &u);
}

static const selftest_t s_selftests[] = {
    { "crc",    test_crc },
    { "cobs",   test_cobs },
    { "filter", test_filter },
    { "ntc",    test_ntc },
    { "parse",  test_parse },
};

static int cmd_selftest(int argc, char **argv)
{
    unsigned failed = 0;
    (void)argc;
    (void)argv;

    for (size_t i = 0; i < ARRAY_SIZE(s_selftests); i++) {
        bool ok = s_selftests[i].fn();
        uart_printf("  %-8s %s\r\n", s_selftests[i].name, ok ? "pass" : "FAIL");
        if (!ok) {
            failed++;
        }
    }
    uart_printf("%u/%u passed\r\n", (unsigned)(ARRAY_SIZE(s_selftests) - failed),
                (unsigned)ARRAY_SIZE(s_selftests));
    return failed ? CLI_ERR_FAIL : CLI_OK;
}

static void i2c_found_cb(uint8_t addr, void *ctx)
{
    (void)ctx;
    uart_printf("  device at 0x%02x\r\n", addr);
}

static int cmd_i2c(int argc, char **argv)
{
    const twim_stats_t *st = twim_stats();

    if (argc > 1 && strcmp(argv[1], "scan") == 0) {
        unsigned found = twim_scan(i2c_found_cb, NULL);
        uart_printf("%u device(s) found\r\n", found);
        return CLI_OK;
    }
    if (argc > 1 && strcmp(argv[1], "recover") == 0) {
        twim_bus_recover();
        uart_puts("bus recovery done\r\n");
        return CLI_OK;
    }
    uart_printf("i2c: transfers=%lu nacks=%lu timeouts=%lu recoveries=%lu\r\n",
                (unsigned long)st->transfers, (unsigned long)st->nacks,
                (unsigned long)st->timeouts, (unsigned long)st->bus_recoveries);
    return CLI_OK;
}

static int cmd_rh(int argc, char **argv)
{
    const humidity_info_t *info = humidity_info();
    const humidity_sample_t *s = humidity_latest();
    bool on;

    if (argc > 2 && strcmp(argv[1], "heater") == 0) {
        if (!fw_parse_bool(argv[2], &on)) {
            return arg_error("state", argv[2]);
        }
        if (!humidity_set_heater(on)) {
            uart_puts("error: sensor did not respond\r\n");
            return CLI_ERR_FAIL;
        }
    } else if (argc > 1 && strcmp(argv[1], "reset") == 0) {
        if (!humidity_soft_reset()) {
            uart_puts("error: sensor did not respond\r\n");
            return CLI_ERR_FAIL;
        }
    } else if (argc > 1) {
        return usage_error(argv[0]);
    }
    if (!info->present) {
        uart_puts("humidity sensor not present\r\n");
        return CLI_OK;
    }
    uart_printf("sensor %04x%04x heater=%s meas=%lu crc_err=%lu bus_err=%lu\r\n",
                info->serial_hi, info->serial_lo, info->heater_on ? "on" : "off",
                (unsigned long)info->measurements, (unsigned long)info->crc_errors,
                (unsigned long)info->bus_errors);
    if (!s->valid) {
        uart_puts("no valid sample yet\r\n");
        return CLI_OK;
    }
    uart_puts("temp ");
    print_fixed(s->temp_centi, 2u);
    uart_puts(" C, rh ");
    print_fixed(s->rh_centi, 2u);
    uart_puts(" %, dew point ");
    print_fixed(humidity_dew_point_centi(s->temp_centi, s->rh_centi), 2u);
    uart_printf(" C (%lu ms ago)\r\n", (unsigned long)(systick_ms() - s->timestamp_ms));
    return CLI_OK;
}

static int cmd_events(int argc, char **argv)
{
    ev_record_t r;

    if (argc > 1 && strcmp(argv[1], "clear") == 0) {
        evlog_clear();
        uart_puts("event log cleared\r\n");
        return CLI_OK;
    }
    uart_printf("%u of %lu events:\r\n", evlog_count(), (unsigned long)evlog_total());
    for (unsigned i = 0; evlog_get(i, &r); i++) {
        uart_printf("  boot %-4lu %7lu.%03lus  %-12s 0x%08lx\r\n", (unsigned long)r.boot,
                    (unsigned long)(r.uptime_ms / 1000u), (unsigned long)(r.uptime_ms % 1000u),
                    evlog_code_name(r.code), (unsigned long)r.arg);
    }
    return CLI_OK;
}

static int cmd_time(int argc, char **argv)
{
    char buf[24];
    uint32_t t;

    if (argc > 2 && strcmp(argv[1], "set") == 0) {
        if (!wallclock_parse_iso(argv[2], &t) && !fw_parse_u32(argv[2], &t)) {
            return arg_error("time (YYYY-MM-DDTHH:MM:SS or epoch)", argv[2]);
        }
        wallclock_set(t);
        evlog_add(EV_TIME_SET, t);
    } else if (argc > 1) {
        return usage_error(argv[0]);
    }
    if (!wallclock_is_set()) {
        uart_printf("time not set (rtc uptime %lus)\r\n", (unsigned long)wallclock_rtc_seconds());
        return CLI_OK;
    }
    t = wallclock_now();
    wallclock_format_iso(t, buf, sizeof(buf));
    uart_printf("%s (epoch %lu)\r\n", buf, (unsigned long)t);
    return CLI_OK;
}

static int cmd_reboot(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    if (config_dirty()) {
        uart_puts("note: unsaved settings will be lost\r\n");
    }
    uart_puts("rebooting...\r\n");
    uart_flush(200u);
    board_system_reset();
}

static const cli_command_t s_commands[] = {
    { "help",     "[command]",                       "list commands or show usage",      cmd_help,     0 },
    { "version",  "",                                "firmware version",                 cmd_version,  0 },
    { "uptime",   "",                                "time since boot and reset cause",  cmd_uptime,   0 },
    { "info",     "",                                "device and image information",     cmd_info,     0 },
    { "tasks",    "[reset]",                         "scheduler task statistics",        cmd_tasks,    0 },
#if FW_VERSION_MINOR >= 2
    { "stats",    "[clear]",                         "health summary of all subsystems", cmd_stats,    0 },
#endif
    { "sensor",   "[raw|cal]",                       "sample and show analog inputs",    cmd_sensor,   0 },
    { "filter",   "[show|reset|alpha <m>|window <n>]", "sensor filter settings",         cmd_filter,   0 },
    { "config",   "[show|save|defaults|set <k> <v>]", "persistent settings",             cmd_config,   0 },
    { "baud",     "[rate|list]",                     "console baud rate",                cmd_baud,     0 },
    { "crc",      "<crc8|crc16|crc32> <text> | image", "checksum a string or the image", cmd_crc,      1 },
    { "md",       "<addr> [len]",                    "memory dump",                      cmd_md,       1 },
    { "led",      "<1-4> [on|off|toggle]",           "control board LEDs",               cmd_led,      1 },
    { "log",      "[level]",                         "show or set log level",            cmd_log,      0 },
    { "tlm",      "[now|text|binary]",               "telemetry output",                 cmd_tlm,      0 },
    { "dfu",      "[status|begin <size> <crc>|write <off> <hex>|finish [force]|abort|activate]",
                                                     "staged firmware update",           cmd_dfu,      0 },
    { "crash",    "[clear|test]",                    "show last crash record",           cmd_crash,    0 },
    { "selftest", "",                                "run built-in self tests",          cmd_selftest, 0 },
    { "i2c",      "[scan|recover]",                  "I2C bus status and scan",          cmd_i2c,      0 },
    { "rh",       "[heater on|off|reset]",           "humidity sensor reading",          cmd_rh,       0 },
    { "events",   "[clear]",                         "show the event log",               cmd_events,   0 },
    { "time",     "[set <iso8601|epoch>]",           "show or set wall clock time",      cmd_time,     0 },
    { "reboot",   "",                                "reset the node",                   cmd_reboot,   0 },
};

static const size_t s_command_count = ARRAY_SIZE(s_commands);

/* ------------------------------------------------------------------------ */
/* Tokenizer and dispatcher                                                 */
/* ------------------------------------------------------------------------ */

int cli_tokenize(char *line, char **argv, int max_args)
{
    int argc = 0;
    char *src = line;
    char *dst = line;

    while (*src != '\0') {
        while (fw_isspace(*src)) {
            src++;
        }
        if (*src == '\0') {
            break;
        }
        if (argc >= max_args) {
            return -1;
        }
        argv[argc++] = dst;

        bool quoted = false;
        while (*src != '\0' && (quoted || !fw_isspace(*src))) {
            if (*src == '"') {
                quoted = !quoted;
                src++;
            } else if (*src == '\\' && src[1] != '\0') {
                src++;
                *dst++ = *src++;
            } else {
                *dst++ = *src++;
            }
        }
        if (quoted) {
            return -2; /* unterminated quote */
        }
        if (*src != '\0') {
            src++;
        }
        *dst++ = '\0';
    }
    return argc;
}

int cli_execute(char *line)
{
    char *argv[CLI_ARGV_MAX];
    int argc = cli_tokenize(line, argv, (int)CLI_ARGV_MAX);

    if (argc == -1) {
        uart_puts("error: too many arguments\r\n");
        return CLI_ERR_USAGE;
    }
    if (argc == -2) {
        uart_puts("error: unterminated quote\r\n");
        return CLI_ERR_USAGE;
    }
    if (argc == 0) {
        return CLI_OK;
    }
    const cli_command_t *c = find_command(argv[0]);
    if (c != NULL) {
        if (argc - 1 < c->min_args) {
            return usage_error(c->name);
        }
        s_cli.executed++;
        int rc = c->handler(argc, argv);
        if (rc != CLI_OK) {
            s_cli.errors++;
        }
        return rc;
    }
    uart_printf("unknown command '%s', try 'help'\r\n", argv[0]);
    return CLI_ERR_USAGE;
}

size_t cli_command_count(void)
{
    return s_command_count;
}

const cli_command_t *cli_command_at(size_t index)
{
    return (index < s_command_count) ? &s_commands[index] : NULL;
}

/* ------------------------------------------------------------------------ */
/* Line editor                                                              */
/* ------------------------------------------------------------------------ */

void cli_print_prompt(void)
{
    uart_puts(s_cli.prompt);
}

void cli_init(const char *prompt)
{
    memset(&s_cli, 0, sizeof(s_cli));
    s_cli.prompt = prompt;
}

static void erase_line(void)
{
    while (s_cli.len > 0u) {
        uart_puts("\b \b");
        s_cli.len--;
    }
}

static void recall_history(void)
{
    erase_line();
    s_cli.len = strlen(s_cli.history);
    memcpy(s_cli.line, s_cli.history, s_cli.len);
    uart_write(s_cli.line, s_cli.len);
}

static void complete_command(void)
{
    const cli_command_t *match = NULL;
    unsigned matches = 0;

    if (contains_byte(s_cli.line, s_cli.len, (uint8_t)' ')) {
        return; /* only the command name is completed */
    }
    for (size_t i = 0; i < s_command_count; i++) {
        if (strncmp(s_commands[i].name, s_cli.line, s_cli.len) == 0) {
            match = &s_commands[i];
            matches++;
        }
    }
    if (matches == 1u) {
        size_t name_len = strlen(match->name);
        uart_write(match->name + s_cli.len, name_len - s_cli.len);
        memcpy(s_cli.line, match->name, name_len);
        s_cli.len = name_len;
        if (s_cli.len < CLI_LINE_MAX - 1u) {
            s_cli.line[s_cli.len++] = ' ';
            uart_putc(' ');
        }
    } else if (matches > 1u) {
        uart_puts("\r\n");
        for (size_t i = 0; i < s_command_count; i++) {
            if (strncmp(s_commands[i].name, s_cli.line, s_cli.len) == 0) {
                uart_printf("%s  ", s_commands[i].name);
            }
        }
        uart_puts("\r\n");
        cli_print_prompt();
        uart_write(s_cli.line, s_cli.len);
    }
}

static void end_of_line(void)
{
    uart_puts("\r\n");
    s_cli.line[s_cli.len] = '\0';
    if (s_cli.len > 0u) {
        memcpy(s_cli.history, s_cli.line, s_cli.len + 1u);
        cli_execute(s_cli.line);
    }
    s_cli.len = 0;
    cli_print_prompt();
}

static void handle_char(char c)
{
    if (s_cli.esc == ESC_GOT_ESC) {
        s_cli.esc = (c == '[') ? ESC_GOT_BRACKET : ESC_NONE;
        return;
    }
    if (s_cli.esc == ESC_GOT_BRACKET) {
        s_cli.esc = ESC_NONE;
        if (c == 'A') {
            recall_history();
        }
        return; /* other cursor keys are ignored */
    }

    /* Treat CR, LF and CRLF alike. */
    if (c == '\n' && s_cli.last_was_cr) {
        s_cli.last_was_cr = false;
        return;
    }
    s_cli.last_was_cr = (c == '\r');

    switch (c) {
    case '\r':
    case '\n':
        end_of_line();
        break;
    case KEY_BS:
    case KEY_DEL:
        if (s_cli.len > 0u) {
            s_cli.len--;
            uart_puts("\b \b");
        }
        break;
    case KEY_CTRL_C:
        uart_puts("^C\r\n");
        s_cli.len = 0;
        cli_print_prompt();
        break;
    case KEY_CTRL_U:
        erase_line();
        break;
    case KEY_TAB:
        complete_command();
        break;
    case KEY_ESC:
        s_cli.esc = ESC_GOT_ESC;
        break;
    default:
        if (fw_isprint(c) && s_cli.len < CLI_LINE_MAX - 1u) {
            s_cli.line[s_cli.len++] = c;
            uart_putc(c);
        } else {
            uart_putc('\a');
        }
        break;
    }
}

void cli_poll(void)
{
    char c;
    unsigned budget = 64u; /* bound the time spent per scheduler slot */

    while (budget-- > 0u && uart_getc(&c)) {
        handle_char(c);
    }
}
