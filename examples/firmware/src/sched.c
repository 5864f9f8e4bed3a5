/*
 * sched.c - SysTick time base and cooperative scheduler.
 */
#include "sched.h"
#include "cpu.h"
#include "fwlib.h"

static volatile uint32_t s_ticks_ms;
static volatile uint32_t s_ticks_wraps;

static task_t s_tasks[SCHED_MAX_TASKS];
static unsigned s_task_count;

static uint32_t s_idle_cycles;
static uint32_t s_window_start_cycles;
static uint32_t s_idle_percent;

void SysTick_Handler(void);

void SysTick_Handler(void)
{
    uint32_t t = s_ticks_ms + 1u;
    s_ticks_ms = t;
    if (t == 0u) {
        s_ticks_wraps++;
    }
}

void systick_init(uint32_t core_hz, uint32_t tick_hz)
{
    SYST_CSR = 0u;
    SYST_RVR = core_hz / tick_hz - 1u;
    SYST_CVR = 0u;
    /* Lowest priority for SysTick: it only advances the time base. */
    SCB_SHPR3 = (SCB_SHPR3 & 0x00FFFFFFu) | (0xE0u << 24);
    SYST_CSR = SYST_CSR_CLKSOURCE | SYST_CSR_TICKINT | SYST_CSR_ENABLE;
}

uint32_t systick_ms(void)
{
    return s_ticks_ms;
}

uint64_t systick_ms64(void)
{
    uint32_t hi;
    uint32_t lo;

    do {
        hi = s_ticks_wraps;
        lo = s_ticks_ms;
    } while (hi != s_ticks_wraps);
    return ((uint64_t)hi << 32) | lo;
}

void systick_delay_ms(uint32_t ms)
{
    uint32_t start = systick_ms();
    while ((systick_ms() - start) < ms) {
        cpu_wfi();
    }
}

void sched_init(void)
{
    memset(s_tasks, 0, sizeof(s_tasks));
    s_task_count = 0;
    s_idle_cycles = 0;
    s_window_start_cycles = cpu_cycles();
    s_idle_percent = 100u;
}

static bool valid(task_id_t id)
{
    return id >= 0 && (unsigned)id < s_task_count;
}

task_id_t sched_add(const char *name, task_fn_t fn, void *ctx,
                    uint32_t period_ms, uint32_t first_delay_ms)
{
    if (fn == NULL || s_task_count >= SCHED_MAX_TASKS) {
        return TASK_INVALID;
    }
    task_t *t = &s_tasks[s_task_count];
    t->name = name;
    t->fn = fn;
    t->ctx = ctx;
    t->period_ms = period_ms;
    t->next_run_ms = systick_ms() + first_delay_ms;
    t->enabled = true;
    return (task_id_t)s_task_count++;
}

bool sched_set_period(task_id_t id, uint32_t period_ms)
{
    if (!valid(id) || period_ms == 0u) {
        return false;
    }
    s_tasks[id].period_ms = period_ms;
    s_tasks[id].next_run_ms = systick_ms() + period_ms;
    return true;
}

bool sched_enable(task_id_t id, bool enabled)
{
    if (!valid(id)) {
        return false;
    }
    s_tasks[id].enabled = enabled;
    if (enabled) {
        s_tasks[id].next_run_ms = systick_ms();
    }
    return true;
}

void sched_trigger(task_id_t id)
{
    if (valid(id)) {
        s_tasks[id].next_run_ms = systick_ms();
    }
}

task_id_t sched_find(const char *name)
{
    for (unsigned i = 0; i < s_task_count; i++) {
        if (strcmp(s_tasks[i].name, name) == 0) {
            return (task_id_t)i;
        }
    }
    return TASK_INVALID;
}

static void run_task(task_t *t, uint32_t now)
{
    uint32_t start = cpu_cycles();
    int32_t lateness = (int32_t)(now - t->next_run_ms);

    if (t->period_ms != 0u && lateness >= (int32_t)t->period_ms) {
        t->overruns++;
        /* Skip the missed slots instead of running a burst to catch up. */
        t->next_run_ms = now + t->period_ms;
    } else {
        t->next_run_ms += t->period_ms;
    }
    if (t->period_ms == 0u) {
        t->enabled = false; /* one-shot */
    }

    t->fn(t->ctx);

    uint32_t cycles = cpu_cycles() - start;
    t->runs++;
    t->last_cycles = cycles;
    t->total_cycles += cycles;
    if (cycles > t->max_cycles) {
        t->max_cycles = cycles;
    }
}

unsigned sched_run_pending(void)
{
    unsigned ran = 0;

    for (unsigned i = 0; i < s_task_count; i++) {
        task_t *t = &s_tasks[i];
        uint32_t now = systick_ms();
        if (t->enabled && (int32_t)(now - t->next_run_ms) >= 0) {
            run_task(t, now);
            ran++;
        }
    }
    return ran;
}

uint32_t sched_ms_until_next(void)
{
    uint32_t now = systick_ms();
    uint32_t best = UINT32_MAX;

    for (unsigned i = 0; i < s_task_count; i++) {
        const task_t *t = &s_tasks[i];
        if (!t->enabled) {
            continue;
        }
        int32_t delta = (int32_t)(t->next_run_ms - now);
        if (delta <= 0) {
            return 0u;
        }
        if ((uint32_t)delta < best) {
            best = (uint32_t)delta;
        }
    }
    return best;
}

unsigned sched_task_count(void)
{
    return s_task_count;
}

const task_t *sched_task(unsigned index)
{
    return (index < s_task_count) ? &s_tasks[index] : NULL;
}

void sched_note_idle(uint32_t cycles)
{
    uint32_t now = cpu_cycles();
    uint32_t window = now - s_window_start_cycles;

    s_idle_cycles += cycles;
    /* Recompute roughly once a second at 64 MHz. */
    if (window >= 64000000u) {
        s_idle_percent = (uint32_t)(((uint64_t)s_idle_cycles * 100u) / window);
        s_idle_cycles = 0;
        s_window_start_cycles = now;
    }
}

uint32_t sched_idle_percent(void)
{
    return s_idle_percent;
}

void sched_reset_stats(void)
{
    for (unsigned i = 0; i < s_task_count; i++) {
        s_tasks[i].runs = 0;
        s_tasks[i].overruns = 0;
        s_tasks[i].max_cycles = 0;
        s_tasks[i].total_cycles = 0;
    }
}
