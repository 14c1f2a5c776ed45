; io_long64.asm - port I/O checks in 64-bit long mode.
;
; Load/entry: flat binary at guest-physical 0x7C00, entered in real mode at
; CS:IP = 0000:7C00 (any other register state). The guest loads its own GDT,
; goes through 32-bit protected mode, builds identity-mapped page tables for
; the first 1 GiB (2 MiB pages; PML4 0x10000, PDPT 0x11000, PD 0x12000),
; enables PAE + EFER.LME + paging and runs the checks in io_checks.inc in
; 64-bit mode with interrupts off. Needs RAM at 0x0000-0x2FFFF and a CPUID
; that reports long mode (under KVM: KVM_SET_CPUID2 from the supported list).
;
; Ports (see io_checks.inc for the exact device behaviour):
;   0xE0-0xE3  echo latch (32-bit, byte lanes)      - QEMU: -device pc-testdev
;   0xEC       unclaimed, must read all ones
;   0x501      isa-debug-exit: status byte, then hlt - QEMU: -device isa-debug-exit
;
; Result: status 0x00 after all checks passed, with the echo latch holding
; the number of checks run (CHECKS); otherwise status = the number of the
; first failing check (1..CHECKS), see the numbered comments here and in
; io_checks.inc.

bits 16
org 0x7C00

PML4 equ 0x10000
PDPT equ 0x11000
PD   equ 0x12000

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
    mov esp, 0x7C00
    cld
    mov edi, PML4               ; zero the three tables
    xor eax, eax
    mov ecx, 3 * 4096 / 4
    rep stosd
    mov dword [PML4], PDPT | 3  ; present + writable
    mov dword [PDPT], PD | 3
    mov edi, PD
    mov eax, 0x83               ; present + writable + 2 MiB page
    mov ecx, 512
.map:
    mov [edi], eax
    add eax, 0x200000
    add edi, 8
    loop .map
    mov eax, cr4
    or eax, 1 << 5              ; PAE
    mov cr4, eax
    mov eax, PML4
    mov cr3, eax
    mov ecx, 0xC0000080         ; EFER
    rdmsr
    or eax, 1 << 8              ; LME
    wrmsr
    mov eax, cr0
    or eax, 1 << 31             ; PG -> long mode becomes active
    mov cr0, eax
    jmp 0x20:long_mode

bits 64
long_mode:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov rsp, 0x7C00
    call run_checks
    jmp passed

W        equ 64
SENTINEL equ 0xFEEDFACEDEADBEEF
%include "io_checks.inc"

    NEXT                                    ; 21: REX.W on IN is ignored: still 32-bit, zero-extended
    mov eax, 0x89ABCDEF
    out ECHO, eax
    mov rax, SENTINEL
    mov dx, ECHO
    IO db 0x48, 0xED                        ; rex.w in eax, dx
    EXPECT rax, 0x89ABCDEF

    NEXT                                    ; 22: 32-bit address size (0x67): ECX/EDI
    FILL DST, 0x80, GUARD
    mov eax, LATCH
    out ECHO, eax
    mov dx, ECHO
    mov rdi, DST + 0x40
    mov rcx, 2
    IO a32 rep insb
    EXPECT rcx, 0
    EXPECT rdi, DST + 0x42
    MEMCHK DST + 0x40, 2, 0x11
    MEMCHK DST + 0x42, 0x3E, GUARD
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
