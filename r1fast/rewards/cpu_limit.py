"""A CPU-time limit for a block of Python code: ``with cpu_time_limit(s): ...``.

Rewards decide verdicts under a budget, and the budget must be CPU time, not wall time: on a
loaded machine a correct answer whose check merely waits must stay correct. The budget must
also be the *calling thread's* CPU time, because torch's OpenMP workers (and any C thread) of
the same process burn CPU that is not the reward's.

How the limit fires matters as much as what it counts. CPython runs Python signal handlers
only on the main thread, and it notices a pending signal at once only when the C-level handler
ran on the main thread itself. A process-wide timer (``setitimer(ITIMER_PROF)``) sends its
SIGPROF to whichever thread the kernel picks; when that is a C thread that holds no GIL (an
OpenMP worker, a hash or a BLAS call in another thread) the main thread learns of the signal
only when that thread next asks for the GIL, seconds later (measured: a 0.1 s limit fired after
2.1 s while another thread ran a 2 s ``hashlib.pbkdf2_hmac``). So on Linux the limit is a POSIX
timer on the calling thread's own CPU clock (``CLOCK_THREAD_CPUTIME_ID``) whose signal is
directed at that thread (``SIGEV_THREAD_ID``): it counts exactly the thread's CPU and wakes
exactly the thread that must raise. Elsewhere it falls back to ``ITIMER_PROF``, whose handler
re-arms when it came early (other threads' CPU counted).

C code that never returns to Python cannot be interrupted by any signal handler; a worker
process adds ``RLIMIT_CPU`` as a backstop (:mod:`r1fast.rewards.workers`).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import os
import signal
import sys
import threading
import time


class CpuTimeExceeded(BaseException):
    """Raised (from SIGPROF) when a :func:`cpu_time_limit` block used up its CPU seconds.

    A BaseException, so library code that catches ``Exception`` (math-verify, sympy) cannot
    swallow it; ``token`` is the value the block's ``with`` yielded (which limit fired)."""

    def __init__(self, token: object, seconds: float):
        super().__init__(f"exceeded its CPU-time limit of {seconds:g} s")
        self.token, self.seconds = token, seconds


_SIGEV_THREAD_ID = 4  # Linux: deliver the timer's signal to one thread (sigev_notify_thread_id)


class _Sigevent(ctypes.Structure):
    # struct sigevent on Linux (64 bytes): value, signo, notify, then a union whose first
    # member for SIGEV_THREAD_ID is the target thread id
    _fields_ = [("sigev_value", ctypes.c_void_p), ("sigev_signo", ctypes.c_int),
                ("sigev_notify", ctypes.c_int), ("sigev_tid", ctypes.c_int),
                ("_pad", ctypes.c_int * 11)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class _ThreadCpuTimer:
    """One POSIX timer per process on the main thread's CPU clock, signalling that thread."""

    def __init__(self, libc: ctypes.CDLL):
        self._libc = libc
        self._timer = ctypes.c_void_p()
        sev = _Sigevent(sigev_signo=signal.SIGPROF, sigev_notify=_SIGEV_THREAD_ID,
                        sigev_tid=threading.get_native_id())
        if libc.timer_create(time.CLOCK_THREAD_CPUTIME_ID, ctypes.byref(sev),
                             ctypes.byref(self._timer)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timer_create(CLOCK_THREAD_CPUTIME_ID): {os.strerror(err)}")
        self.pid = os.getpid()  # POSIX timers are not inherited across fork

    def set(self, seconds: float) -> None:
        """Fire after ``seconds`` more CPU seconds of this thread; 0 disarms."""
        whole = int(seconds)
        spec = _Itimerspec(it_value=_Timespec(whole, int((seconds - whole) * 1e9)))
        if self._libc.timer_settime(self._timer, 0, ctypes.byref(spec), None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timer_settime: {os.strerror(err)}")


def _load_timer_libc() -> ctypes.CDLL | None:
    """libc with timer_create (glibc >= 2.34 has it in libc, older ones in librt); None off
    Linux, where SIGEV_THREAD_ID does not exist."""
    if not sys.platform.startswith("linux"):
        return None
    for name in (None, ctypes.util.find_library("rt")):
        lib = ctypes.CDLL(name, use_errno=True)
        if hasattr(lib, "timer_create") and hasattr(lib, "timer_settime"):
            lib.timer_create.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
            lib.timer_settime.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                          ctypes.c_void_p]
            return lib
    return None


_LIBC = _load_timer_libc()
_TIMER: _ThreadCpuTimer | None = None
_LIMITS: list["_CpuLimit"] = []  # the open blocks, outermost first
_PREV_HANDLER: list = []


def limit_active() -> bool:
    """Whether a :func:`cpu_time_limit` block is open (on the main thread): code inside a
    reward call that the runner bounds can leave the verdict to that limit."""
    return bool(_LIMITS)


def _thread_timer() -> _ThreadCpuTimer | None:
    global _TIMER
    if _LIBC is None:
        return None
    if _TIMER is None or _TIMER.pid != os.getpid():
        _TIMER = _ThreadCpuTimer(_LIBC)
    return _TIMER


def _set_timer(seconds: float) -> None:
    timer = _thread_timer()
    if timer is not None:
        timer.set(seconds)
    else:  # process-wide CPU: fires at or before this thread's deadline, never after
        signal.setitimer(signal.ITIMER_PROF, seconds)


def _arm() -> None:
    if not _LIMITS:
        _set_timer(0)
        return
    deadline = min(limit.deadline for limit in _LIMITS)
    _set_timer(max(deadline - time.thread_time(), 1e-4))


#: CPU seconds after which a limit whose exception was swallowed fires again (below)
_RETRY_S = 2e-3


def _on_sigprof(signum, frame) -> None:
    if not _LIMITS:
        return
    limit = min(_LIMITS, key=lambda lim: lim.deadline)
    if time.thread_time() + 1e-3 < limit.deadline:  # early (ITIMER_PROF fallback, granularity)
        _arm()
        return
    # The handler runs between any two bytecodes of whatever Python code runs: blocks nested
    # in the firing one (entered later) are unwound by this raise, and their own exits may
    # never run (it can land in their __enter__), so they are closed here.
    del _LIMITS[_LIMITS.index(limit) + 1:]
    where = _where(limit, frame)
    limit.fired = True
    if where == "exit":  # its own __exit__ runs: that closes it (and raises if the block did not)
        return
    if where == "block":
        # Inside the block, whose exit closes it as the raise unwinds it. Code that discards
        # exceptions can swallow the raise (a gc callback such as hypothesis's, a __del__: the
        # block then ran unbounded, 14 of 1,500 times): until the block exits, fire again;
        # a block that ends first raises from its __exit__ (``fired``).
        _set_timer(_RETRY_S)
    else:
        # in its __enter__, whose raise skips the bookkeeping (no __exit__ will run), or the
        # plain function that opened it has returned (ExitStack.enter_context): closed here,
        # raised once. A limit left open made every later check in the process unbounded
        # (measured: 4 leaks in 20,000 blocks of 0.2 ms).
        _LIMITS.remove(limit)
        limit.owner = None
        _arm()
    raise CpuTimeExceeded(limit.token, limit.seconds)


_SUSPENDABLE = 0x20 | 0x80 | 0x200  # CO_GENERATOR | CO_COROUTINE | CO_ASYNC_GENERATOR


def _where(limit: "_CpuLimit", frame) -> str:
    """"enter" / "exit" (in its own __enter__ / __exit__), "block" (below the frame that
    opened it, or that frame is a suspended generator / coroutine: a contextmanager, a yield
    inside the block) or "gone" (a plain function frame that has returned)."""
    while frame is not None:
        if frame.f_code in _BOOKKEEPING and frame.f_locals.get("self") is limit:
            return "enter" if frame.f_code is _BOOKKEEPING[0] else "exit"
        if frame is limit.owner:
            return "block"
        frame = frame.f_back
    owner = limit.owner
    return "block" if owner is not None and owner.f_code.co_flags & _SUSPENDABLE else "gone"


def cpu_time_limit(seconds: float | None):
    """``with cpu_time_limit(s) as token:`` raises :class:`CpuTimeExceeded` (``.token is
    token``, also readable before the block as ``cpu_time_limit(s).token``) once the block used ``s`` seconds of this thread's CPU time (user + system,
    ``time.thread_time``), however loaded the machine is and whatever other threads of the
    process burn. Blocks nest (the earliest deadline fires, with its own token). A no-op
    (token None) off the main thread, where no signal handler runs, or when ``seconds`` is
    None or <= 0."""
    if not seconds or seconds <= 0 or not hasattr(signal, "setitimer") or \
            threading.current_thread() is not threading.main_thread():
        return _NoLimit(None)
    return _CpuLimit(float(seconds))


class _NoLimit(contextlib.nullcontext):
    token = None


class _CpuLimit:
    """``token`` is known before the block is entered: a limit that fires inside
    ``__enter__`` (a sub-millisecond one) is told apart from an outer one by ``limit.token``,
    where ``as token`` would not be bound yet."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.token = object()
        self.deadline = math.inf
        self.owner = None  # the frame running the ``with``
        self.fired = False

    def __enter__(self) -> object:
        if not _PREV_HANDLER:  # installed by the outermost block, kept until the last closes
            _PREV_HANDLER.append(signal.signal(signal.SIGPROF, _on_sigprof))
        self.owner = sys._getframe(1)
        self.deadline = time.thread_time() + self.seconds
        _LIMITS.append(self)
        _arm()
        return self.token

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(ValueError):  # already closed by the handler that fired
            _LIMITS.remove(self)  # one C call: no handler runs in the middle of it
        self.owner = None
        _arm()
        if not _LIMITS and _PREV_HANDLER:
            signal.signal(signal.SIGPROF, _PREV_HANDLER.pop())
        if self.fired and exc[0] is None:  # fired, but a finalizer swallowed the raise
            raise CpuTimeExceeded(self.token, self.seconds)


_BOOKKEEPING = (_CpuLimit.__enter__.__code__, _CpuLimit.__exit__.__code__)
