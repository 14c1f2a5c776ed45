; io_probe.asm - lets the VMM observe how KVM reports port I/O exits.
;
; Not a self-checking guest: transports.kvm.probe runs it and records, for
; every I/O exit, the registers at the exit and after the exit completes.
; The same list of cases runs three times: in real mode, in 32-bit
; protected mode and in 64-bit long mode.
;
; Load/entry: flat binary at guest-physical 0x7C00, entered in real mode at
; CS:IP = 0000:7C00 (any other register state). Needs RAM at 0x0000-0x2FFFF
; and a CPUID that reports long mode. Page tables as in io_long64.asm.
;
; Before each case the guest leaves a case record at guest-physical 0x600:
;   +0 u32 case id (1..CASES, same numbering in every mode; 0 = none yet)
;   +4 u32 address of the case's I/O instruction
;   +8 u32 ECX before the instruction   +12 u32 ESI before   +16 u32 EDI before
;   +20 u32 EAX before
; Ports: 0xE0 (any device; the probe answers reads with 0xA1, 0xA2, ...),
; 0x7E (OUT only: KVM's fast path special-cases it), 0x501 (status 0, halt).
; Buffers: OUTS source at 0x20000 (bytes 1, 2, 3, ...), INS target at
; 0x22000, the page-crossing INS at BIG (0x23F80, BIG_N bytes); in real
; mode at 0x9000, 0x9100 and 0x9F80 (0x100 bytes) instead.

bits 16
org 0x7C00

REC      equ 0x600
PORT     equ 0xE0
SRC      equ 0x20000
DST      equ 0x22000
BIG      equ 0x23F80
BIG_N    equ 0x1100
PML4     equ 0x10000
PDPT     equ 0x11000
PD       equ 0x12000

; CASE id, counter, source, dest, instruction...  - record, then run it.
; The record uses 32-bit stores in every mode (addresses are below 64 KiB).
%macro CASE 5+
    mov dword [REC + 8], %2
    mov dword [REC + 12], %3
    mov dword [REC + 16], %4
    mov ecx, %2
    mov esi, %3
    mov edi, %4
    mov eax, 0x11223344
    mov dword [REC + 20], eax
    mov dword [REC + 4], %%insn
    mov dword [REC], %1
%%insn:
    %5
%endmacro

; The case list; a16 addressing in real mode means SRC/DST must fit in
; 16 bits there, so real mode uses low buffers (see LOWSRC/LOWDST).
%macro CASES 4                  ; src, dst, page-crossing dst, its count
    mov dx, PORT
    cld
    CASE 1, 0, 0, 0, out PORT, al
    CASE 2, 0, 0, 0, out dx, al
    CASE 3, 0, 0, 0, out dx, ax
    CASE 4, 0, 0, 0, out PORT, eax
    CASE 5, 0, 0, 0, in al, PORT
    CASE 6, 0, 0, 0, in al, dx
    CASE 7, 0, 0, 0, in ax, dx
    CASE 8, 0, 0, 0, in eax, PORT
    CASE 9, 3, %1, 0, rep outsb
    CASE 10, 3, 0, %2, rep insb
    CASE 11, 0, %1, 0, outsw
    CASE 12, 0, 0, %2, insw
    std
    CASE 13, 3, %1 + 4, 0, rep outsw
    CASE 14, 3, 0, %2 + 0x10, rep insw
    cld
    CASE 15, %4, 0, %3, rep insb
    mov dx, 0x7E
    CASE 16, 0, 0, 0, out dx, al
    mov dx, PORT
    CASE 17, 0, 0, 0, rep insb          ; count 0: no exit expected
%endmacro

LOWSRC equ 0x9000
LOWDST equ 0x9100

start:
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7C00
    cld
    mov di, LOWSRC              ; LOWSRC[i] = i + 1
    mov cx, 0x20
    mov al, 1
.fill_low:
    stosb
    inc al
    loop .fill_low
    ; 16-bit DI cannot reach BIG, so real mode crosses the page at 0xA000.
    CASES LOWSRC, LOWDST, 0x9F80, 0x100

    lgdt [gdt_desc]
    mov eax, cr0
    or eax, 1
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
    mov edi, SRC
    mov ecx, 0x20
    mov al, 1
.fill:
    stosb
    inc al
    loop .fill
    CASES SRC, DST, BIG, BIG_N
    ; paging for long mode
    mov edi, PML4
    xor eax, eax
    mov ecx, 3 * 4096 / 4
    rep stosd
    mov dword [PML4], PDPT | 3
    mov dword [PDPT], PD | 3
    mov edi, PD
    mov eax, 0x83
    mov ecx, 512
.map:
    mov [edi], eax
    add eax, 0x200000
    add edi, 8
    loop .map
    mov eax, cr4
    or eax, 1 << 5
    mov cr4, eax
    mov eax, PML4
    mov cr3, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 1 << 8
    wrmsr
    mov eax, cr0
    or eax, 1 << 31
    mov cr0, eax
    jmp 0x18:long_mode

bits 64
long_mode:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov rsp, 0x7C00
    CASES SRC, DST, BIG, BIG_N
    mov dword [REC], 0
    xor eax, eax
    mov dx, 0x501
    out dx, al
.halt:
    hlt
    jmp .halt

align 8
gdt:
    dq 0                        ; 0x00 null
    dq 0x00CF9A000000FFFF       ; 0x08 code, 32-bit
    dq 0x00CF92000000FFFF       ; 0x10 data
    dq 0x00AF9A000000FFFF       ; 0x18 code, 64-bit
gdt_end:
gdt_desc:
    dw gdt_end - gdt - 1
    dd gdt
