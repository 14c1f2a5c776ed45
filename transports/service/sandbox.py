"""The sandbox of a worker process: resource limits, another user, no new privileges, a system-call filter.

The supervisor starts one worker per VM; the worker loads its devices, then
calls :func:`apply_sandbox` before it reads its first frame. From then on
the worker, whatever its device code does:

- maps at most ``address_space`` bytes (RLIMIT_AS) and opens at most
  ``open_files`` descriptors (RLIMIT_NOFILE);
- runs as ``user`` (supplementary groups dropped, then group, then user),
  when the service was started as root and told ``--user NAME``;
- cannot gain privileges through set-user-ID files (PR_SET_NO_NEW_PRIVS);
- makes only the system calls in :data:`ALLOWED` (a seccomp filter). Any
  other call fails with EPERM: a device doing something unexpected gets an
  ``OSError`` it can handle (and the intercept a HANDLER_FAILED completion),
  not a VM killed by SIGSYS mid-instruction. No execve, no new files
  (``open``/``openat`` are denied: every module is imported before the
  filter, see :data:`PRELOAD`), no new network sockets (``socket``,
  ``connect``, ``bind``, ``listen``, ``accept``), no ``ptrace``,
  ``process_vm_readv``/``writev``, ``mount``, ``bpf``, ``io_uring``, no
  processes (``clone`` without ``CLONE_THREAD``, ``fork``, ``vfork``).

The filter is built with libseccomp through its Python binding, never as
BPF by hand: libseccomp knows every architecture's system-call numbers and
calling conventions (an x86-64 filter must also refuse the x32 and i386
entry points) and checks arguments correctly; a hand-written program gets
those wrong silently. The binding is libseccomp's own (``import seccomp``,
Debian's python3-seccomp) or else ``pyseccomp`` (PyPI,
a dependency of this package: a ctypes binding with the same API). With
neither, or no libseccomp, :func:`check_sandbox` says so in one line and the
service refuses to start unless told ``--no-seccomp``.

The list was measured, not guessed: a worker-like process (anyio on asyncio,
trio and uvloop; threads; UNIX sockets carrying descriptors; memfds mapped
and unmapped; eventfd, epoll, signals, futexes, clocks, getrandom; exit)
under ``strace -f``, counting the calls made after the point where the
sandbox is applied. tests/test_sandbox.py runs such a worker under the
filter on every backend.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib
import logging
import os
import platform
import pwd
import resource
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

from dispatcher import DispatchError

from ..shared_memory import MAX_BYTES

__all__ = [
    "ALLOWED",
    "DEFAULT_ADDRESS_SPACE",
    "DEFAULT_OPEN_FILES",
    "PRELOAD",
    "SandboxError",
    "SandboxLimits",
    "SandboxUnavailableError",
    "apply_sandbox",
    "check_sandbox",
    "deny_io_uring",
    "drop_privileges",
    "no_new_privileges",
    "seccomp_binding",
]

log = logging.getLogger("intercept_dispatch.service")

DEFAULT_ADDRESS_SPACE = MAX_BYTES + (8 << 30)
"""RLIMIT_AS of a worker unless told otherwise: the default guest memory budget of a VM
(:data:`~transports.shared_memory.MAX_BYTES`, 64 GiB) and 8 GiB for the interpreter, its threads' stacks
and malloc's per-thread arenas (reserved address space, mostly never touched)."""
DEFAULT_OPEN_FILES = 1024
"""RLIMIT_NOFILE of a worker unless told otherwise: its VM's connections and the descriptors they carry."""


class SandboxError(DispatchError):
    """The sandbox cannot be applied as asked; ``str()`` is one line naming the setting and why."""


class SandboxUnavailableError(SandboxError):
    """No seccomp binding or no libseccomp: the service refuses to start unless told ``--no-seccomp``."""


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    """What :func:`apply_sandbox` enforces in a worker; None leaves a setting as it is.

    ``address_space``: bytes of address space (RLIMIT_AS); it must hold
    the VM's guest memory budget, since shared regions are mapped in it.
    ``open_files``: descriptors (RLIMIT_NOFILE). ``user``: the user to
    switch to (needs a service started as root). ``seccomp``: whether to
    load the system-call filter (``--no-seccomp`` turns it off).
    """

    address_space: int | None = DEFAULT_ADDRESS_SPACE
    open_files: int | None = DEFAULT_OPEN_FILES
    user: str | None = None
    seccomp: bool = True

    def __post_init__(self) -> None:
        if self.address_space is not None and self.address_space < 1 << 26:
            raise SandboxError(f"address space limit {self.address_space}: out of range (at least 64 MiB)")
        if self.open_files is not None and self.open_files < 16:
            raise SandboxError(f"open files limit {self.open_files}: out of range (at least 16)")
        if self.user is not None and not self.user:
            raise SandboxError("--user: empty user name")

    def as_json(self) -> dict[str, Any]:
        """The limits as a JSON object (the supervisor sends them to a worker in its start message)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SandboxLimits:
        """The limits :meth:`as_json` made; raises :class:`SandboxError` naming an unknown or bad field."""
        unknown = set(data) - {"address_space", "open_files", "user", "seccomp"}
        if unknown:
            raise SandboxError(f"sandbox limits: unknown field {sorted(unknown)[0]!r}")
        for name in ("address_space", "open_files"):
            value = data.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise SandboxError(f"sandbox limits: {name} is {value!r}, not a whole number")
        user = data.get("user")
        if user is not None and not isinstance(user, str):
            raise SandboxError(f"sandbox limits: user is {user!r}, not a name")
        return cls(
            address_space=data.get("address_space", DEFAULT_ADDRESS_SPACE),
            open_files=data.get("open_files", DEFAULT_OPEN_FILES),
            user=user,
            seccomp=bool(data.get("seccomp", True)),
        )


# The allow-list. Every call not here fails with EPERM. Calls with
# arguments checked are in _CONDITIONAL below.
ALLOWED: tuple[tuple[str, str], ...] = (
    # Descriptors the worker already holds.
    ("read", "frames, the supervisor channel"),
    ("write", "completions, log lines"),
    ("readv", "buffered reads"),
    ("writev", "buffered writes"),
    ("pread64", "positioned reads"),
    ("pwrite64", "positioned writes"),
    ("lseek", "io objects query their position"),
    ("close", "connections ending, descriptors taken from SCM_RIGHTS"),
    ("dup", "os.dup"),
    ("dup2", "os.dup2"),
    ("dup3", "os.dup2 where dup2 does not exist"),
    ("fcntl", "O_NONBLOCK, FD_CLOEXEC; F_GET_SEALS of a shared memfd"),
    ("fstat", "os.fstat: the size of a shared memfd"),
    ("newfstatat", "os.fstat (AT_EMPTY_PATH); with a path it tells only whether a file exists"),
    ("statx", "fstat on newer C libraries"),
    # Sockets the worker was handed (it makes none: socket() is denied).
    ("recvmsg", "frames and SCM_RIGHTS descriptors"),
    ("sendmsg", "frames, the supervisor channel's descriptors"),
    ("recvfrom", "socket.recv"),
    ("sendto", "socket.send"),
    ("recvmmsg", "batched receive"),
    ("sendmmsg", "batched send"),
    ("shutdown", "stop_reading's half-close"),
    ("getsockopt", "SO_TYPE, SO_ERROR, SO_PEERCRED"),
    ("setsockopt", "socket options of a connection"),
    ("getsockname", "socket objects made from a received descriptor"),
    ("getpeername", "the same"),
    ("socketpair", "event loops' wake-up pairs (uvloop's signal handling): no reach outside the process"),
    # Waiting.
    ("poll", "inline reader threads"),
    ("ppoll", "inline reader threads (poll where poll does not exist)"),
    ("select", "select.select"),
    ("pselect6", "select where select does not exist"),
    ("epoll_create1", "an event loop's selector"),
    ("epoll_ctl", "asyncio, trio and uvloop watch descriptors"),
    ("epoll_wait", "the event loop waits"),
    ("epoll_pwait", "uvloop waits; epoll_wait where it does not exist"),
    ("epoll_pwait2", "newer C libraries"),
    ("eventfd2", "loop wake-ups"),
    ("pipe2", "asyncio's and uvloop's self-pipes, made as a loop or a signal handler starts"),
    # Memory.
    ("mmap", "malloc, thread stacks, guest memory regions"),
    ("munmap", "freeing them"),
    ("mremap", "realloc of large blocks"),
    ("mprotect", "thread stacks' guard pages, malloc arenas"),
    ("madvise", "malloc and thread exit give memory back"),
    ("brk", "malloc"),
    # Threads and synchronization.
    ("futex", "locks, conditions, thread joins"),
    ("futex_waitv", "newer C libraries"),
    ("set_robust_list", "every new thread"),
    ("rseq", "every new thread (glibc 2.35 and later)"),
    ("set_tid_address", "thread start"),
    ("sched_yield", "spinning locks"),
    ("sched_getaffinity", "os.cpu_count and thread pools"),
    ("gettid", "logging's thread ids"),
    ("getpid", "logging, signal checks"),
    ("getppid", "the supervisor's pid"),
    ("exit", "a thread ends"),
    ("exit_group", "the worker ends"),
    # Signals.
    ("rt_sigaction", "signal handlers"),
    ("rt_sigprocmask", "threads block signals"),
    ("rt_sigreturn", "returning from a handler"),
    ("sigaltstack", "faulthandler, threads"),
    ("restart_syscall", "a call interrupted by a signal"),
    # Time and randomness.
    ("clock_gettime", "time.monotonic where the vDSO does not answer"),
    ("clock_getres", "time.get_clock_info"),
    ("clock_nanosleep", "time.sleep"),
    ("nanosleep", "time.sleep on older C libraries"),
    ("gettimeofday", "time.time where the vDSO does not answer"),
    ("getrandom", "os.urandom, random seeding, hash seeds"),
    # Identity and accounting, read only.
    ("getuid", "who am I"),
    ("geteuid", "the same"),
    ("getgid", "the same"),
    ("getegid", "the same"),
    ("getresuid", "the same"),
    ("getresgid", "the same"),
    ("getrusage", "resource.getrusage for statistics"),
    ("getrlimit", "resource.getrlimit"),
    ("uname", "platform queries"),
)
"""The system calls a worker may make, each with why it needs it (arguments unchecked)."""

_CLONE_THREAD = 0x0001_0000
_PR_SET_NAME, _PR_GET_NAME, _PR_GET_SECCOMP, _PR_GET_NO_NEW_PRIVS = 15, 16, 21, 39
_PR_SET_NO_NEW_PRIVS = 38
# isatty, FIONREAD and the non-blocking and close-on-exec switches CPython makes with ioctl.
_IOCTLS = {"FIONBIO": 0x5421, "FIOCLEX": 0x5451, "FIONCLEX": 0x5450, "TCGETS": 0x5401, "FIONREAD": 0x541B}

PRELOAD: tuple[str, ...] = (
    "anyio.abc",
    "anyio.from_thread",
    "anyio.lowlevel",
    "anyio.streams.memory",
    "anyio.to_thread",
    "concurrent.futures.thread",
    "json",
    "linecache",
    "traceback",
)
"""Modules imported before the filter loads (it denies ``openat``): the ones a worker imports lazily.

anyio's lazily loaded names are loaded too. A module imported after the
filter fails with ``PermissionError``: a worker imports its own before.
"""


def seccomp_binding() -> ModuleType:
    """The libseccomp binding: ``seccomp`` (libseccomp's own) or else ``pyseccomp``.

    Raises :class:`SandboxUnavailableError` (one line) when neither loads.
    """
    try:
        return importlib.import_module("seccomp")
    except ImportError:
        pass
    try:
        return importlib.import_module("pyseccomp")
    except ImportError:
        why = "no libseccomp binding: install pyseccomp (pip) or python3-seccomp (apt)"
    except (RuntimeError, OSError) as error:  # pyseccomp loads libseccomp as it is imported
        why = f"libseccomp cannot be loaded ({error}): install libseccomp2"
    raise SandboxUnavailableError(f"seccomp is unavailable: {why}; or serve with --no-seccomp to run without it")


def check_sandbox(limits: SandboxLimits) -> None:
    """What the supervisor checks before it starts: the seccomp binding loads and the user exists.

    Raises :class:`SandboxError` (one line) otherwise.
    """
    if limits.seccomp:
        seccomp_binding()
    if limits.user is not None:
        _user(limits.user)


def _user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise SandboxError(f"--user {name}: no such user") from None


def drop_privileges(user: str) -> None:
    """Become ``user`` for good: supplementary groups dropped, then its group, then its user id.

    The supervisor calls it after binding its socket; a worker through
    :func:`apply_sandbox`. Doing nothing when already that user. Raises
    :class:`SandboxError` (one line) if the switch is not allowed (a
    service not started as root) or could be undone.
    """
    entry = _user(user)
    uid, gid = entry.pw_uid, entry.pw_gid
    if os.getresuid() == (uid, uid, uid) and os.getresgid() == (gid, gid, gid):
        with contextlib.suppress(PermissionError):  # only root may drop its own supplementary groups
            os.setgroups([])
        return
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except PermissionError as error:
        raise SandboxError(
            f"--user {user}: cannot switch to uid {uid}, gid {gid} ({error.strerror}): start the service as root"
        ) from None
    if uid != 0:
        with contextlib.suppress(PermissionError):
            os.setuid(0)
            raise SandboxError(f"--user {user}: the switch to uid {uid} could be undone")


def no_new_privileges() -> None:
    """Set PR_SET_NO_NEW_PRIVS: neither this process nor what it could start gains privileges.

    Raises :class:`SandboxError` if the kernel refuses.
    """
    # The standard library has no prctl, and the seccomp binding's own switch
    # (libseccomp sets it as it loads a filter) would leave it unset under
    # --no-seccomp; a one-argument prctl through ctypes is all it takes.
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
    prctl.restype = ctypes.c_int
    if prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise SandboxError(f"PR_SET_NO_NEW_PRIVS refused: {os.strerror(code)}")


def deny_io_uring() -> None:
    """Make io_uring unavailable to this process: call it in a worker before its event loop starts.

    libuv (uvloop) sets up an io_uring when its loop starts if it can, and
    then aborts the process once the sandbox's filter refuses the ring; an
    io_uring would also carry operations (opening files) that no system-call
    filter sees. Answered ENOSYS, libuv uses epoll alone. A no-op when no
    seccomp binding is available (:func:`apply_sandbox` then says why).
    """
    try:
        binding: Any = seccomp_binding()
    except SandboxUnavailableError:
        return
    syscall_filter = binding.SyscallFilter(binding.ALLOW)
    for name in ("io_uring_setup", "io_uring_enter", "io_uring_register"):
        _rule(syscall_filter, binding.ERRNO(errno.ENOSYS), name)
    try:
        syscall_filter.load()
    except (RuntimeError, OSError) as error:
        raise SandboxError(f"the seccomp filter against io_uring cannot be loaded: {error}") from None


def _uses_io_uring() -> bool:
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[io_uring]":
                return True
    return False


def _limit(kind: int, name: str, value: int) -> None:
    _, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY and value > hard:
        value = hard  # the hard limit is already lower: keep it, and make the soft one match
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError) as error:
        raise SandboxError(f"{name} {value}: cannot be set ({error})") from None


def _address_space_in_use() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[0]) * resource.getpagesize()


def _preload() -> None:
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    import anyio
    import anyio.abc

    for module in (anyio, anyio.abc):
        for attribute in dir(module):
            with contextlib.suppress(AttributeError, ImportError):
                getattr(module, attribute)


def _rule(syscall_filter: Any, action: int, name: str, *args: Any) -> None:
    try:
        syscall_filter.add_rule(action, name, *args)
    except (ValueError, RuntimeError, OSError):
        # A call this architecture does not have (poll on arm64, dup2 on riscv): nothing to allow.
        log.debug("seccomp: no system call %s here", name)


def _load_filter(binding: Any) -> None:
    syscall_filter = binding.SyscallFilter(binding.ERRNO(errno.EPERM))
    # Every thread: inline reader threads and thread pools started before the
    # sandbox would otherwise run unfiltered.
    syscall_filter.set_attr(binding.Attr.CTL_TSYNC, 1)
    for name, _ in ALLOWED:
        _rule(syscall_filter, binding.ALLOW, name)
    pid = os.getpid()
    # Threads only: the C library makes them with clone and CLONE_THREAD once
    # clone3 (whose flags a filter cannot see) answers ENOSYS.
    flags_argument = 1 if platform.machine().startswith("s390") else 0
    _rule(syscall_filter, binding.ALLOW, "clone",
          binding.Arg(flags_argument, binding.MASKED_EQ, _CLONE_THREAD, _CLONE_THREAD))  # fmt: skip
    _rule(syscall_filter, binding.ERRNO(errno.ENOSYS), "clone3")
    # Signals to this process only (asyncio and trio deliver some to themselves).
    _rule(syscall_filter, binding.ALLOW, "kill", binding.Arg(0, binding.EQ, pid))
    _rule(syscall_filter, binding.ALLOW, "tgkill", binding.Arg(0, binding.EQ, pid))
    for request in _IOCTLS.values():
        _rule(syscall_filter, binding.ALLOW, "ioctl", binding.Arg(1, binding.EQ, request))
    # resource.getrlimit: prlimit64 reading only (no new limit given), since a worker still root could raise them.
    _rule(syscall_filter, binding.ALLOW, "prlimit64", binding.Arg(2, binding.EQ, 0))
    # Thread names (trio names its threads) and queries of this process's own state.
    for option in (_PR_SET_NAME, _PR_GET_NAME, _PR_GET_SECCOMP, _PR_GET_NO_NEW_PRIVS):
        _rule(syscall_filter, binding.ALLOW, "prctl", binding.Arg(0, binding.EQ, option))
    try:
        syscall_filter.load()
    except (RuntimeError, OSError) as error:
        raise SandboxError(f"the seccomp filter cannot be loaded: {error}") from None


def apply_sandbox(limits: SandboxLimits) -> None:
    """Apply ``limits`` to this process for good (see the module's description).

    A worker on uvloop must have called :func:`deny_io_uring` before its
    loop started. In order: the lazily imported modules are imported (:data:`PRELOAD`),
    RLIMIT_NOFILE and RLIMIT_AS are set, the user switched, no new
    privileges, then the seccomp filter on every thread. Raises
    :class:`SandboxError` (one line) when a step cannot be done.
    """
    _preload()
    if limits.open_files is not None:
        _limit(resource.RLIMIT_NOFILE, "open files limit", limits.open_files)
    if limits.address_space is not None:
        in_use = _address_space_in_use()
        if limits.address_space < in_use:
            raise SandboxError(f"address space limit {limits.address_space}: below the {in_use} bytes in use")
        _limit(resource.RLIMIT_AS, "address space limit", limits.address_space)
    if limits.user is not None:
        drop_privileges(limits.user)
    no_new_privileges()
    if limits.seccomp:
        binding = seccomp_binding()
        if _uses_io_uring():
            raise SandboxError("the event loop uses io_uring (uvloop), which the filter would break: "
                               "call deny_io_uring() before the loop starts")  # fmt: skip
        _load_filter(binding)
    log.debug("sandbox applied: %s", limits)
