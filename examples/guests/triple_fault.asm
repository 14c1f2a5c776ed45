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
    mov al, 0x01
    out 0xE0, al
    lidt [idt_desc]
    ud2
.spin:
    jmp .spin                   ; not reached

align 8
gdt:
    dq 0                        ; 0x00 null
    dq 0x00CF9A000000FFFF       ; 0x08 code, 32-bit, base 0, 4 GiB
    dq 0x00CF92000000FFFF       ; 0x10 data, base 0, 4 GiB
gdt_end:
gdt_desc:
    dw gdt_end - gdt - 1
    dd gdt
idt_desc:
    dw 0                        ; limit 0: no gate at all
    dd 0
