/*
 * main.c - shoal-node application entry point.
 *
 * Brings up the board, restores settings, registers the periodic tasks and
 * then runs the cooperative scheduler, sleeping in WFI between tasks.
 */
#include "board.h"
#include "cli.h"
#include "config.h"
#include "cpu.h"
#include "dfu.h"
#include "evlog.h"
#include "fw_config.h"
#include "fw_header.h"
#include "humidity.h"
#include "log.h"
#include "nrf52.h"
#include "sched.h"
#include "sensor.h"
#include "startup.h"
#include "telemetry.h"
#include "twim.h"
#include "uart.h"
#include "wallclock.h"

typedef struct {
    task_id_t heartbeat;
    task_id_t sensor;
    task_id_t telemetry;
    task_id_t cli;
    task_id_t watchdog;
    task_id_t button;
    task_id_t humidity;
} app_tasks_t;

static app_tasks_t s_tasks;
static uint32_t s_heartbeat_phase;
static uint32_t s_sensor_failures;

static void task_heartbeat(void *ctx)
{
    (void)ctx;
    if (!config_get()->leds_enabled) {
        board_led_set(LED_STATUS, false);
        return;
    }
    /* Double blink every two seconds: on-off-on-off then a long pause. */
    s_heartbeat_phase = (s_heartbeat_phase + 1u) & 3u;
    board_led_set(LED_STATUS, s_heartbeat_phase == 0u || s_heartbeat_phase == 2u);
    board_led_set(LED_ERROR, s_sensor_failures > 3u);
}

static void task_sensor(void *ctx)
{
    (void)ctx;
    if (sensor_sample()) {
        s_sensor_failures = 0;
        return;
    }
    s_sensor_failures++;
    if (s_sensor_failures == 3u) {
        LOG_W("sensor", "ADC not responding, recalibrating");
        evlog_add(EV_SENSOR_TIMEOUT, sensor_stats()->timeouts);
        if (sensor_calibrate()) {
            evlog_add(EV_SENSOR_RECAL, 0u);
        } else {
            LOG_E("sensor", "calibration failed");
        }
    }
}

static void task_telemetry(void *ctx)
{
    (void)ctx;
    if (config_get()->leds_enabled) {
        board_led_set(LED_ACTIVITY, true);
    }
    telemetry_send(config_get()->telemetry_binary != 0u);
    board_led_set(LED_ACTIVITY, false);
}

static void task_cli(void *ctx)
{
    (void)ctx;
    cli_poll();
}

static void task_watchdog(void *ctx)
{
    (void)ctx;
    /* Feeding from a task (not an interrupt) means a stuck scheduler
     * really does reset the node. */
    board_wdt_feed();
}

static void task_button(void *ctx)
{
    (void)ctx;
    if (board_button_poll(systick_ms())) {
        LOG_I("button", "pressed: sending telemetry now");
        evlog_add(EV_BUTTON, 0u);
        sched_trigger(s_tasks.telemetry);
    }
}

static void task_humidity(void *ctx)
{
    (void)ctx;
    uint32_t before = humidity_info()->bus_errors;
    humidity_poll(systick_ms());
    if (humidity_info()->bus_errors != before) {
        evlog_add(EV_I2C_ERROR, humidity_info()->bus_errors);
    }
}

static void report_previous_crash(void)
{
    const crash_record_t *cr = crash_record_get();

    if (cr == NULL) {
        return;
    }
    evlog_add(EV_FAULT_RECOVERED, cr->pc);
    LOG_E("boot", "recovered from fault #%lu at pc=%08lx lr=%08lx cfsr=%08lx",
          (unsigned long)cr->count, (unsigned long)cr->pc, (unsigned long)cr->lr,
          (unsigned long)cr->cfsr);
}

static void boot_banner(void)
{
    const settings_t *cfg = config_get();

    uart_puts("\r\n");
    LOG_I("boot", "%s %s (%s) starting", FW_PRODUCT_NAME, FW_VERSION_STRING,
          FW_RELEASE_NAME);
    LOG_I("boot", "reset cause: %s (0x%08lx), boot #%lu",
          board_reset_info()->text, (unsigned long)board_reset_info()->raw,
          (unsigned long)cfg->boot_count);
    LOG_I("boot", "settings from %s, console %lu baud, node '%s'",
          config_source_name(), (unsigned long)cfg->baud, cfg->node_name);
    if (g_fw_header.image_crc32 != 0xFFFFFFFFu &&
        g_fw_header.image_crc32 != fw_header_compute_crc()) {
        LOG_W("boot", "image CRC mismatch");
    }
    report_previous_crash();
}

static void register_tasks(const settings_t *cfg)
{
    s_tasks.watchdog  = sched_add("watchdog",  task_watchdog,  NULL, PERIOD_WATCHDOG_MS, 0u);
    s_tasks.cli       = sched_add("cli",       task_cli,       NULL, PERIOD_CLI_MS, 0u);
    s_tasks.sensor    = sched_add("sensor",    task_sensor,    NULL, cfg->sample_period_ms, 5u);
    s_tasks.button    = sched_add("button",    task_button,    NULL, 10u, 7u);
    s_tasks.heartbeat = sched_add("heartbeat", task_heartbeat, NULL, PERIOD_HEARTBEAT_MS, 0u);
    s_tasks.humidity  = sched_add("humidity",  task_humidity,  NULL, PERIOD_HUMIDITY_MS / 2u, 11u);
    s_tasks.telemetry = sched_add("telemetry", task_telemetry, NULL,
                                  cfg->report_period_ms, cfg->report_period_ms);
}

int main(void)
{
    board_init();
    systick_init(SYSTEM_CORE_CLOCK, SYSTICK_HZ);
    config_load();
    evlog_init(config_get()->boot_count);
    evlog_add(EV_BOOT, board_reset_info()->raw);
    if (board_reset_info()->raw & RESETREAS_DOG) {
        evlog_add(EV_RESET_WATCHDOG, 0u);
    }

    const settings_t *cfg = config_get();
    const uart_config_t ucfg = {
        .baud = cfg->baud,
        .hw_flow_control = cfg->hw_flow_control != 0u,
        .parity_even = false,
    };
    if (!uart_init(&ucfg)) {
        /* Stored baud is unusable: fall back to the factory default. */
        const uart_config_t fallback = { .baud = FW_DEFAULT_BAUD };
        uart_init(&fallback);
    }

    log_init((log_level_t)cfg->log_level);
    cpu_irq_enable();
    boot_banner();

    sensor_init(cfg->filter_alpha_q15, cfg->filter_window);
    if (!sensor_calibrate()) {
        LOG_W("sensor", "offset calibration timed out");
    }
    wallclock_init();
    twim_init(I2C_SCL_PIN, I2C_SDA_PIN, 400u);
    if (!humidity_init(RH_SENSOR_ADDR)) {
        LOG_W("rh", "no humidity sensor at 0x%02x", RH_SENSOR_ADDR);
    }
    telemetry_init();
    dfu_init();
    cli_init(FW_PRODUCT_NAME "> ");

    sched_init();
    register_tasks(cfg);
    board_wdt_start(WDT_TIMEOUT_S);
    LOG_I("boot", "%u tasks registered, watchdog %us", sched_task_count(), WDT_TIMEOUT_S);
    cli_print_prompt();

    for (;;) {
        sched_run_pending();

        /* Sleep until the next interrupt if nothing is due; SysTick wakes
         * us at least every millisecond. */
        if (sched_ms_until_next() > 0u && uart_rx_available() == 0u) {
            uint32_t before = cpu_cycles();
            cpu_wfi();
            sched_note_idle(cpu_cycles() - before);
        }
    }
}
