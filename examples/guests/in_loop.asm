; in_loop.asm - a tight IN loop, for benchmarks: a guest polling a status register.
;
; Load/entry: flat binary at guest-physical 0x7C00, entered in real mode at
; CS:IP = 0000:7C00 (any other register state). Needs RAM at 0x0000-0x7FFF.
;
; Parameter block: the little-endian dword at image offset 4 (guest-physical
; 0x7C04) is N, the number of INs; patch it before loading (N = 0 is taken
; as 2^32). The guest switches to 32-bit protected mode (so the loop runs as
; ordinary guest code, not in a real-mode emulator), then executes
;     in al, dx           ; N times, DX = 0xE4
; adding every byte read into EBX; it writes that sum (mod 2^32) to the
; echo latch at 0xE0 as one dword, then status 0x00 to the isa-debug-exit
; port 0x501, and halts.
;
; Ports: 0xE4 (read, 8-bit; any value), 0xE0 (write, 32-bit; the sum),
; 0x501 (exit).

bits 16
org 0x7C00

start:
    jmp short entry
    align 4, db 0x90
count:
    dd 1000000                  ; N (offset 4)

entry:
%include "prot32_entry.inc"
    mov ecx, [count]
    xor eax, eax                ; EAX[31:8] stay zero: EAX is the byte read
    xor ebx, ebx
    mov dx, 0xE4
.loop:
    in al, dx
    add ebx, eax
    dec ecx
    jnz .loop
    mov eax, ebx
    mov dx, 0xE0
    out dx, eax                 ; the sum of every byte read
    xor eax, eax
    mov dx, 0x501
    out dx, al                  ; status 0
.halt:
    hlt
    jmp .halt

%include "flat_gdt.inc"
