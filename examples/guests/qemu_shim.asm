; qemu_shim.asm - 64 KiB BIOS image that boots one flat guest under QEMU.
;
; Not a guest itself: lets the test guests run unchanged on QEMU (e.g. TCG) as
; an independent check of what they assert. Build with
;   nasm -f bin -DGUEST='"hello_real.bin"' -o shim.rom qemu_shim.asm
; and run  qemu-system-x86_64 -bios shim.rom -device isa-debug-exit
;          -device pc-testdev -serial file:out.txt -display none
;
; QEMU maps the image at 0xF0000 and the CPU resets at F000:FFF0. The shim
; copies the guest to 0000:7C00 and jumps there in real mode, which is the
; state transports.kvm.boot gives a guest under KVM.

bits 16
org 0

GUEST_SEGMENT equ 0xF000

start:
    cli
    cld
    mov ax, GUEST_SEGMENT
    mov ds, ax
    xor ax, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7C00
    mov si, guest
    mov di, 0x7C00
    mov cx, guest_end - guest
    rep movsb
    xor ax, ax
    mov ds, ax
    jmp 0x0000:0x7C00

guest:
    incbin GUEST
guest_end:

    times 0xFFF0 - ($ - $$) db 0xFF
reset_vector:                      ; F000:FFF0
    jmp GUEST_SEGMENT:start
    times 0x10000 - ($ - $$) db 0xFF
