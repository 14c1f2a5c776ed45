; rep_ins.asm - REP INS cases whose result is compared with the dispatcher's own string I/O path.
;
; Load/entry: flat binary at guest-physical 0x7C00, entered in real mode at
; CS:IP = 0000:7C00. Needs RAM at 0x0000-0x17FFF.
;
; Ports used:
;   0xE8   a device that answers every read with the next value of a sequence
;   0x501  isa-debug-exit (status 0, then the guest halts)
;
; The cases (tests/kvm/test_kvm_string_io.py repeats them on a fake VP):
;   1. cld; ES=0000 DI=1000 CX=0300 rep insw   (1536 bytes, across page boundaries)
;   2. std; ES=0000 DI=3FFE CX=0181 rep insw   (downwards, across 0x3000)
;   3. cld; ES=0000 DI=4F80 CX=1100 rep insb   (more than one 1024-element chunk)
;   4. cld; ES=0600 DI=0010 CX=0005 rep insd   (a segment base)
;   5. cld; ES=0000 DI=7000 CX=0000 rep insw   (nothing)
;   6. cld; ES=0000 DI=7100             insw   (no REP)

bits 16
org 0x7C00

PORT    equ 0xE8
EXITDEV equ 0x501

start:
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7C00
    mov dx, PORT

    cld
    mov di, 0x1000
    mov cx, 0x0300
    rep insw

    std
    mov di, 0x3FFE
    mov cx, 0x0181
    rep insw
    cld

    mov di, 0x4F80
    mov cx, 0x1100
    rep insb

    mov ax, 0x0600
    mov es, ax
    mov di, 0x0010
    mov cx, 5
    rep insd
    xor ax, ax
    mov es, ax

    mov di, 0x7000
    xor cx, cx
    rep insw

    mov di, 0x7100
    insw

    xor al, al
    mov dx, EXITDEV
    out dx, al
.halt:
    hlt
    jmp .halt
