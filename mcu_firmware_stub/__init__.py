"""A simulated MCU node: flash, bootloader and the receiver side of the serial protocol."""
