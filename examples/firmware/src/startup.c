/*
 * startup.c - vector table, reset handler and fault capture for Cortex-M4.
 */
#include "startup.h"
#include "cpu.h"
#include "nrf52.h"

#define STACK_FILL_PATTERN 0xA5A5A5A5u

int  main(void);
void Reset_Handler(void);
void Default_Handler(void);
void NMI_Handler(void);
void HardFault_Handler(void);
void MemManage_Handler(void);
void BusFault_Handler(void);
void UsageFault_Handler(void);
void fault_capture(const uint32_t *frame, uint32_t exc_return);

#define WEAK_ALIAS __attribute__((weak, alias("Default_Handler")))
void SVC_Handler(void)            WEAK_ALIAS;
void DebugMon_Handler(void)       WEAK_ALIAS;
void PendSV_Handler(void)         WEAK_ALIAS;
void SysTick_Handler(void)        WEAK_ALIAS;
void POWER_CLOCK_IRQHandler(void) WEAK_ALIAS;
void RADIO_IRQHandler(void)       WEAK_ALIAS;
void UARTE0_UART0_IRQHandler(void) WEAK_ALIAS;
void SPIM0_TWIM0_IRQHandler(void) WEAK_ALIAS;
void SPIM1_TWIM1_IRQHandler(void) WEAK_ALIAS;
void NFCT_IRQHandler(void)        WEAK_ALIAS;
void GPIOTE_IRQHandler(void)      WEAK_ALIAS;
void SAADC_IRQHandler(void)       WEAK_ALIAS;
void TIMER0_IRQHandler(void)      WEAK_ALIAS;
void TIMER1_IRQHandler(void)      WEAK_ALIAS;
void TIMER2_IRQHandler(void)      WEAK_ALIAS;
void RTC0_IRQHandler(void)        WEAK_ALIAS;
void TEMP_IRQHandler(void)        WEAK_ALIAS;
void RNG_IRQHandler(void)         WEAK_ALIAS;
void ECB_IRQHandler(void)         WEAK_ALIAS;
void CCM_AAR_IRQHandler(void)     WEAK_ALIAS;
void WDT_IRQHandler(void)         WEAK_ALIAS;
void RTC1_IRQHandler(void)        WEAK_ALIAS;
void QDEC_IRQHandler(void)        WEAK_ALIAS;
void COMP_LPCOMP_IRQHandler(void) WEAK_ALIAS;
void SWI0_EGU0_IRQHandler(void)   WEAK_ALIAS;
void SWI1_EGU1_IRQHandler(void)   WEAK_ALIAS;
void SWI2_EGU2_IRQHandler(void)   WEAK_ALIAS;
void SWI3_EGU3_IRQHandler(void)   WEAK_ALIAS;
void SWI4_EGU4_IRQHandler(void)   WEAK_ALIAS;
void SWI5_EGU5_IRQHandler(void)   WEAK_ALIAS;
void TIMER3_IRQHandler(void)      WEAK_ALIAS;
void TIMER4_IRQHandler(void)      WEAK_ALIAS;
void PWM0_IRQHandler(void)        WEAK_ALIAS;
void PDM_IRQHandler(void)         WEAK_ALIAS;
void MWU_IRQHandler(void)         WEAK_ALIAS;
void PWM1_IRQHandler(void)        WEAK_ALIAS;
void PWM2_IRQHandler(void)        WEAK_ALIAS;
void SPIM2_IRQHandler(void)       WEAK_ALIAS;
void RTC2_IRQHandler(void)        WEAK_ALIAS;
void I2S_IRQHandler(void)         WEAK_ALIAS;
void FPU_IRQHandler(void)         WEAK_ALIAS;
void USBD_IRQHandler(void)        WEAK_ALIAS;
void UARTE1_IRQHandler(void)      WEAK_ALIAS;
void QSPI_IRQHandler(void)        WEAK_ALIAS;
void CRYPTOCELL_IRQHandler(void)  WEAK_ALIAS;
void PWM3_IRQHandler(void)        WEAK_ALIAS;
void SPIM3_IRQHandler(void)       WEAK_ALIAS;

typedef void (*vector_t)(void);

typedef struct {
    uint32_t *initial_sp;
    vector_t  handlers[15 + IRQ_COUNT];
} vector_table_t;

__attribute__((section(".isr_vector"), used))
const vector_table_t g_vector_table = {
    .initial_sp = &_estack,
    .handlers = {
        Reset_Handler,
        NMI_Handler,
        HardFault_Handler,
        MemManage_Handler,
        BusFault_Handler,
        UsageFault_Handler,
        0, 0, 0, 0,
        SVC_Handler,
        DebugMon_Handler,
        0,
        PendSV_Handler,
        SysTick_Handler,
        /* External interrupts */
        [15 + IRQ_POWER_CLOCK] = POWER_CLOCK_IRQHandler,
        [15 + IRQ_RADIO]       = RADIO_IRQHandler,
        [15 + IRQ_UARTE0]      = UARTE0_UART0_IRQHandler,
        [15 + IRQ_SPIM0_TWIM0] = SPIM0_TWIM0_IRQHandler,
        [15 + IRQ_SPIM1_TWIM1] = SPIM1_TWIM1_IRQHandler,
        [15 + IRQ_NFCT]        = NFCT_IRQHandler,
        [15 + IRQ_GPIOTE]      = GPIOTE_IRQHandler,
        [15 + IRQ_SAADC]       = SAADC_IRQHandler,
        [15 + IRQ_TIMER0]      = TIMER0_IRQHandler,
        [15 + IRQ_TIMER1]      = TIMER1_IRQHandler,
        [15 + IRQ_TIMER2]      = TIMER2_IRQHandler,
        [15 + IRQ_RTC0]        = RTC0_IRQHandler,
        [15 + IRQ_TEMP]        = TEMP_IRQHandler,
        [15 + IRQ_RNG]         = RNG_IRQHandler,
        [15 + IRQ_ECB]         = ECB_IRQHandler,
        [15 + IRQ_CCM_AAR]     = CCM_AAR_IRQHandler,
        [15 + IRQ_WDT]         = WDT_IRQHandler,
        [15 + IRQ_RTC1]        = RTC1_IRQHandler,
        [15 + IRQ_QDEC]        = QDEC_IRQHandler,
        [15 + IRQ_COMP_LPCOMP] = COMP_LPCOMP_IRQHandler,
        [15 + IRQ_SWI0_EGU0]   = SWI0_EGU0_IRQHandler,
        [15 + IRQ_SWI1_EGU1]   = SWI1_EGU1_IRQHandler,
        [15 + IRQ_SWI2_EGU2]   = SWI2_EGU2_IRQHandler,
        [15 + IRQ_SWI3_EGU3]   = SWI3_EGU3_IRQHandler,
        [15 + IRQ_SWI4_EGU4]   = SWI4_EGU4_IRQHandler,
        [15 + IRQ_SWI5_EGU5]   = SWI5_EGU5_IRQHandler,
        [15 + IRQ_TIMER3]      = TIMER3_IRQHandler,
        [15 + IRQ_TIMER4]      = TIMER4_IRQHandler,
        [15 + IRQ_PWM0]        = PWM0_IRQHandler,
        [15 + IRQ_PDM]         = PDM_IRQHandler,
        [15 + IRQ_MWU]         = MWU_IRQHandler,
        [15 + IRQ_PWM1]        = PWM1_IRQHandler,
        [15 + IRQ_PWM2]        = PWM2_IRQHandler,
        [15 + IRQ_SPIM2]       = SPIM2_IRQHandler,
        [15 + IRQ_RTC2]        = RTC2_IRQHandler,
        [15 + IRQ_I2S]         = I2S_IRQHandler,
        [15 + IRQ_FPU]         = FPU_IRQHandler,
        [15 + IRQ_USBD]        = USBD_IRQHandler,
        [15 + IRQ_UARTE1]      = UARTE1_IRQHandler,
        [15 + IRQ_QSPI]        = QSPI_IRQHandler,
        [15 + IRQ_CRYPTOCELL]  = CRYPTOCELL_IRQHandler,
        [15 + IRQ_PWM3]        = PWM3_IRQHandler,
        [15 + IRQ_SPIM3]       = SPIM3_IRQHandler,
    },
};

/* Survives warm resets: the reset handler does not touch .noinit. */
__attribute__((section(".noinit")))
static crash_record_t s_crash;

static void fill_stack_guard(void)
{
    /* Paint the unused stack so the high-water mark can be measured. */
    uint32_t *p = &_stack_limit;
    uint32_t *sp = (uint32_t *)(cpu_get_msp() - 64u);
    while (p < sp) {
        *p++ = STACK_FILL_PATTERN;
    }
}

__attribute__((noreturn))
void Reset_Handler(void)
{
    uint32_t *src = &_sidata;
    uint32_t *dst = &_sdata;

    while (dst < &_edata) {
        *dst++ = *src++;
    }
    for (dst = &_sbss; dst < &_ebss; dst++) {
        *dst = 0u;
    }

    SCB_VTOR = (uint32_t)(uintptr_t)&g_vector_table;
    /* Full access to CP10/CP11 so that FPU instructions in libgcc helpers
     * never fault, even though application code is fixed point. */
    SCB_CPACR |= (0xFu << 20);
    cpu_dsb();
    cpu_isb();

    fill_stack_guard();
    (void)main();

    /* main() is not expected to return; park the core if it does. */
    for (;;) {
        cpu_wfi();
    }
}

uint32_t startup_stack_unused(void)
{
    const uint32_t *p = &_stack_limit;
    uint32_t unused = 0;

    while (p < &_estack && *p == STACK_FILL_PATTERN) {
        unused += 4u;
        p++;
    }
    return unused;
}

void Default_Handler(void)
{
    /* An interrupt without a driver: stop here so it is noticed under a
     * debugger; the watchdog recovers the node in the field. */
    for (;;) {
        cpu_nop();
    }
}

void NMI_Handler(void)
{
    for (;;) {
        cpu_nop();
    }
}

/*
 * The fault entry stubs pick the stack that was active when the fault
 * happened and hand the stacked register frame to fault_capture().
 */
#define FAULT_STUB(name)                                  \
    __attribute__((naked)) void name(void)                \
    {                                                     \
        __asm volatile (                                  \
            "tst   lr, #4          \n"                    \
            "ite   eq              \n"                    \
            "mrseq r0, msp         \n"                    \
            "mrsne r0, psp         \n"                    \
            "mov   r1, lr          \n"                    \
            "b     fault_capture   \n");                  \
    }

FAULT_STUB(HardFault_Handler)
FAULT_STUB(MemManage_Handler)
FAULT_STUB(BusFault_Handler)
FAULT_STUB(UsageFault_Handler)

__attribute__((used, noreturn))
void fault_capture(const uint32_t *frame, uint32_t exc_return)
{
    uint32_t count = (s_crash.magic == CRASH_MAGIC) ? s_crash.count : 0u;

    s_crash.r0 = frame[0];
    s_crash.r1 = frame[1];
    s_crash.r2 = frame[2];
    s_crash.r3 = frame[3];
    s_crash.r12 = frame[4];
    s_crash.lr = frame[5];
    s_crash.pc = frame[6];
    s_crash.xpsr = frame[7];
    s_crash.cfsr = SCB_CFSR;
    s_crash.hfsr = SCB_HFSR;
    s_crash.mmfar = SCB_MMFAR;
    s_crash.bfar = SCB_BFAR;
    s_crash.exc_return = exc_return;
    s_crash.count = count + 1u;
    s_crash.magic = CRASH_MAGIC;

    /* Reset and report the record from the next boot. */
    cpu_dsb();
    SCB_AIRCR = SCB_AIRCR_VECTKEY | SCB_AIRCR_SYSRESETREQ;
    cpu_dsb();
    for (;;) {
        cpu_nop();
    }
}

const crash_record_t *crash_record_get(void)
{
    return (s_crash.magic == CRASH_MAGIC) ? &s_crash : (const crash_record_t *)0;
}

void crash_record_clear(void)
{
    s_crash.magic = 0u;
}
