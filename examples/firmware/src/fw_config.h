/*
 * fw_config.h - build-time configuration for the shoal-node firmware.
 *
 * One source tree builds every release; the release is selected with
 * -DFW_VERSION_MINOR=<n>.  Behavioural differences between releases are
 * keyed off FW_VERSION_MINOR so that they stay visible in one place.
 */
#ifndef FW_CONFIG_H
#define FW_CONFIG_H

#ifndef FW_VERSION_MINOR
#define FW_VERSION_MINOR 1
#endif

#define FW_VERSION_MAJOR 1
#define FW_VERSION_PATCH 0

#define FW_STR_(x) #x
#define FW_STR(x)  FW_STR_(x)

#define FW_PRODUCT_NAME   "shoal-node"
#define FW_VERSION_STRING FW_STR(FW_VERSION_MAJOR) "." \
                          FW_STR(FW_VERSION_MINOR) "." \
                          FW_STR(FW_VERSION_PATCH)

#if FW_VERSION_MINOR >= 2
#define FW_RELEASE_NAME   "pike"
#else
#define FW_RELEASE_NAME   "perch"
#endif

/* Hardware identifier checked by the bootloader before accepting an image. */
#define FW_HW_ID          0x52840u

/* Core clock after the HFXO has started. */
#define SYSTEM_CORE_CLOCK 64000000u
#define SYSTICK_HZ        1000u

/* Console UART. v1.2 moved the factory default to 230400 baud because the
 * gateway's USB bridge drops bytes on long telemetry bursts at 115200. */
#if FW_VERSION_MINOR >= 2
#define FW_DEFAULT_BAUD   230400u
#else
#define FW_DEFAULT_BAUD   115200u
#endif

#define UART_TX_PIN       6u
#define UART_RX_PIN       8u
#define UART_RTS_PIN      5u
#define UART_CTS_PIN      7u

/* Board LEDs and button (active low, DK-style pinout). */
#define LED1_PIN          13u
#define LED2_PIN          14u
#define LED3_PIN          15u
#define LED4_PIN          16u
#define BUTTON1_PIN       11u

/* Environmental sensor on the I2C bus. */
#define I2C_SCL_PIN       27u
#define I2C_SDA_PIN       26u
#define RH_SENSOR_ADDR    0x44u

/* Buffer sizes; ring buffers must be powers of two. */
#define UART_TX_BUF_SIZE  1024u
#define UART_RX_BUF_SIZE  256u
#define CLI_LINE_MAX      96u
#define CLI_ARGV_MAX      8u

/* Scheduler periods (milliseconds). */
#define PERIOD_HEARTBEAT_MS   500u
#define PERIOD_SENSOR_MS      100u
#define PERIOD_TELEMETRY_MS   5000u
#define PERIOD_CLI_MS         10u
#define PERIOD_WATCHDOG_MS    1000u
#define PERIOD_HUMIDITY_MS    2000u

/* Watchdog timeout in seconds. */
#define WDT_TIMEOUT_S     4u

/* Persistent settings live in the last 4 KiB flash page. */
#define CONFIG_FLASH_ADDR 0x000FF000u
#define FLASH_PAGE_SIZE   4096u

#endif /* FW_CONFIG_H */
