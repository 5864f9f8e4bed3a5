/*
 * crc.h - checksums used by the firmware.
 *
 *   crc8_sensor  : poly 0x31, init 0xFF (sensor bus frames)
 *   crc16_ccitt  : poly 0x1021, init 0xFFFF, no reflection (telemetry frames)
 *   crc32        : IEEE 802.3 reflected, init/xorout 0xFFFFFFFF (settings,
 *                  image self-check); incremental via crc32_update().
 */
#ifndef CRC_H
#define CRC_H

#include <stddef.h>
#include <stdint.h>

#define CRC32_INIT 0xFFFFFFFFu

uint8_t  crc8_sensor(const uint8_t *data, size_t len);
uint16_t crc16_ccitt_update(uint16_t crc, const uint8_t *data, size_t len);
uint16_t crc16_ccitt(const uint8_t *data, size_t len);
uint32_t crc32_update(uint32_t crc, const uint8_t *data, size_t len);
uint32_t crc32_final(uint32_t crc);
uint32_t crc32(const uint8_t *data, size_t len);

#endif /* CRC_H */
