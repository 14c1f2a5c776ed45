; rom_check.asm - executes from and writes to a read-only (ROM) memory slot.
;
; Load/entry: flat binary at guest-physical 0x7C00, entered in real mode at
; CS:IP = 0000:7C00 (any other register state). Needs RAM at 0x0000-0x7FFF
; and a ROM slot at 0xF0000 (KVM_MEM_READONLY) that the VMM fills with:
;   F000:0000  B3 42 CB   mov bl, 0x42 / retf   (code the guest far-calls)
;   F000:0010  AA         a data byte the guest tries to overwrite
;
; Ports: 0xE0 (write, 8-bit: two reports, see below), 0x501 (status 0, hlt).
; Expected trace: OUT 0xE0 = 0x42 (ROM code ran), then a write of 0x55 to
; guest-physical 0xF0010 that KVM reports as an MMIO write exit instead of
; storing it, then OUT 0xE0 = 0xAA (the ROM byte is unchanged), then exit 0.

bits 16
org 0x7C00

ROM_SEG equ 0xF000

start:
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7C00
    xor bx, bx
    call ROM_SEG:0x0000         ; runs mov bl, 0x42 / retf from ROM
    mov al, bl
    out 0xE0, al
    mov ax, ROM_SEG
    mov es, ax
    mov byte [es:0x10], 0x55    ; a guest write to ROM: exits as MMIO, not stored
    mov al, [es:0x10]
    out 0xE0, al
    xor al, al
    mov dx, 0x501
    out dx, al
.halt:
    hlt
    jmp .halt
