; io_prot32.asm - port I/O checks in 32-bit protected mode.
;
; Load/entry: flat binary at guest-physical 0x7C00, entered in real mode at
; CS:IP = 0000:7C00 (any other register state). The guest loads its own GDT,
; enters 32-bit protected mode (flat 4 GiB segments, paging off, interrupts
; off) and runs the checks in io_checks.inc. Needs RAM at 0x0000-0x2FFFF
; (scratch buffers at 0x20000-0x25FFF, stack below 0x7C00).
;
; Ports (see io_checks.inc for the exact device behaviour):
;   0xE0-0xE3  echo latch (32-bit, byte lanes)      - QEMU: -device pc-testdev
;   0xEC       unclaimed, must read all ones
;   0x501      isa-debug-exit: status byte, then hlt - QEMU: -device isa-debug-exit
;
; Result: status 0x00 after all checks passed, with the echo latch holding
; the number of checks run (CHECKS); otherwise status = the number of the
; first failing check (1..CHECKS), see the numbered comments in io_checks.inc.

bits 16
org 0x7C00

start:
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7C00
    lgdt [gdt_desc]
    mov eax, cr0
    or eax, 1                   ; PE
    mov cr0, eax
    jmp 0x08:protected

bits 32
protected:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    mov esp, 0x7C00
    call run_checks
    jmp passed

W        equ 32
SENTINEL equ 0xDEADBEEF
%include "io_checks.inc"

    NEXT                                    ; 21: 16-bit address size (0x67): CX/SI only
    mov esi, 0x12340000 + low_src
    mov ecx, 0xABCD0003
    mov dx, ECHO
    IO a16 rep outsb
    EXPECT ecx, 0xABCD0000
    EXPECT esi, 0x12340000 + low_src + 3
    LATCH_IS 0x000000C3
    ret

passed:
    mov eax, ebp
    out ECHO, eax               ; latch = number of checks run
    xor eax, eax
    jmp finish
fail:
    mov eax, ebp
finish:
    mov dx, EXITDEV
    out dx, al
.halt:
    hlt
    jmp .halt

low_src: db 0xC1, 0xC2, 0xC3    ; below 64 KiB, reachable with 16-bit SI

align 8
gdt:
    dq 0                        ; 0x00 null
    dq 0x00CF9A000000FFFF       ; 0x08 code, 32-bit, base 0, 4 GiB
    dq 0x00CF92000000FFFF       ; 0x10 data, base 0, 4 GiB
    dq 0x00CF92000100FFFF       ; 0x18 data, base 0x100 (segment-override check)
    dq 0x00AF9A000000FFFF       ; 0x20 code, 64-bit
gdt_end:
gdt_desc:
    dw gdt_end - gdt - 1
    dd gdt
