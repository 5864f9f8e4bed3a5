/*
 * ringbuf.h - single-producer / single-consumer byte ring buffer.
 *
 * Head and tail are free-running 16-bit counters; the storage size must be a
 * power of two no larger than 32768. One side may run in interrupt context
 * without locking as long as each index is written by exactly one side.
 */
#ifndef RINGBUF_H
#define RINGBUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint8_t *storage;
    uint16_t mask;
    volatile uint16_t head;   /* written by the producer */
    volatile uint16_t tail;   /* written by the consumer */
    uint16_t high_water;
    uint32_t overflows;
} ringbuf_t;

bool     rb_init(ringbuf_t *rb, uint8_t *storage, size_t size);
void     rb_clear(ringbuf_t *rb);
size_t   rb_capacity(const ringbuf_t *rb);
size_t   rb_count(const ringbuf_t *rb);
size_t   rb_free(const ringbuf_t *rb);
bool     rb_is_empty(const ringbuf_t *rb);
bool     rb_is_full(const ringbuf_t *rb);

bool     rb_put(ringbuf_t *rb, uint8_t byte);
bool     rb_get(ringbuf_t *rb, uint8_t *byte);
bool     rb_peek(const ringbuf_t *rb, size_t offset, uint8_t *byte);

/* Bulk transfers; return the number of bytes actually moved. */
size_t   rb_write(ringbuf_t *rb, const uint8_t *data, size_t len);
size_t   rb_read(ringbuf_t *rb, uint8_t *data, size_t len);

/*
 * Zero-copy consumer access for DMA: returns a pointer to the longest
 * contiguous run of readable bytes and its length. Call rb_consume() once
 * the bytes have been used.
 */
size_t   rb_linear_read(const ringbuf_t *rb, const uint8_t **ptr);
void     rb_consume(ringbuf_t *rb, size_t len);

#endif /* RINGBUF_H */
