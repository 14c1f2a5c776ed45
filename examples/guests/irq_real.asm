; irq_real.asm - takes one external interrupt injected with KVM_INTERRUPT.
;
; Load/entry: flat binary at guest-physical 0x7C00, entered in real mode at
; CS:IP = 0000:7C00 (any other register state). Needs RAM at 0x0000-0x7FFF.
;
; The guest points real-mode IVT vector 0x20 at its handler, enables
; interrupts and announces it is ready with OUT 0xE0 = 0x01, then spins.
; The VMM is expected to request an interrupt window, inject vector 0x20
; when the window opens, and let the guest run: the handler reports
; OUT 0xE0 = 0x20 and writes status 0 to 0x501, then halts.
; Ports: 0xE0 (write, 8-bit), 0x501 (exit status).

bits 16
org 0x7C00

VECTOR equ 0x20

start:
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7C00
    mov word [VECTOR * 4], handler
    mov word [VECTOR * 4 + 2], 0
    sti
    mov al, 0x01
    out 0xE0, al                ; ready
.spin:
    jmp .spin

handler:
    mov al, VECTOR
    out 0xE0, al
    xor al, al
    mov dx, 0x501
    out dx, al
.halt:
    cli
    hlt
    jmp .halt
