/*
 * cpu.h - Cortex-M4 core registers and intrinsics used by the firmware.
 */
#ifndef CPU_H
#define CPU_H

#include <stdint.h>

#define REG32(addr) (*(volatile uint32_t *)(uintptr_t)(addr))
#define REG8(addr)  (*(volatile uint8_t *)(uintptr_t)(addr))

/* SysTick */
#define SYST_CSR        REG32(0xE000E010u)
#define SYST_RVR        REG32(0xE000E014u)
#define SYST_CVR        REG32(0xE000E018u)
#define SYST_CSR_ENABLE    (1u << 0)
#define SYST_CSR_TICKINT   (1u << 1)
#define SYST_CSR_CLKSOURCE (1u << 2)

/* System control block */
#define SCB_ICSR        REG32(0xE000ED04u)
#define SCB_VTOR        REG32(0xE000ED08u)
#define SCB_AIRCR       REG32(0xE000ED0Cu)
#define SCB_SCR         REG32(0xE000ED10u)
#define SCB_CCR         REG32(0xE000ED14u)
#define SCB_SHPR3       REG32(0xE000ED20u)
#define SCB_SHCSR       REG32(0xE000ED24u)
#define SCB_CFSR        REG32(0xE000ED28u)
#define SCB_HFSR        REG32(0xE000ED2Cu)
#define SCB_MMFAR       REG32(0xE000ED34u)
#define SCB_BFAR        REG32(0xE000ED38u)
#define SCB_CPACR       REG32(0xE000ED88u)
#define SCB_AIRCR_VECTKEY   (0x05FAu << 16)
#define SCB_AIRCR_SYSRESETREQ (1u << 2)
#define SCB_CCR_DIV_0_TRP   (1u << 4)
#define SCB_CCR_UNALIGN_TRP (1u << 3)
#define SCB_SHCSR_USGFAULTENA (1u << 18)
#define SCB_SHCSR_BUSFAULTENA (1u << 17)
#define SCB_SHCSR_MEMFAULTENA (1u << 16)

/* NVIC */
#define NVIC_ISER(n)    REG32(0xE000E100u + 4u * (n))
#define NVIC_ICER(n)    REG32(0xE000E180u + 4u * (n))
#define NVIC_ICPR(n)    REG32(0xE000E280u + 4u * (n))
#define NVIC_IPR(irq)   REG8(0xE000E400u + (irq))
#define NVIC_PRIO_BITS  3u

/* Debug / DWT cycle counter */
#define DEMCR           REG32(0xE000EDFCu)
#define DEMCR_TRCENA    (1u << 24)
#define DWT_CTRL        REG32(0xE0001000u)
#define DWT_CYCCNT      REG32(0xE0001004u)
#define DWT_CTRL_CYCCNTENA (1u << 0)

static inline void cpu_irq_enable(void)  { __asm volatile ("cpsie i" ::: "memory"); }
static inline void cpu_irq_disable(void) { __asm volatile ("cpsid i" ::: "memory"); }
static inline void cpu_wfi(void)         { __asm volatile ("wfi"); }
static inline void cpu_dsb(void)         { __asm volatile ("dsb 0xF" ::: "memory"); }
static inline void cpu_isb(void)         { __asm volatile ("isb 0xF" ::: "memory"); }
static inline void cpu_nop(void)         { __asm volatile ("nop"); }

static inline uint32_t cpu_irq_save(void)
{
    uint32_t primask;
    __asm volatile ("mrs %0, primask\n\tcpsid i" : "=r" (primask) :: "memory");
    return primask;
}

static inline void cpu_irq_restore(uint32_t primask)
{
    __asm volatile ("msr primask, %0" :: "r" (primask) : "memory");
}

static inline uint32_t cpu_get_msp(void)
{
    uint32_t sp;
    __asm volatile ("mrs %0, msp" : "=r" (sp));
    return sp;
}

static inline void nvic_enable_irq(uint32_t irq)
{
    NVIC_ISER(irq >> 5) = 1u << (irq & 31u);
}

static inline void nvic_disable_irq(uint32_t irq)
{
    NVIC_ICER(irq >> 5) = 1u << (irq & 31u);
    cpu_dsb();
    cpu_isb();
}

static inline void nvic_clear_pending(uint32_t irq)
{
    NVIC_ICPR(irq >> 5) = 1u << (irq & 31u);
}

static inline void nvic_set_priority(uint32_t irq, uint32_t prio)
{
    NVIC_IPR(irq) = (uint8_t)((prio << (8u - NVIC_PRIO_BITS)) & 0xFFu);
}

static inline uint32_t cpu_cycles(void)
{
    return DWT_CYCCNT;
}

#define CRITICAL_SECTION_ENTER() uint32_t cs_primask__ = cpu_irq_save()
#define CRITICAL_SECTION_EXIT()  cpu_irq_restore(cs_primask__)

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define UNUSED(x)     ((void)(x))

#endif /* CPU_H */
