/*
 * nrf52.h - peripheral register map for the nRF52840-class target.
 *
 * Only the registers the firmware actually touches are listed. Access is
 * through REG32(base + offset) so that every offset is spelled out next to
 * the peripheral it belongs to.
 */
#ifndef NRF52_H
#define NRF52_H

#include "cpu.h"

/* ---- Interrupt numbers ------------------------------------------------- */
enum {
    IRQ_POWER_CLOCK = 0,
    IRQ_RADIO       = 1,
    IRQ_UARTE0      = 2,
    IRQ_SPIM0_TWIM0 = 3,
    IRQ_SPIM1_TWIM1 = 4,
    IRQ_NFCT        = 5,
    IRQ_GPIOTE      = 6,
    IRQ_SAADC       = 7,
    IRQ_TIMER0      = 8,
    IRQ_TIMER1      = 9,
    IRQ_TIMER2      = 10,
    IRQ_RTC0        = 11,
    IRQ_TEMP        = 12,
    IRQ_RNG         = 13,
    IRQ_ECB         = 14,
    IRQ_CCM_AAR     = 15,
    IRQ_WDT         = 16,
    IRQ_RTC1        = 17,
    IRQ_QDEC        = 18,
    IRQ_COMP_LPCOMP = 19,
    IRQ_SWI0_EGU0   = 20,
    IRQ_SWI1_EGU1   = 21,
    IRQ_SWI2_EGU2   = 22,
    IRQ_SWI3_EGU3   = 23,
    IRQ_SWI4_EGU4   = 24,
    IRQ_SWI5_EGU5   = 25,
    IRQ_TIMER3      = 26,
    IRQ_TIMER4      = 27,
    IRQ_PWM0        = 28,
    IRQ_PDM         = 29,
    IRQ_MWU         = 32,
    IRQ_PWM1        = 33,
    IRQ_PWM2        = 34,
    IRQ_SPIM2       = 35,
    IRQ_RTC2        = 36,
    IRQ_I2S         = 37,
    IRQ_FPU         = 38,
    IRQ_USBD        = 39,
    IRQ_UARTE1      = 40,
    IRQ_QSPI        = 41,
    IRQ_CRYPTOCELL  = 42,
    IRQ_PWM3        = 45,
    IRQ_SPIM3       = 47,
    IRQ_COUNT       = 48
};

/* ---- CLOCK / POWER (shared block) -------------------------------------- */
#define CLOCK_BASE                 0x40000000u
#define CLOCK_TASKS_HFCLKSTART     REG32(CLOCK_BASE + 0x000u)
#define CLOCK_TASKS_HFCLKSTOP      REG32(CLOCK_BASE + 0x004u)
#define CLOCK_TASKS_LFCLKSTART     REG32(CLOCK_BASE + 0x008u)
#define CLOCK_EVENTS_HFCLKSTARTED  REG32(CLOCK_BASE + 0x100u)
#define CLOCK_EVENTS_LFCLKSTARTED  REG32(CLOCK_BASE + 0x104u)
#define CLOCK_HFCLKSTAT            REG32(CLOCK_BASE + 0x40Cu)
#define CLOCK_LFCLKSTAT            REG32(CLOCK_BASE + 0x418u)
#define CLOCK_LFCLKSRC             REG32(CLOCK_BASE + 0x518u)
#define CLOCK_LFCLKSRC_XTAL        1u
#define POWER_RESETREAS            REG32(CLOCK_BASE + 0x400u)
#define POWER_DCDCEN               REG32(CLOCK_BASE + 0x578u)
#define POWER_GPREGRET             REG32(CLOCK_BASE + 0x51Cu)

#define RESETREAS_RESETPIN  (1u << 0)
#define RESETREAS_DOG       (1u << 1)
#define RESETREAS_SREQ      (1u << 2)
#define RESETREAS_LOCKUP    (1u << 3)
#define RESETREAS_OFF       (1u << 16)
#define RESETREAS_DIF       (1u << 18)

/* ---- GPIO port 0 ------------------------------------------------------- */
#define P0_BASE        0x50000000u
#define P0_OUT         REG32(P0_BASE + 0x504u)
#define P0_OUTSET      REG32(P0_BASE + 0x508u)
#define P0_OUTCLR      REG32(P0_BASE + 0x50Cu)
#define P0_IN          REG32(P0_BASE + 0x510u)
#define P0_DIR         REG32(P0_BASE + 0x514u)
#define P0_DIRSET      REG32(P0_BASE + 0x518u)
#define P0_DIRCLR      REG32(P0_BASE + 0x51Cu)
#define P0_PIN_CNF(n)  REG32(P0_BASE + 0x700u + 4u * (n))

#define GPIO_CNF_DIR_OUTPUT   (1u << 0)
#define GPIO_CNF_INPUT_DISC   (1u << 1)
#define GPIO_CNF_PULLUP       (3u << 2)
#define GPIO_CNF_PULLDOWN     (1u << 2)
#define GPIO_CNF_DRIVE_H0H1   (3u << 8)

/* ---- UARTE0 ------------------------------------------------------------ */
#define UARTE0_BASE               0x40002000u
#define UARTE_TASKS_STARTRX       0x000u
#define UARTE_TASKS_STOPRX        0x004u
#define UARTE_TASKS_STARTTX       0x008u
#define UARTE_TASKS_STOPTX        0x00Cu
#define UARTE_TASKS_FLUSHRX       0x02Cu
#define UARTE_EVENTS_CTS          0x100u
#define UARTE_EVENTS_NCTS         0x104u
#define UARTE_EVENTS_RXDRDY       0x108u
#define UARTE_EVENTS_ENDRX        0x110u
#define UARTE_EVENTS_TXDRDY       0x11Cu
#define UARTE_EVENTS_ENDTX        0x120u
#define UARTE_EVENTS_ERROR        0x124u
#define UARTE_EVENTS_RXTO         0x144u
#define UARTE_EVENTS_RXSTARTED    0x14Cu
#define UARTE_EVENTS_TXSTARTED    0x150u
#define UARTE_EVENTS_TXSTOPPED    0x158u
#define UARTE_SHORTS              0x200u
#define UARTE_INTEN               0x300u
#define UARTE_INTENSET            0x304u
#define UARTE_INTENCLR            0x308u
#define UARTE_ERRORSRC            0x480u
#define UARTE_ENABLE              0x500u
#define UARTE_PSEL_RTS            0x508u
#define UARTE_PSEL_TXD            0x50Cu
#define UARTE_PSEL_CTS            0x510u
#define UARTE_PSEL_RXD            0x514u
#define UARTE_BAUDRATE            0x524u
#define UARTE_RXD_PTR             0x534u
#define UARTE_RXD_MAXCNT          0x538u
#define UARTE_RXD_AMOUNT          0x53Cu
#define UARTE_TXD_PTR             0x544u
#define UARTE_TXD_MAXCNT          0x548u
#define UARTE_TXD_AMOUNT          0x54Cu
#define UARTE_CONFIG              0x56Cu

#define UARTE_REG(off)            REG32(UARTE0_BASE + (off))
#define UARTE_ENABLE_ENABLED      8u
#define UARTE_PSEL_DISCONNECTED   0xFFFFFFFFu
#define UARTE_SHORTS_ENDRX_STARTRX (1u << 5)
#define UARTE_INT_RXDRDY          (1u << 2)
#define UARTE_INT_ENDRX           (1u << 4)
#define UARTE_INT_ENDTX           (1u << 8)
#define UARTE_INT_ERROR           (1u << 9)
#define UARTE_INT_RXTO            (1u << 17)
#define UARTE_CONFIG_HWFC         (1u << 0)
#define UARTE_CONFIG_PARITY_EVEN  (7u << 1)

/* ---- SAADC ------------------------------------------------------------- */
#define SAADC_BASE                0x40007000u
#define SAADC_TASKS_START         REG32(SAADC_BASE + 0x000u)
#define SAADC_TASKS_SAMPLE        REG32(SAADC_BASE + 0x004u)
#define SAADC_TASKS_STOP          REG32(SAADC_BASE + 0x008u)
#define SAADC_TASKS_CALIBRATE     REG32(SAADC_BASE + 0x00Cu)
#define SAADC_EVENTS_STARTED      REG32(SAADC_BASE + 0x100u)
#define SAADC_EVENTS_END          REG32(SAADC_BASE + 0x104u)
#define SAADC_EVENTS_DONE         REG32(SAADC_BASE + 0x108u)
#define SAADC_EVENTS_RESULTDONE   REG32(SAADC_BASE + 0x10Cu)
#define SAADC_EVENTS_CALDONE      REG32(SAADC_BASE + 0x110u)
#define SAADC_EVENTS_STOPPED      REG32(SAADC_BASE + 0x114u)
#define SAADC_ENABLE              REG32(SAADC_BASE + 0x500u)
#define SAADC_CH_PSELP(n)         REG32(SAADC_BASE + 0x510u + 16u * (n))
#define SAADC_CH_PSELN(n)         REG32(SAADC_BASE + 0x514u + 16u * (n))
#define SAADC_CH_CONFIG(n)        REG32(SAADC_BASE + 0x518u + 16u * (n))
#define SAADC_RESOLUTION          REG32(SAADC_BASE + 0x5F0u)
#define SAADC_OVERSAMPLE          REG32(SAADC_BASE + 0x5F4u)
#define SAADC_SAMPLERATE          REG32(SAADC_BASE + 0x5F8u)
#define SAADC_RESULT_PTR          REG32(SAADC_BASE + 0x62Cu)
#define SAADC_RESULT_MAXCNT       REG32(SAADC_BASE + 0x630u)
#define SAADC_RESULT_AMOUNT       REG32(SAADC_BASE + 0x634u)

#define SAADC_PSEL_AIN(n)         ((n) + 1u)
#define SAADC_PSEL_VDD            9u
#define SAADC_CFG_GAIN1_6         (0u << 8)
#define SAADC_CFG_GAIN1_4         (2u << 8)
#define SAADC_CFG_REFSEL_INTERNAL (0u << 12)
#define SAADC_CFG_TACQ_10US       (2u << 16)
#define SAADC_CFG_TACQ_40US       (5u << 16)
#define SAADC_CFG_BURST           (1u << 24)
#define SAADC_RES_12BIT           2u
#define SAADC_OVERSAMPLE_4X       2u

/* ---- TEMP (die temperature) ------------------------------------------- */
#define TEMP_BASE                 0x4000C000u
#define TEMP_TASKS_START          REG32(TEMP_BASE + 0x000u)
#define TEMP_TASKS_STOP           REG32(TEMP_BASE + 0x004u)
#define TEMP_EVENTS_DATARDY       REG32(TEMP_BASE + 0x100u)
#define TEMP_TEMP                 REG32(TEMP_BASE + 0x508u)

/* ---- WDT --------------------------------------------------------------- */
#define WDT_BASE                  0x40010000u
#define WDT_TASKS_START           REG32(WDT_BASE + 0x000u)
#define WDT_RUNSTATUS             REG32(WDT_BASE + 0x400u)
#define WDT_CRV                   REG32(WDT_BASE + 0x504u)
#define WDT_RREN                  REG32(WDT_BASE + 0x508u)
#define WDT_CONFIG                REG32(WDT_BASE + 0x50Cu)
#define WDT_RR(n)                 REG32(WDT_BASE + 0x600u + 4u * (n))
#define WDT_RELOAD_VALUE          0x6E524635u
#define WDT_CONFIG_SLEEP_RUN      (1u << 0)
#define WDT_CONFIG_HALT_PAUSE     (0u << 3)

/* ---- NVMC (flash controller) ------------------------------------------ */
#define NVMC_BASE                 0x4001E000u
#define NVMC_READY                REG32(NVMC_BASE + 0x400u)
#define NVMC_CONFIG               REG32(NVMC_BASE + 0x504u)
#define NVMC_ERASEPAGE            REG32(NVMC_BASE + 0x508u)
#define NVMC_CONFIG_REN           0u
#define NVMC_CONFIG_WEN           1u
#define NVMC_CONFIG_EEN           2u

/* ---- RNG --------------------------------------------------------------- */
#define RNG_BASE                  0x4000D000u
#define RNG_TASKS_START           REG32(RNG_BASE + 0x000u)
#define RNG_TASKS_STOP            REG32(RNG_BASE + 0x004u)
#define RNG_EVENTS_VALRDY         REG32(RNG_BASE + 0x100u)
#define RNG_CONFIG                REG32(RNG_BASE + 0x504u)
#define RNG_VALUE                 REG32(RNG_BASE + 0x508u)

/* ---- TWIM0 (I2C master with EasyDMA) ---------------------------------- */
#define TWIM0_BASE                0x40003000u
#define TWIM_TASKS_STARTRX        REG32(TWIM0_BASE + 0x000u)
#define TWIM_TASKS_STARTTX        REG32(TWIM0_BASE + 0x008u)
#define TWIM_TASKS_STOP           REG32(TWIM0_BASE + 0x014u)
#define TWIM_TASKS_SUSPEND        REG32(TWIM0_BASE + 0x01Cu)
#define TWIM_TASKS_RESUME         REG32(TWIM0_BASE + 0x020u)
#define TWIM_EVENTS_STOPPED       REG32(TWIM0_BASE + 0x104u)
#define TWIM_EVENTS_ERROR         REG32(TWIM0_BASE + 0x124u)
#define TWIM_EVENTS_SUSPENDED     REG32(TWIM0_BASE + 0x148u)
#define TWIM_EVENTS_RXSTARTED     REG32(TWIM0_BASE + 0x14Cu)
#define TWIM_EVENTS_TXSTARTED     REG32(TWIM0_BASE + 0x150u)
#define TWIM_EVENTS_LASTRX        REG32(TWIM0_BASE + 0x15Cu)
#define TWIM_EVENTS_LASTTX        REG32(TWIM0_BASE + 0x160u)
#define TWIM_SHORTS               REG32(TWIM0_BASE + 0x200u)
#define TWIM_ERRORSRC             REG32(TWIM0_BASE + 0x4C4u)
#define TWIM_ENABLE               REG32(TWIM0_BASE + 0x500u)
#define TWIM_PSEL_SCL             REG32(TWIM0_BASE + 0x508u)
#define TWIM_PSEL_SDA             REG32(TWIM0_BASE + 0x50Cu)
#define TWIM_FREQUENCY            REG32(TWIM0_BASE + 0x524u)
#define TWIM_RXD_PTR              REG32(TWIM0_BASE + 0x534u)
#define TWIM_RXD_MAXCNT           REG32(TWIM0_BASE + 0x538u)
#define TWIM_RXD_AMOUNT           REG32(TWIM0_BASE + 0x53Cu)
#define TWIM_TXD_PTR              REG32(TWIM0_BASE + 0x544u)
#define TWIM_TXD_MAXCNT           REG32(TWIM0_BASE + 0x548u)
#define TWIM_TXD_AMOUNT           REG32(TWIM0_BASE + 0x54Cu)
#define TWIM_ADDRESS              REG32(TWIM0_BASE + 0x588u)

#define TWIM_ENABLE_ENABLED       6u
#define TWIM_FREQ_K100            0x01980000u
#define TWIM_FREQ_K250            0x04000000u
#define TWIM_FREQ_K400            0x06400000u
#define TWIM_SHORTS_LASTTX_STARTRX (1u << 7)
#define TWIM_SHORTS_LASTTX_STOP    (1u << 9)
#define TWIM_SHORTS_LASTRX_STOP    (1u << 12)
#define TWIM_ERRORSRC_OVERRUN     (1u << 0)
#define TWIM_ERRORSRC_ANACK       (1u << 1)
#define TWIM_ERRORSRC_DNACK       (1u << 2)

/* ---- RTC1 (32.768 kHz low-power counter) ------------------------------- */
#define RTC1_BASE                 0x40011000u
#define RTC1_TASKS_START          REG32(RTC1_BASE + 0x000u)
#define RTC1_TASKS_STOP           REG32(RTC1_BASE + 0x004u)
#define RTC1_TASKS_CLEAR          REG32(RTC1_BASE + 0x008u)
#define RTC1_EVENTS_OVRFLW        REG32(RTC1_BASE + 0x104u)
#define RTC1_INTENSET             REG32(RTC1_BASE + 0x304u)
#define RTC1_EVTENSET             REG32(RTC1_BASE + 0x344u)
#define RTC1_COUNTER              REG32(RTC1_BASE + 0x504u)
#define RTC1_PRESCALER            REG32(RTC1_BASE + 0x508u)
#define RTC_INT_OVRFLW            (1u << 1)
#define RTC_COUNTER_BITS          24u

/* ---- FICR (factory information) ---------------------------------------- */
#define FICR_BASE                 0x10000000u
#define FICR_CODEPAGESIZE         REG32(FICR_BASE + 0x010u)
#define FICR_CODESIZE             REG32(FICR_BASE + 0x014u)
#define FICR_DEVICEID(n)          REG32(FICR_BASE + 0x060u + 4u * (n))
#define FICR_DEVICEADDR(n)        REG32(FICR_BASE + 0x0A4u + 4u * (n))
#define FICR_INFO_PART            REG32(FICR_BASE + 0x100u)
#define FICR_INFO_VARIANT         REG32(FICR_BASE + 0x104u)
#define FICR_INFO_RAM             REG32(FICR_BASE + 0x10Cu)
#define FICR_INFO_FLASH           REG32(FICR_BASE + 0x110u)

#endif /* NRF52_H */
