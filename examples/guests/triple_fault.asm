; triple_fault.asm - a guest that triple-faults, for the VMM's shutdown report.
;
; Load/entry: flat binary at guest-physical 0x7C00, entered in real mode at
; CS:IP = 0000:7C00. Needs RAM at 0x0000-0x7FFF.
;
; Switches to 32-bit protected mode, loads an IDT with limit 0 and executes
; ud2: the invalid opcode has no gate (#GP), neither has #GP (#DF), nor #DF, so
; the processor shuts down. Announces the attempt with OUT 0xE0 = 0x01.
; Ports: 0xE0 (write, 8-bit).

bits 16
org 0x7C00

start:
%include "prot32_entry.inc"
    mov al, 0x01
    out 0xE0, al
    lidt [idt_desc]
    ud2
.spin:
    jmp .spin                   ; not reached

%include "flat_gdt.inc"
idt_desc:
    dw 0                        ; limit 0: no gate at all
    dd 0
