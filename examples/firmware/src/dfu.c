/*
 * dfu.c - staged firmware update writer and verifier.
 */
#include "dfu.h"
#include "board.h"
#include "cpu.h"
#include "crc.h"
#include "evlog.h"
#include "fw_config.h"
#include "fw_header.h"
#include "fwlib.h"
#include "log.h"
#include "nrf52.h"
#include "uart.h"

#include <stddef.h>

#define NVMC_TIMEOUT    1000000u
#define HEADER_OFFSET   0x100u   /* image header follows the vector table */

static dfu_info_t s_dfu;
static uint8_t s_word[4];
static uint8_t s_word_fill;
static uint32_t s_write_addr;
static uint32_t s_next_erase;

static bool nvmc_ready_wait(void)
{
    for (uint32_t i = 0; i < NVMC_TIMEOUT; i++) {
        if (NVMC_READY & 1u) {
            return true;
        }
    }
    return false;
}

static bool erase_page(uint32_t addr)
{
    bool ok;
    CRITICAL_SECTION_ENTER();
    NVMC_CONFIG = NVMC_CONFIG_EEN;
    ok = nvmc_ready_wait();
    if (ok) {
        NVMC_ERASEPAGE = addr;
        ok = nvmc_ready_wait();
    }
    NVMC_CONFIG = NVMC_CONFIG_REN;
    CRITICAL_SECTION_EXIT();
    return ok;
}

static bool program_word(uint32_t addr, uint32_t value)
{
    bool ok;
    CRITICAL_SECTION_ENTER();
    NVMC_CONFIG = NVMC_CONFIG_WEN;
    ok = nvmc_ready_wait();
    if (ok) {
        REG32(addr) = value;
        ok = nvmc_ready_wait();
    }
    NVMC_CONFIG = NVMC_CONFIG_REN;
    CRITICAL_SECTION_EXIT();
    return ok && REG32(addr) == value;
}

static dfu_status_t fail(dfu_status_t err)
{
    s_dfu.state = DFU_FAILED;
    s_dfu.last_error = err;
    evlog_add(EV_DFU_FAILED, (uint32_t)err);
    LOG_W("dfu", "update failed: %s", dfu_status_text(err));
    return err;
}

static bool flush_word(void)
{
    uint32_t value;

    if (s_word_fill == 0u) {
        return true;
    }
    while (s_word_fill < 4u) {
        s_word[s_word_fill++] = 0xFFu; /* erased-flash padding */
    }
    /* Erase pages lazily, just ahead of the write pointer. */
    while (s_write_addr >= s_next_erase) {
        if (!erase_page(s_next_erase)) {
            return false;
        }
        s_dfu.pages_erased++;
        s_next_erase += FLASH_PAGE_SIZE;
    }
    value = (uint32_t)s_word[0] | ((uint32_t)s_word[1] << 8) |
            ((uint32_t)s_word[2] << 16) | ((uint32_t)s_word[3] << 24);
    if (!program_word(s_write_addr, value)) {
        return false;
    }
    s_write_addr += 4u;
    s_word_fill = 0;
    return true;
}

void dfu_init(void)
{
    memset(&s_dfu, 0, sizeof(s_dfu));
    s_word_fill = 0;
}

dfu_status_t dfu_begin(uint32_t total_size, uint32_t expected_crc)
{
    if (s_dfu.state == DFU_RECEIVING || s_dfu.state == DFU_VERIFYING) {
        return DFU_ERR_STATE;
    }
    if (total_size < HEADER_OFFSET + sizeof(fw_image_header_t) ||
        total_size > DFU_BANK_SIZE) {
        return DFU_ERR_SIZE;
    }
    memset(&s_dfu, 0, sizeof(s_dfu));
    s_dfu.state = DFU_RECEIVING;
    s_dfu.total_size = total_size;
    s_dfu.expected_crc = expected_crc;
    s_word_fill = 0;
    s_write_addr = DFU_BANK_ADDR;
    s_next_erase = DFU_BANK_ADDR;
    evlog_add(EV_DFU_BEGIN, total_size);
    LOG_I("dfu", "receiving %lu bytes, crc %08lx", (unsigned long)total_size,
          (unsigned long)expected_crc);
    return DFU_OK;
}

dfu_status_t dfu_write(uint32_t offset, const uint8_t *data, size_t len)
{
    if (s_dfu.state != DFU_RECEIVING) {
        return DFU_ERR_STATE;
    }
    if (offset != s_dfu.received) {
        return DFU_ERR_OFFSET; /* the sender retransmits from `received` */
    }
    if (len > s_dfu.total_size - s_dfu.received) {
        return fail(DFU_ERR_SIZE);
    }
    for (size_t i = 0; i < len; i++) {
        s_word[s_word_fill++] = data[i];
        if (s_word_fill == 4u && !flush_word()) {
            return fail(DFU_ERR_FLASH);
        }
    }
    s_dfu.received += (uint32_t)len;
    s_dfu.chunks++;
    return DFU_OK;
}

static dfu_status_t verify_header(bool allow_downgrade)
{
    fw_image_header_t hdr;
    const uint8_t *staged = (const uint8_t *)(uintptr_t)DFU_BANK_ADDR;

    memcpy(&hdr, staged + HEADER_OFFSET, sizeof(hdr));
    if (hdr.magic != FW_HEADER_MAGIC || hdr.header_size != sizeof(hdr)) {
        return DFU_ERR_HEADER;
    }
    if (hdr.hw_id != FW_HW_ID) {
        return DFU_ERR_HW_ID;
    }
    /* The header's image_end is a link-time address of the new image. */
    uint32_t linked_size = (uint32_t)((const uint8_t *)hdr.image_end -
                                      (const uint8_t *)hdr.image_start);
    if (linked_size != s_dfu.total_size) {
        return DFU_ERR_SIZE;
    }
    uint32_t current = ((uint32_t)FW_VERSION_MAJOR << 24) |
                       ((uint32_t)FW_VERSION_MINOR << 16) | FW_VERSION_PATCH;
    uint32_t staged_ver = ((uint32_t)hdr.ver_major << 24) |
                          ((uint32_t)hdr.ver_minor << 16) | hdr.ver_patch;
    if (staged_ver < current && !allow_downgrade) {
        return DFU_ERR_DOWNGRADE;
    }
    s_dfu.staged_major = hdr.ver_major;
    s_dfu.staged_minor = hdr.ver_minor;
    s_dfu.staged_patch = hdr.ver_patch;
    return DFU_OK;
}

dfu_status_t dfu_finish(bool allow_downgrade)
{
    if (s_dfu.state != DFU_RECEIVING) {
        return DFU_ERR_STATE;
    }
    if (s_dfu.received != s_dfu.total_size) {
        return DFU_ERR_SIZE;
    }
    if (!flush_word()) {
        return fail(DFU_ERR_FLASH);
    }
    s_dfu.state = DFU_VERIFYING;

    uint32_t crc = crc32((const uint8_t *)(uintptr_t)DFU_BANK_ADDR, s_dfu.total_size);
    if (crc != s_dfu.expected_crc) {
        LOG_W("dfu", "crc %08lx, expected %08lx", (unsigned long)crc,
              (unsigned long)s_dfu.expected_crc);
        return fail(DFU_ERR_CRC);
    }
    dfu_status_t st = verify_header(allow_downgrade);
    if (st != DFU_OK) {
        return fail(st);
    }
    s_dfu.state = DFU_READY;
    evlog_add(EV_DFU_READY, s_dfu.expected_crc);
    LOG_I("dfu", "staged image %u.%u.%u verified", s_dfu.staged_major,
          s_dfu.staged_minor, s_dfu.staged_patch);
    return DFU_OK;
}

void dfu_abort(void)
{
    if (s_dfu.state != DFU_IDLE) {
        LOG_I("dfu", "aborted at %lu/%lu bytes", (unsigned long)s_dfu.received,
              (unsigned long)s_dfu.total_size);
    }
    s_dfu.state = DFU_IDLE;
    s_word_fill = 0;
}

dfu_status_t dfu_activate(void)
{
    if (s_dfu.state != DFU_READY) {
        return DFU_ERR_STATE;
    }
    LOG_I("dfu", "rebooting into bootloader to install update");
    uart_flush(200u);
    POWER_GPREGRET = DFU_GPREGRET_SWAP;
    board_system_reset();
}

const dfu_info_t *dfu_info(void)
{
    return &s_dfu;
}

const char *dfu_state_name(dfu_state_t st)
{
    static const char *const names[] = {
        [DFU_IDLE] = "idle",
        [DFU_RECEIVING] = "receiving",
        [DFU_VERIFYING] = "verifying",
        [DFU_READY] = "ready",
        [DFU_FAILED] = "failed",
    };
    return ((unsigned)st < ARRAY_SIZE(names)) ? names[st] : "?";
}

const char *dfu_status_text(dfu_status_t st)
{
    switch (st) {
    case DFU_OK:            return "ok";
    case DFU_ERR_STATE:     return "wrong state";
    case DFU_ERR_SIZE:      return "bad size";
    case DFU_ERR_OFFSET:    return "unexpected offset";
    case DFU_ERR_FLASH:     return "flash write failed";
    case DFU_ERR_CRC:       return "crc mismatch";
    case DFU_ERR_HEADER:    return "invalid image header";
    case DFU_ERR_HW_ID:     return "image is for other hardware";
    case DFU_ERR_DOWNGRADE: return "downgrade refused";
    default:                return "error";
    }
}

uint32_t dfu_progress_permille(void)
{
    if (s_dfu.total_size == 0u) {
        return 0u;
    }
    return (uint32_t)(((uint64_t)s_dfu.received * 1000u) / s_dfu.total_size);
}

static int hex_nibble(char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    c = fw_tolower(c);
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    return -1;
}

int dfu_hex_decode(const char *hex, uint8_t *out, size_t out_size)
{
    size_t len = strlen(hex);
    size_t n = len / 2u;

    if ((len & 1u) != 0u || n > out_size) {
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        int hi = hex_nibble(hex[2u * i]);
        int lo = hex_nibble(hex[2u * i + 1u]);
        if (hi < 0 || lo < 0) {
            return -1;
        }
        out[i] = (uint8_t)((hi << 4) | lo);
    }
    return (int)n;
}
