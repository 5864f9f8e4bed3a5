/*
 * fw_header.c - the image descriptor instance.
 */
#include "fw_header.h"
#include "crc.h"
#include "fw_config.h"
#include "startup.h"

__attribute__((section(".fw_header"), used))
const fw_image_header_t g_fw_header = {
    .magic = FW_HEADER_MAGIC,
    .header_version = FW_HEADER_VERSION,
    .header_size = sizeof(fw_image_header_t),
    .hw_id = FW_HW_ID,
    .ver_major = FW_VERSION_MAJOR,
    .ver_minor = FW_VERSION_MINOR,
    .ver_patch = FW_VERSION_PATCH,
    .image_start = __fw_image_start,
    .image_end = __fw_image_end,
    .image_crc32 = 0xFFFFFFFFu,
    .product = FW_PRODUCT_NAME,
    .release = FW_RELEASE_NAME,
};

uint32_t fw_header_compute_crc(void)
{
    const uint8_t *start = g_fw_header.image_start;
    const uint8_t *end = g_fw_header.image_end;
    uint32_t crc = CRC32_INIT;

    /* The header's own CRC field is treated as 0xFFFFFFFF so the value does
     * not depend on itself. */
    const uint8_t *crc_field = (const uint8_t *)&g_fw_header.image_crc32;
    const uint8_t ff[4] = { 0xFFu, 0xFFu, 0xFFu, 0xFFu };

    crc = crc32_update(crc, start, (size_t)(crc_field - start));
    crc = crc32_update(crc, ff, sizeof(ff));
    crc_field += sizeof(ff);
    crc = crc32_update(crc, crc_field, (size_t)(end - crc_field));
    return crc32_final(crc);
}
