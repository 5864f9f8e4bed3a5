/*
 * ringbuf.c - lock-free SPSC byte ring buffer.
 */
#include "ringbuf.h"
#include "cpu.h"

static inline uint16_t used(const ringbuf_t *rb)
{
    return (uint16_t)(rb->head - rb->tail);
}

static void note_level(ringbuf_t *rb)
{
    uint16_t level = used(rb);
    if (level > rb->high_water) {
        rb->high_water = level;
    }
}

bool rb_init(ringbuf_t *rb, uint8_t *storage, size_t size)
{
    if (storage == NULL || size < 2u || size > 32768u || (size & (size - 1u)) != 0u) {
        return false;
    }
    rb->storage = storage;
    rb->mask = (uint16_t)(size - 1u);
    rb->head = 0;
    rb->tail = 0;
    rb->high_water = 0;
    rb->overflows = 0;
    return true;
}

void rb_clear(ringbuf_t *rb)
{
    CRITICAL_SECTION_ENTER();
    rb->tail = rb->head;
    CRITICAL_SECTION_EXIT();
}

size_t rb_capacity(const ringbuf_t *rb)
{
    return (size_t)rb->mask + 1u;
}

size_t rb_count(const ringbuf_t *rb)
{
    return used(rb);
}

size_t rb_free(const ringbuf_t *rb)
{
    return rb_capacity(rb) - used(rb);
}

bool rb_is_empty(const ringbuf_t *rb)
{
    return rb->head == rb->tail;
}

bool rb_is_full(const ringbuf_t *rb)
{
    return used(rb) > rb->mask;
}

bool rb_put(ringbuf_t *rb, uint8_t byte)
{
    if (rb_is_full(rb)) {
        rb->overflows++;
        return false;
    }
    rb->storage[rb->head & rb->mask] = byte;
    __asm volatile ("" ::: "memory"); /* data before index */
    rb->head = (uint16_t)(rb->head + 1u);
    note_level(rb);
    return true;
}

bool rb_get(ringbuf_t *rb, uint8_t *byte)
{
    if (rb_is_empty(rb)) {
        return false;
    }
    *byte = rb->storage[rb->tail & rb->mask];
    __asm volatile ("" ::: "memory");
    rb->tail = (uint16_t)(rb->tail + 1u);
    return true;
}

bool rb_peek(const ringbuf_t *rb, size_t offset, uint8_t *byte)
{
    if (offset >= used(rb)) {
        return false;
    }
    *byte = rb->storage[(uint16_t)(rb->tail + offset) & rb->mask];
    return true;
}

size_t rb_write(ringbuf_t *rb, const uint8_t *data, size_t len)
{
    size_t space = rb_free(rb);
    size_t n = (len < space) ? len : space;
    uint16_t head = rb->head;

    if (n < len) {
        rb->overflows++;
    }
    for (size_t i = 0; i < n; i++) {
        rb->storage[(uint16_t)(head + i) & rb->mask] = data[i];
    }
    __asm volatile ("" ::: "memory");
    rb->head = (uint16_t)(head + n);
    note_level(rb);
    return n;
}

size_t rb_read(ringbuf_t *rb, uint8_t *data, size_t len)
{
    size_t avail = used(rb);
    size_t n = (len < avail) ? len : avail;
    uint16_t tail = rb->tail;

    for (size_t i = 0; i < n; i++) {
        data[i] = rb->storage[(uint16_t)(tail + i) & rb->mask];
    }
    __asm volatile ("" ::: "memory");
    rb->tail = (uint16_t)(tail + n);
    return n;
}

size_t rb_linear_read(const ringbuf_t *rb, const uint8_t **ptr)
{
    size_t avail = used(rb);
    size_t start = rb->tail & rb->mask;
    size_t to_end = rb_capacity(rb) - start;

    *ptr = &rb->storage[start];
    return (avail < to_end) ? avail : to_end;
}

void rb_consume(ringbuf_t *rb, size_t len)
{
    size_t avail = used(rb);
    if (len > avail) {
        len = avail;
    }
    rb->tail = (uint16_t)(rb->tail + len);
}
