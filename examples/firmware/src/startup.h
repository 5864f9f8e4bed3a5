/*
 * startup.h - crash record preserved across resets, and linker symbols.
 */
#ifndef STARTUP_H
#define STARTUP_H

#include <stdbool.h>
#include <stdint.h>

#define CRASH_MAGIC 0xDEADC0DEu

typedef struct {
    uint32_t magic;
    uint32_t r0, r1, r2, r3, r12, lr, pc, xpsr;
    uint32_t cfsr;
    uint32_t hfsr;
    uint32_t mmfar;
    uint32_t bfar;
    uint32_t exc_return;
    uint32_t count;
} crash_record_t;

/* Returns the record left by the previous fault, if any. */
const crash_record_t *crash_record_get(void);
void                  crash_record_clear(void);

/* Linker-provided layout symbols. */
extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _estack;
extern uint32_t _heap_start, _stack_limit;
extern const uint8_t __fw_image_start[], __fw_image_end[];

uint32_t startup_stack_unused(void);

#endif /* STARTUP_H */
