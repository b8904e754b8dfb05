//! The lab's guest: a few real-mode instructions that program the PIC and the PIT and count
//! IRQ0 in a 32-bit word of guest memory. Hand-encoded, one comment per instruction.

/// The i8254 input clock in Hz.
pub const PIT_INPUT_HZ: f64 = 1_193_182.0;

/// Guest-physical size of the lab's RAM (everything below fits in it).
pub const RAM_SIZE: usize = 0x1_0000;
/// Guest-physical address of the tick counter (a little-endian u32 the handler increments).
pub const COUNTER_ADDR: usize = 0x0500;
/// Guest-physical address where the main program starts (CS = 0, IP = this).
pub const CODE_ADDR: usize = 0x1000;
/// Guest-physical address of the IRQ0 handler.
pub const HANDLER_ADDR: usize = 0x1100;
/// Guest-physical address of a bare `iret`, the target of every other interrupt vector.
pub const IRET_ADDR: usize = 0x1200;
/// Initial stack pointer (SS = 0); interrupt frames go below it.
pub const STACK_TOP: u64 = 0x8000;
/// The vector IRQ0 arrives on: the program sets the master PIC's base to 8, as a PC BIOS does.
pub const IRQ0_VECTOR: usize = 8;

/// PIT channel-0 divisor for `rate_hz`, clamped to what the 16-bit counter can hold.
///
/// KVM itself limits periodic PIT timers to at most 5 kHz by default, so rates near the top
/// of the range come out slower than asked; [`rate_for_divisor`] gives what is programmed.
pub fn divisor_for_rate(rate_hz: u32) -> u16 {
    let d = (PIT_INPUT_HZ / f64::from(rate_hz.max(1))).round();
    // A divisor of 0 means 65536 to the PIT; keep to 1..=65535 to stay unambiguous.
    d.clamp(1.0, 65_535.0) as u16
}

/// The tick rate a channel-0 divisor gives.
pub fn rate_for_divisor(divisor: u16) -> f64 {
    PIT_INPUT_HZ / f64::from(divisor.max(1))
}

/// The main program: PIC and PIT set-up, then wait for interrupts forever.
fn main_program(divisor: u16) -> Vec<u8> {
    let [lo, hi] = divisor.to_le_bytes();
    let mut code = Vec::new();
    #[rustfmt::skip]
    code.extend_from_slice(&[
        0xFA,             // cli
        // PIC master, ICW1..ICW4: don't rely on the reset state of KVM's in-kernel PIC.
        0xB0, 0x11,       // mov al, 0x11   ; ICW1: edge-triggered, cascade, ICW4 follows
        0xE6, 0x20,       // out 0x20, al
        0xB0, IRQ0_VECTOR as u8, // mov al, 8 ; ICW2: IRQ0..7 -> vectors 8..15
        0xE6, 0x21,       // out 0x21, al
        0xB0, 0x04,       // mov al, 0x04   ; ICW3: slave on IRQ2
        0xE6, 0x21,       // out 0x21, al
        0xB0, 0x01,       // mov al, 0x01   ; ICW4: 8086 mode, normal (not auto) EOI
        0xE6, 0x21,       // out 0x21, al
        0xB0, 0xFE,       // mov al, 0xFE   ; OCW1: only IRQ0 unmasked
        0xE6, 0x21,       // out 0x21, al
        0xB0, 0xFF,       // mov al, 0xFF   ; slave PIC: everything masked
        0xE6, 0xA1,       // out 0xA1, al
        // PIT channel 0, periodic.
        0xB0, 0x34,       // mov al, 0x34   ; channel 0, lobyte/hibyte, mode 2 (rate generator), binary
        0xE6, 0x43,       // out 0x43, al
        0xB0, lo,         // mov al, divisor low byte
        0xE6, 0x40,       // out 0x40, al
        0xB0, hi,         // mov al, divisor high byte
        0xE6, 0x40,       // out 0x40, al
        // idle:
        0xFB,             // sti
        0xF4,             // hlt            ; wakes on the next interrupt
        0xEB, 0xFC,       // jmp short idle (-4: back over jmp, hlt, sti)
    ]);
    code
}

/// The IRQ0 handler: count, then EOI (the EOI is the "ack" that lets KVM inject the next
/// pending tick when reinjection is on).
fn irq0_handler() -> Vec<u8> {
    let [lo, hi] = (COUNTER_ADDR as u16).to_le_bytes();
    #[rustfmt::skip]
    let code = vec![
        0x66, 0xFF, 0x06, lo, hi, // inc dword [COUNTER_ADDR] ; DS = 0
        0x50,                     // push ax
        0xB0, 0x20,               // mov al, 0x20 ; non-specific EOI
        0xE6, 0x20,               // out 0x20, al
        0x58,                     // pop ax
        0xCF,                     // iret
    ];
    code
}

/// The whole initial content of guest RAM for a PIT `divisor`: interrupt vector table,
/// program, handler. Length [`RAM_SIZE`].
pub fn ram_image(divisor: u16) -> Vec<u8> {
    let mut ram = vec![0u8; RAM_SIZE];
    // Real-mode IVT: 256 entries of (offset, segment). Every vector but IRQ0's points at a
    // bare iret so a stray interrupt cannot run zeroes as code.
    for vector in 0..256 {
        let target = if vector == IRQ0_VECTOR {
            HANDLER_ADDR
        } else {
            IRET_ADDR
        };
        let entry = vector * 4;
        ram[entry..entry + 2].copy_from_slice(&(target as u16).to_le_bytes());
        ram[entry + 2..entry + 4].copy_from_slice(&0u16.to_le_bytes());
    }
    let main = main_program(divisor);
    ram[CODE_ADDR..CODE_ADDR + main.len()].copy_from_slice(&main);
    let handler = irq0_handler();
    ram[HANDLER_ADDR..HANDLER_ADDR + handler.len()].copy_from_slice(&handler);
    ram[IRET_ADDR] = 0xCF; // iret
    ram
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divisor_round_trips_common_rates() {
        assert_eq!(divisor_for_rate(1000), 1193);
        assert_eq!(divisor_for_rate(100), 11932);
        assert!((rate_for_divisor(1193) - 1000.15).abs() < 0.01);
        // 18.2 Hz, the BIOS rate, is the slowest the 16-bit counter can go.
        assert_eq!(divisor_for_rate(1), 65535);
    }

    #[test]
    fn image_places_divisor_vector_and_handler() {
        let ram = ram_image(0x04A9);
        assert_eq!(ram.len(), RAM_SIZE);
        // Vector 8 -> 0000:HANDLER_ADDR.
        assert_eq!(&ram[32..36], &[0x00, 0x11, 0x00, 0x00]);
        // Divisor bytes follow the two "mov al" opcodes before the last two PIT writes.
        let main = main_program(0x04A9);
        let n = main.len();
        assert_eq!(
            &main[n - 12..n - 4],
            &[0xB0, 0xA9, 0xE6, 0x40, 0xB0, 0x04, 0xE6, 0x40]
        );
        assert_eq!(&main[n - 4..], &[0xFB, 0xF4, 0xEB, 0xFC]);
        assert_eq!(ram[HANDLER_ADDR + 3], 0x00);
        assert_eq!(ram[HANDLER_ADDR + 4], 0x05);
        assert_eq!(ram[IRET_ADDR], 0xCF);
    }
}
