/*
 * sched.h - SysTick time base and a cooperative periodic task scheduler.
 */
#ifndef SCHED_H
#define SCHED_H

#include <stdbool.h>
#include <stdint.h>

#define SCHED_MAX_TASKS 12u

typedef void (*task_fn_t)(void *ctx);

typedef struct {
    const char *name;
    task_fn_t fn;
    void *ctx;
    uint32_t period_ms;
    uint32_t next_run_ms;
    uint32_t runs;
    uint32_t overruns;       /* started later than one full period */
    uint32_t last_cycles;
    uint32_t max_cycles;
    uint64_t total_cycles;
    bool enabled;
} task_t;

typedef int task_id_t;
#define TASK_INVALID (-1)

void        systick_init(uint32_t core_hz, uint32_t tick_hz);
uint32_t    systick_ms(void);
uint64_t    systick_ms64(void);
void        systick_delay_ms(uint32_t ms);

void        sched_init(void);
task_id_t   sched_add(const char *name, task_fn_t fn, void *ctx,
                      uint32_t period_ms, uint32_t first_delay_ms);
bool        sched_set_period(task_id_t id, uint32_t period_ms);
bool        sched_enable(task_id_t id, bool enabled);
void        sched_trigger(task_id_t id);
task_id_t   sched_find(const char *name);

/* Runs every due task once; returns the number of tasks run. */
unsigned    sched_run_pending(void);
/* Milliseconds until the next task is due (0 if one is due now). */
uint32_t    sched_ms_until_next(void);

unsigned      sched_task_count(void);
const task_t *sched_task(unsigned index);
uint32_t      sched_idle_percent(void);
void          sched_note_idle(uint32_t cycles);
void          sched_reset_stats(void);

#endif /* SCHED_H */
