/*
 * dfu.h - receive a new application image into the staging bank.
 *
 * The running image never overwrites itself: an update is written to the
 * upper half of flash, verified (length, CRC-32, image header), and only
 * then handed to the bootloader, which copies it down on the next reset.
 */
#ifndef DFU_H
#define DFU_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define DFU_BANK_ADDR       0x00080000u
#define DFU_BANK_SIZE       0x0007F000u   /* up to the settings page */
#define DFU_GPREGRET_SWAP   0xB1u         /* bootloader: install staged image */

typedef enum {
    DFU_IDLE = 0,
    DFU_RECEIVING,
    DFU_VERIFYING,
    DFU_READY,
    DFU_FAILED,
} dfu_state_t;

typedef enum {
    DFU_OK = 0,
    DFU_ERR_STATE,
    DFU_ERR_SIZE,
    DFU_ERR_OFFSET,
    DFU_ERR_FLASH,
    DFU_ERR_CRC,
    DFU_ERR_HEADER,
    DFU_ERR_HW_ID,
    DFU_ERR_DOWNGRADE,
} dfu_status_t;

typedef struct {
    dfu_state_t state;
    dfu_status_t last_error;
    uint32_t total_size;
    uint32_t received;
    uint32_t expected_crc;
    uint32_t pages_erased;
    uint32_t chunks;
    uint8_t  staged_major;
    uint8_t  staged_minor;
    uint16_t staged_patch;
} dfu_info_t;

void          dfu_init(void);
dfu_status_t  dfu_begin(uint32_t total_size, uint32_t expected_crc);
dfu_status_t  dfu_write(uint32_t offset, const uint8_t *data, size_t len);
dfu_status_t  dfu_finish(bool allow_downgrade);
void          dfu_abort(void);
dfu_status_t  dfu_activate(void);

const dfu_info_t *dfu_info(void);
const char   *dfu_state_name(dfu_state_t st);
const char   *dfu_status_text(dfu_status_t st);
uint32_t      dfu_progress_permille(void);

/* Decodes a hex string ("a1b2...") into bytes; returns byte count or -1. */
int           dfu_hex_decode(const char *hex, uint8_t *out, size_t out_size);

#endif /* DFU_H */
