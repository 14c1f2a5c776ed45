; hello_real.asm - real-mode "hello" guest for a 16550 UART and an exit device.
;
; Load/entry: flat binary at guest-physical 0x7C00, entered in real mode at
; CS:IP = 0000:7C00 (any other register state). Needs RAM at 0x0000-0x7FFF.
;
; Ports used (what the VMM must answer):
;   0x3F8  16550 THR (write) / RBR (read)  - transmit / receive byte
;   0x3FC  16550 MCR (write)               - bit 4 = loopback
;   0x3FD  16550 LSR (read)                - bit 0 DR (data ready), bit 5 THRE
;   0x501  isa-debug-exit (write, 8-bit)   - status, then the guest halts
;
; Behaviour: prints MESSAGE byte by byte (waiting for THRE before each byte),
; turns on loopback, sends LOOPBACK bytes and reads each one back (waiting
; for DR), then writes the status to 0x501 and halts:
;   0x00 = every looped-back byte matched, 0x01 = a byte came back different.
; Under QEMU: qemu-system-x86_64 -device isa-debug-exit (exit code = status*2+1).

bits 16
org 0x7C00

COM1    equ 0x3F8
MCR     equ COM1 + 4
LSR     equ COM1 + 5
EXITDEV equ 0x501

start:
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7C00
    cld

    mov si, message
.print:
    lodsb
    test al, al
    jz .printed
    call uart_send
    jmp .print
.printed:

    mov dx, MCR
    mov al, 0x10            ; loopback on, everything else off
    out dx, al

    mov si, loopback
.echo:
    lodsb
    test al, al
    jz .pass
    mov bl, al
    call uart_send
    mov dx, LSR
.wait_dr:
    in al, dx
    test al, 0x01
    jz .wait_dr
    mov dx, COM1
    in al, dx
    cmp al, bl
    jne .fail
    jmp .echo

.pass:
    xor al, al
    jmp finish
.fail:
    mov al, 0x01
finish:
    mov dx, EXITDEV
    out dx, al
.halt:
    hlt
    jmp .halt

; Send AL through the UART once the transmit holding register is empty.
uart_send:
    mov ah, al
    mov dx, LSR
.wait_thre:
    in al, dx
    test al, 0x20
    jz .wait_thre
    mov dx, COM1
    mov al, ah
    out dx, al
    ret

message:  db "Hello from the guest", 10, 0
loopback: db "Loop", 0
