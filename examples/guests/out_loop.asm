; out_loop.asm - the tightest I/O-exit loop, for benchmarks.
;
; Load/entry: flat binary at guest-physical 0x7C00, entered in real mode at
; CS:IP = 0000:7C00 (any other register state). Needs RAM at 0x0000-0x7FFF.
;
; Parameter block: the little-endian dword at image offset 4 (guest-physical
; 0x7C04) is N, the number of OUTs; patch it before loading (N = 0 is taken
; as 2^32). The guest switches to 32-bit protected mode (so the loop runs as
; ordinary guest code, not in a real-mode emulator), then executes
;     out 0x80, al        ; N times, AL = 0
; and finally writes status 0x00 to the isa-debug-exit port 0x501 and halts.
;
; Ports: 0x80 (write, 8-bit; POST code port, value ignored), 0x501 (exit).

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
    xor eax, eax
.loop:
    out 0x80, al
    dec ecx
    jnz .loop
    mov dx, 0x501
    out dx, al                  ; status 0
.halt:
    hlt
    jmp .halt

%include "flat_gdt.inc"
