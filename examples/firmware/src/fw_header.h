/*
 * fw_header.h - image descriptor placed right after the vector table.
 *
 * The bootloader and the OTA agent read this to identify an image before
 * booting it or accepting it as an update: magic, hardware id, version and
 * the linked image size. The CRC field is filled in by the release tooling
 * after linking (it stays 0xFFFFFFFF in development builds).
 */
#ifndef FW_HEADER_H
#define FW_HEADER_H

#include <stdint.h>

#define FW_HEADER_MAGIC   0x57464853u  /* "SHFW" little endian */
#define FW_HEADER_VERSION 1u

typedef struct {
    uint32_t magic;
    uint16_t header_version;
    uint16_t header_size;
    uint32_t hw_id;
    uint8_t  ver_major;
    uint8_t  ver_minor;
    uint16_t ver_patch;
    const void *image_start;
    const void *image_end;
    uint32_t image_crc32;
    char     product[16];
    char     release[8];
} fw_image_header_t;

extern const fw_image_header_t g_fw_header;

/* Computes the CRC-32 over [image_start, image_end). */
uint32_t fw_header_compute_crc(void);

#endif /* FW_HEADER_H */
