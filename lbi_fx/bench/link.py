"""A shaped loopback link for ``lbi-fx bench crossover``: ``tc``'s token-bucket filter on
``lo`` for the duration of a ``with`` block, and the loopback exactly as it was afterwards.

:func:`shaped_loopback` (root, or CAP_NET_ADMIN) sets ``lo``'s MTU to 1500 and adds
``tc qdisc add dev lo root tbf rate RATE burst 16kb limit 16mb``; on leaving the block
(normally, on an exception, Ctrl-C, or SIGTERM, which raises ``SystemExit(143)`` inside
the block) it deletes the qdisc and puts the original MTU back, in that order. An
``atexit`` hook does the same should the block never be left. Why these settings
(measured on a 2-core CPU box, gloo over 127.0.0.1):

- the default 64 KiB loopback MTU needs a burst of at least one MTU, and a burst below
  it stalls gloo: hence MTU 1500, where a 16 KB burst is ten packets;
- a large burst (1 MB) lets a whole step's small exchanges through at loopback speed,
  so the rate would not apply to LBI's few-KB messages; 16 KB keeps them shaped;
- with MTU 1500 and rate 100mbit a 5 MB gloo send takes 0.428 s (0.42 s expected).

Both directions of loopback traffic go through the one ``lo`` egress queue: the rate is
shared by the two ranks' sends, as on a half-duplex link. ``netem`` (delay) is not used.

Refusals: a root qdisc other than the default ``noqueue`` already on ``lo`` (another run,
or one that was killed with SIGKILL) raises :class:`lbi_fx.errors.InputError` saying how
to clear it; no ``tc`` / ``ip``, or not permitted, raises :class:`LinkShapingUnavailable`.
"""

from __future__ import annotations

import atexit
import contextlib
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

from lbi_fx.errors import InputError

DEV = "lo"
DEFAULT_QDISC = "noqueue"
LOOPBACK_MTU = 65536
UNSHAPED = "unshaped"

# tc(8) rate units: SI (k = 1000) and IEC (ki = 1024) prefixes, bits or bytes per second
_PREFIX = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
           "ki": 2 ** 10, "mi": 2 ** 20, "gi": 2 ** 30, "ti": 2 ** 40}
_RATE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(k|m|g|t|ki|mi|gi|ti)?(bit|bps)$")


class LinkShapingUnavailable(InputError):
    """The loopback cannot be shaped here: ``tc`` / ``ip`` missing, not root (no
    CAP_NET_ADMIN), or the kernel lacks the ``tbf`` qdisc."""


class LinkRestoreError(RuntimeError):
    """The loopback could not be put back as it was; the message says what to run."""


def restore_hint(mtu: int = LOOPBACK_MTU) -> str:
    return f"`tc qdisc del dev {DEV} root` and `ip link set dev {DEV} mtu {mtu}`"


def parse_rate(rate: str) -> float:
    """Bits per second of a ``tc`` rate such as ``10mbit``, ``1gbit``, ``500kbit`` or
    ``2mbps`` (bytes per second); ``"unshaped"`` is infinite. A unit is required."""
    if rate == UNSHAPED:
        return float("inf")
    m = _RATE.match(rate.strip().lower()) if isinstance(rate, str) else None
    if m is None:
        raise InputError(f"link rate {rate!r}: give a tc rate with its unit, e.g. 10mbit, "
                         "1gbit, 500kbit (bits/s) or 2mbps (bytes/s), or 'unshaped'")
    value = float(m.group(1)) * _PREFIX[m.group(2) or ""] * (8 if m.group(3) == "bps" else 1)
    if value <= 0:
        raise InputError(f"link rate {rate!r} must be > 0")
    return value


def format_rate(bps: float) -> str:
    """``2.35e7`` -> ``'23.5 Mbit/s'``."""
    if bps == float("inf"):
        return UNSHAPED
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.3g} {unit}"
    return f"{bps:.3g} bit/s"


def _call(run: Callable, argv: list[str]) -> str:
    """stdout of ``argv``; :class:`LinkShapingUnavailable` when it cannot run or fails."""
    cmd = " ".join(argv)
    try:
        proc = run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise LinkShapingUnavailable(
            f"`{argv[0]}` is not installed ({exc}): shaping the loopback needs iproute2's "
            "tc and ip; install it, or use --modeled") from exc
    except PermissionError as exc:
        raise LinkShapingUnavailable(f"cannot run `{cmd}` ({exc}): use --modeled") from exc
    if proc.returncode != 0:
        err = " ".join(((proc.stderr or "") + " " + (proc.stdout or "")).split())
        low = err.lower()
        if "not permitted" in low or "permission denied" in low or "eperm" in low:
            raise LinkShapingUnavailable(
                f"`{cmd}` is not permitted ({err}): shaping the loopback needs root "
                "(CAP_NET_ADMIN); run as root, or use --modeled")
        raise LinkShapingUnavailable(f"`{cmd}` failed (exit {proc.returncode}: {err}): "
                                     "the loopback cannot be shaped here; use --modeled")
    return proc.stdout or ""


def loopback_mtu(run: Callable = subprocess.run) -> int:
    out = _call(run, ["ip", "link", "show", "dev", DEV])
    m = re.search(r"\bmtu (\d+)", out)
    if m is None:
        raise LinkShapingUnavailable(f"`ip link show dev {DEV}` printed no MTU ({out.strip()!r})"
                                     ": use --modeled")
    return int(m.group(1))


def root_qdisc(run: Callable = subprocess.run) -> str | None:
    """The root qdisc line of ``lo`` when it is not the default ``noqueue``, else None."""
    for line in _call(run, ["tc", "qdisc", "show", "dev", DEV]).splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "qdisc" and "root" in words:
            return None if words[1] == DEFAULT_QDISC else line.strip()
    return None


def check_unshaped(run: Callable = subprocess.run) -> int:
    """Refuse a loopback that something else is shaping; returns its MTU."""
    mtu = loopback_mtu(run)
    other = root_qdisc(run)
    if other is not None:
        raise InputError(
            f"the loopback already has a root qdisc ({other!r}), so its rate is not ours to "
            f"set: another crossover run is shaping it, or one was killed before it could "
            f"restore it. If no such run is alive, clear it with {restore_hint()} "
            "(as root), then run again")
    return mtu


def probe(run: Callable = subprocess.run) -> int:
    """Check, changing nothing, that :func:`shaped_loopback` can work here: tools present,
    ``lo`` not shaped already, and permission (setting the MTU it has needs the same
    capability as changing it). Returns the MTU."""
    mtu = check_unshaped(run)
    _call(run, ["ip", "link", "set", "dev", DEV, "mtu", str(mtu)])
    return mtu


class _Restore:
    """Undo what was done, once, in order: the qdisc, then the MTU."""

    def __init__(self, run: Callable, mtu: int):
        self.run, self.mtu = run, mtu
        self.qdisc = self.mtu_changed = False
        self.lock = threading.Lock()

    def __call__(self) -> list[str]:
        failed = []
        with self.lock:
            steps = []
            if self.qdisc:
                steps.append(("qdisc", ["tc", "qdisc", "del", "dev", DEV, "root"],
                              lambda: root_qdisc(self.run) is None))
            if self.mtu_changed:
                steps.append(("mtu_changed", ["ip", "link", "set", "dev", DEV, "mtu",
                                              str(self.mtu)],
                              lambda: loopback_mtu(self.run) == self.mtu))
            for attr, argv, restored in steps:
                try:
                    _call(self.run, argv)
                except Exception as exc:  # noqa: BLE001 - try the next step, then report
                    try:  # interrupted before it was set (or gone already): nothing to undo
                        fine = restored()
                    except Exception:  # noqa: BLE001
                        fine = False
                    if not fine:
                        failed.append(f"{' '.join(argv)}: {exc}")
                        continue
                setattr(self, attr, False)
        return failed


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """SIGINT / SIGTERM held back while the loopback is restored (delivered after)."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (AttributeError, OSError, ValueError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def shaped_loopback(rate: str | None, *, mtu: int = 1500, burst: str = "16kb",
                    limit: str = "16mb", run: Callable = subprocess.run) -> Iterator[dict | None]:
    """Shape ``lo`` to ``rate`` (a tc rate, e.g. ``"10mbit"``) inside the block; ``None`` or
    ``"unshaped"`` does nothing (yields None). Yields what was set. See the module
    docstring for the refusals and the restore guarantees."""
    if rate is None or rate == UNSHAPED:
        yield None
        return
    parse_rate(rate)  # a bad rate is refused before anything is touched
    original = check_unshaped(run)
    restore = _Restore(run, original)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    atexit.register(restore)
    ok = False
    try:
        if main:
            signal.signal(signal.SIGTERM, _terminated)
        if original != mtu:
            restore.mtu_changed = True  # before: a signal right after the set still undoes it
            try:
                _call(run, ["ip", "link", "set", "dev", DEV, "mtu", str(mtu)])
            except LinkShapingUnavailable:
                restore.mtu_changed = False  # refused: nothing changed
                raise
        restore.qdisc = True
        try:
            _call(run, ["tc", "qdisc", "add", "dev", DEV, "root", "tbf", "rate", rate,
                        "burst", burst, "limit", limit])
        except LinkShapingUnavailable:
            restore.qdisc = False  # nothing was added: only the MTU to put back
            raise
        yield dict(rate=rate, mtu=mtu, burst=burst, limit=limit, original_mtu=original)
        ok = True
    finally:
        with _signals_blocked():
            failed = restore()
            atexit.unregister(restore)
            if main:
                signal.signal(signal.SIGTERM, previous if previous is not None
                              else signal.SIG_DFL)
        if failed:
            msg = (f"could not restore the loopback ({'; '.join(failed)}): run "
                   f"{restore_hint(original)} as root")
            if ok:
                raise LinkRestoreError(msg)
            print(f"lbi-fx: warning: {msg}", file=sys.stderr)
