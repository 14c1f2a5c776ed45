; smp_tickets.asm - every vCPU takes N tickets from one device and gives each back.
;
; Load/entry: flat binary at guest-physical 0x7C00, entered in real mode at
; CS:IP = 0000:7C00 (any other register state) on every vCPU at once; they
; all run the same code. Needs RAM at 0x0000-0x7FFF.
;
; Parameter block: the little-endian dword at image offset 4 (guest-physical
; 0x7C04) is N, the tickets per vCPU; patch it before loading (N = 0 is
; taken as 2^32). Each vCPU switches to 32-bit protected mode, then N times:
;     in eax, dx          ; DX = 0x520: take a ticket
;     out dx, eax         ; DX = 0x524: give the same ticket back
; and checks that its tickets only grow (the device numbers them from 1 for
; all vCPUs together). Then it writes its status to port 0x528 (0x00: every
; ticket grew; 0x01: one did not) and halts with interrupts off.
;
; Ports: 0x520 (read, 32-bit), 0x524 (write, 32-bit), 0x528 (write, 8-bit).

bits 16
org 0x7C00

start:
    jmp short entry
    align 4, db 0x90
count:
    dd 1000                     ; N (offset 4)

entry:
%include "prot32_entry.inc"
    mov ecx, [count]
    xor esi, esi                ; the last ticket taken (tickets start at 1)
.loop:
    mov dx, 0x520
    in eax, dx                  ; take a ticket
    cmp eax, esi
    jbe .shrank
    mov esi, eax
    mov dx, 0x524
    out dx, eax                 ; give it back
    dec ecx
    jnz .loop
    mov al, 0x00
    jmp .report
.shrank:
    mov al, 0x01
.report:
    mov dx, 0x528
    out dx, al
.halt:
    cli
    hlt
    jmp .halt

%include "flat_gdt.inc"
