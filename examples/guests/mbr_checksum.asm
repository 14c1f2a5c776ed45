; mbr_checksum.asm - a boot sector that reads disk sectors through the BIOS and prints their checksum.
;
; Load/entry: a PC BIOS loads it from sector 0 of the boot disk to 0000:7C00
; and jumps there with DL = the BIOS drive number (the 55 AA signature at
; offset 510 makes the disk bootable). Needs the BIOS's INT 13h extensions.
;
; Ports used:
;   0x3F8  16550 THR (write)  - the result line
;   0x3FD  16550 LSR (read)   - bit 5 THRE
;   0x501  isa-debug-exit     - status, then the guest halts
;
; Behaviour: reads SECTORS sectors from LBA 1 with INT 13h AH=42h, in
; calls of CHUNK sectors, to 1000:0000 (linear 0x10000); then computes over
; every byte b, in order: sum = rol32(sum, 5) + b (sum starts at 0), and
; prints "MBR checksum XXXXXXXX\r\n" (8 upper-case hex digits) on COM1.
; Exit status 0 on success; 1 if a read failed (after printing
; "MBR read error XX\r\n" with the AH status). CHUNK is the u16 at offset
; 0x1B4 and SECTORS the u16 at 0x1B6, so a test can change them.

bits 16
org 0x7C00

COM1    equ 0x3F8
LSR     equ COM1 + 5
EXITDEV equ 0x501
BUFSEG  equ 0x1000

start:
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7C00
    sti
    cld
    mov [drive], dl

    ; Read SECTORS sectors from LBA 1, CHUNK at a time.
    mov word [dap.segment], BUFSEG
    mov dword [dap.lba], 1
    mov cx, [sectors]
.read:
    test cx, cx
    jz .sum
    mov ax, [chunk]
    cmp ax, cx
    jbe .count
    mov ax, cx
.count:
    mov [dap.count], ax
    push cx
    push ax
    mov si, dap
    mov dl, [drive]
    mov ah, 0x42
    int 0x13
    pop bx
    pop cx
    jc .error
    sub cx, bx
    movzx ebx, bx
    add [dap.lba], ebx
    shl bx, 5                   ; sectors * 512 / 16 paragraphs
    add [dap.segment], bx
    jmp .read

.sum:
    ; sum over SECTORS * 512 bytes from 1000:0000, one 64 KiB segment at a time
    xor edx, edx                ; the checksum
    mov ax, [sectors]
    movzx ecx, ax
    shl ecx, 9                  ; bytes left
    mov bx, BUFSEG
.segment:
    mov es, bx
    xor di, di
.byte:
    rol edx, 5
    movzx eax, byte [es:di]
    add edx, eax
    dec ecx
    jz .print
    inc di
    jnz .byte
    add bx, 0x1000              ; next 64 KiB
    jmp .segment

.print:
    mov si, banner
    call puts
    mov cx, 8
.digit:
    rol edx, 4
    mov al, dl
    call hexnibble
    loop .digit
    mov si, crlf
    call puts
    xor al, al
    jmp finish

.error:
    mov dl, ah
    mov si, failed
    call puts
    rol dl, 4
    mov al, dl
    call hexnibble
    rol dl, 4
    mov al, dl
    call hexnibble
    mov si, crlf
    call puts
    mov al, 1

finish:
    mov dx, EXITDEV
    out dx, al
    cli
.halt:
    hlt
    jmp .halt

; print the low nibble of AL as a hex digit
hexnibble:
    and al, 0x0F
    add al, '0'
    cmp al, '9'
    jbe .out
    add al, 'A' - '0' - 10
.out:
    jmp uart_send

; print the zero-terminated string at DS:SI
puts:
    lodsb
    test al, al
    jz .done
    call uart_send
    jmp puts
.done:
    ret

; send AL on COM1 once the transmitter holding register is empty
uart_send:
    push dx
    push ax
    mov dx, LSR
.wait:
    in al, dx
    test al, 0x20
    jz .wait
    pop ax
    mov dx, COM1
    out dx, al
    pop dx
    ret

banner: db "MBR checksum ", 0
failed: db "MBR read error ", 0
crlf:   db 13, 10, 0
drive:  db 0

align 4
dap:                            ; INT 13h extended read disk address packet
.size:    db 16
.zero:    db 0
.count:   dw 0
.offset:  dw 0
.segment: dw 0
.lba:     dq 0

    times 0x1B4 - ($ - $$) db 0
chunk:   dw 8                   ; sectors per INT 13h call
sectors: dw 64                  ; sectors read in all (32 KiB)
    times 510 - ($ - $$) db 0
    dw 0xAA55
