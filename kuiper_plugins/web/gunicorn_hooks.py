"""gunicorn server hooks: say where the service listens, what it found of an engine and whether it asks for
tokens; refuse to start on a port it cannot have, an unusable registry or JWT keys that others could change;
build the app once for every worker; and roll back an interrupted request.

`etc/gunicorn.conf.py` imports these by name; gunicorn calls them in the master or the workers.

The app is built in the master, once the start-up checks have passed, and the workers are forked from it:
the modules, the app and what they allocated are then in pages the master and every worker share (three
processes used to hold three copies). `gc.freeze()` just before each fork keeps the collector of a worker
from writing to the master's objects, which would copy their pages into the worker. Nothing the app opens
at build time is kept open (the registry's connections are opened per process, on first use), and what
runs in threads (engine/sync.py) starts in each worker. A reload (SIGHUP) builds the app anew, from the
settings as they are then, before the new workers are forked.

Before that, the master caps glibc's malloc arenas at MALLOC_ARENAS, for itself and the workers it forks:
glibc gives every thread that allocates an arena of its own (up to eight per core) and keeps in it what the
thread freed, so a worker's threads (the fsyncs it keeps threads for, the progress flusher, a portable
plugin's sealing) could each hold memory of their own. When the fsync threads came, one bench run gave an idle
PSS of master and two workers of 81 MB where it had been 72, and the next, with the cap, 73 MB; later runs of
the same capped code gave 72 or 81 MB from one run to the next, so what the cap saves is not established. The
threads run Python, one at a time under its lock: they have little to gain from arenas of their own.
Once the app is built, and after each write request a worker serves, glibc gives back what it holds free
(`release_free_memory`).
"""

from __future__ import annotations

import ctypes
import errno
import gc
import importlib
import logging
import os
import queue
import signal
import socket
import stat
import sys

from kuiper_plugins.app import log_serving, settle_home
from kuiper_plugins.errors import PluginError, RequestInterrupted
from kuiper_plugins.install.installer import recover_home
from kuiper_plugins.layout import Layout
from kuiper_plugins.lifecycle.backup import hold_service_lock
from kuiper_plugins.settings import (
    ENV_PREFIX,
    SETTINGS_FILE,
    Settings,
    authentication_mismatch,
    describe_listening,
    load_settings,
)
from kuiper_plugins.store import db
from kuiper_plugins.web.auth import UnsafeKeyFiles, check_key_files

log = logging.getLogger(__name__)

WORKER_BOOT_ERROR = 3  # gunicorn's exit status for "worker failed to boot": the master stops, no respawn loop


def _registry_problem(settings: Settings) -> str | None:
    """Why the registry cannot be used (corrupt, too new), read-only and without writing; None when it can."""
    try:
        db.check(Layout.of(settings).registry_file)
    except PluginError as exc:
        return exc.message
    return None


def _key_files_problem(settings: Settings) -> str | None:
    """With basic.authentication on, why the JWT keys cannot be trusted (see check_key_files); None when they can."""
    if not settings.authentication:
        return None
    try:
        check_key_files(Layout.of(settings).mgmt_keys)
    except UnsafeKeyFiles as exc:
        return str(exc)
    return None


SHOWN_KEYS = 10  # key files named in the start-up line; the rest are counted


def _listen_problem(server, settings: Settings) -> str | None:
    """Why gunicorn could not listen at basic.restIp:restPort, in Go's words and then the setting to change.

    gunicorn would retry five times and say only "Connection in use". A listener handed over by systemd
    or by a re-exec (LISTEN_FDS, GUNICORN_FD) is not checked: nothing binds it here.
    """
    if os.environ.get("LISTEN_FDS") or os.environ.get("GUNICORN_FD"):
        return None
    if (settings.rest_ip, settings.rest_port) not in {tuple(a) for a in server.cfg.address if isinstance(a, tuple)}:
        return None  # bound where gunicorn's own -b says: not a setting of ours
    family = socket.AF_INET6 if ":" in settings.rest_ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds: TIME_WAIT is no obstacle
        try:
            probe.bind((settings.rest_ip, settings.rest_port))
            return None
        except OSError as exc:
            failure = exc
    host = f"[{settings.rest_ip}]" if family == socket.AF_INET6 else settings.rest_ip
    words = f"listen tcp {host}:{settings.rest_port}: bind: {os.strerror(failure.errno).lower()}"
    change = (f"set basic.restPort in {SETTINGS_FILE} or {ENV_PREFIX}BASIC__RESTPORT, e.g."
              f" `{ENV_PREFIX}BASIC__RESTPORT=9095 make run`")
    if failure.errno == errno.EADDRINUSE:
        return f"{words} (another program listens on port {settings.rest_port}: {change})"
    if failure.errno == errno.EADDRNOTAVAIL:
        return (f"{words} (basic.restIp {settings.rest_ip} is not an address of this machine: set basic.restIp in"
                f" {SETTINGS_FILE} or {ENV_PREFIX}BASIC__RESTIP)")
    if failure.errno == errno.EACCES:
        return f"{words} (ports below 1024 need root: {change})"
    return f"{words} (basic.restIp and basic.restPort say where this service listens)"


def describe_authentication(settings: Settings) -> str:
    """One line for the start-up log: whether tokens are asked for, and which key files etc/mgmt holds."""
    keys_dir = Layout.of(settings).mgmt_keys
    try:
        keys = sorted(name for name in os.listdir(keys_dir) if stat.S_ISREG(os.stat(keys_dir / name).st_mode))
    except OSError:  # not made yet (start-up makes it), or unreadable: no key can be read there either
        keys = []
    shown = ", ".join(keys[:SHOWN_KEYS]) + (f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else "")
    if settings.authentication:
        if not keys:
            return (f"basic.authentication is on: every request but / and /ping needs a JWT, and {keys_dir} holds no"
                    " key yet, so every token is refused until a PEM public key named as the tokens' iss is put"
                    " there")
        return (f"basic.authentication is on: every request but / and /ping needs a JWT whose iss names one of the"
                f" keys in {keys_dir}: {shown}")
    users = ", ".join(("root", "this service's user", *settings.allowed_users))
    remote = ("remote callers are refused (basic.protectedMode)" if settings.protected_mode
              else "remote callers are served (basic.protectedMode is off)")
    held = f"; {keys_dir} holds {shown}, unused while it is off" if keys else ""
    return (f"basic.authentication is off: no token is asked for; local callers are served when their user is one"
            f" of {users}; {remote}{held}")


def on_starting(server):
    """In the master, before any worker is forked (the check's connection is closed by then)."""
    settings = load_settings()
    problem = _listen_problem(server, settings)
    if problem:
        sys.exit(f"kuiper-plugins cannot start: {problem}")
    log.info("%s", describe_listening(settings))
    log.info("%s", describe_authentication(settings))
    mismatch = authentication_mismatch(settings)
    if mismatch:
        log.warning("%s", mismatch)
    problem = _registry_problem(settings) or _key_files_problem(settings)
    if problem:
        sys.exit(f"kuiper-plugins cannot start: {problem}")
    # Building the app settles the home (recover_home), before gunicorn tells systemd it is ready (Type=notify):
    # an engine ordered after this service then boots on folders where no install is half done
    # (docs/engine-live.md, "Crashes").
    _build_app(server)
    server.kuiper_service_lock = hold_service_lock(Layout.of(settings))  # an offline restore refuses until exit


def _build_app(server) -> None:
    """Build the app in the master, for every worker to share (module docstring); keep its settings.

    Building it settles the home: the workers forked right after it need not settle it again (`pre_fork`).
    """
    limit_malloc_arenas()
    app = server.app.wsgi()
    services = getattr(app, "extensions", {}).get("kuiper_plugins")
    if services is None:  # another app than ours (the bench's bare one): the home is settled here
        recover_home(load_settings())
    server.kuiper_settings = services.settings if services is not None else load_settings()
    server.kuiper_settled_spawns = server.cfg.workers
    release_free_memory()  # what building the app freed is not forked into each worker


MALLOC_ARENAS = 2  # glibc malloc arenas of the master and its workers (module docstring)
_M_ARENA_MAX = -8  # glibc's mallopt parameter for it (malloc.h)


def limit_malloc_arenas() -> None:
    """Cap this process's malloc arenas at MALLOC_ARENAS (a forked worker inherits the cap); nothing without glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    if not mallopt(_M_ARENA_MAX, MALLOC_ARENAS):
        log.debug("malloc arenas could not be capped at %d (a C library other than glibc?)", MALLOC_ARENAS)


def on_reload(server):
    """SIGHUP, in the master, before the new workers are forked: build the app again from the settings now."""
    module = server.app.app_uri.partition(":")[0] if getattr(server.app, "app_uri", None) else None
    if module in sys.modules:
        importlib.reload(sys.modules[module])  # the app module builds its app when it runs (wsgi.py)
    server.app.callable = None
    _build_app(server)


def pre_fork(server, worker):
    """In the master, just before a worker is forked: what is built so far is shared, leave it be (docstring).

    The first workers after the app was built find the home just settled; any later one replaces a worker
    that stopped, perhaps in the middle of an operation, and settles the home before it serves.
    """
    gc.freeze()
    settled = getattr(server, "kuiper_settled_spawns", 0)
    worker.kuiper_home_settled = settled > 0
    server.kuiper_settled_spawns = max(settled - 1, 0)


# What the master sends its workers. Until a new worker has set its own handlers, it still runs the
# master's, which only queue the signal in the worker's copy of the master: a stop sent while workers
# boot was lost, and they ran on until the graceful timeout. post_fork holds these signals back and
# post_worker_init lets them in, once the worker's handlers are in place. One that came in the short
# while between fork and post_fork sits in that copied queue: post_fork takes it out and
# post_worker_init sends it again, to the worker itself. (A signal the master had queued for itself
# before the fork is sent again too; each of these only asks the worker for what the master is about
# to ask of it anyway: stop, or reopen its logs.)
WORKER_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGABRT, signal.SIGUSR1}


def post_fork(server, worker):
    """In each new worker, before the app loads: a registry or keys that went bad since start stop the service."""
    signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
    worker.kuiper_early_signals = _take_queued(getattr(server, "SIG_QUEUE", None))
    settings = getattr(server, "kuiper_settings", None) or load_settings()
    problem = _registry_problem(settings) or _key_files_problem(settings)
    if problem:
        server.log.error("kuiper-plugins cannot start: %s", problem)
        sys.exit(WORKER_BOOT_ERROR)


def _take_queued(signals) -> list[int]:
    """Empty this process's copy of the master's signal queue (a list before gunicorn 27, a SimpleQueue
    since); return the worker signals in it, in order. The master's own queue is untouched."""
    taken: list = []
    if isinstance(signals, list):
        taken, signals[:] = list(signals), []
    elif signals is not None and hasattr(signals, "get_nowait"):
        for _ in range(64):  # the master queues a handful at most
            try:
                taken.append(signals.get_nowait())
            except queue.Empty:
                break
    return [sig for sig in taken if sig in WORKER_SIGNALS]


def post_worker_init(worker):
    """In each new worker, once its signal handlers are set and the app is loaded: undo what a worker that died
    left, take the signals held back, and start the periodic look at the engine's plugins (engine/sync.py)."""
    services = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("kuiper_plugins")
    if services is not None and not getattr(worker, "kuiper_home_settled", False):
        settle_home(services)  # a worker that died may have left an operation: undone with the signals held back
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
    if services is not None:
        log_serving(services.settings)  # the app was built in the master: this worker now serves it too
        if services.engine_sync is not None:
            services.engine_sync.start()  # a thread of this worker: it is started after the fork, never before
    for sig in dict.fromkeys(getattr(worker, "kuiper_early_signals", ())):
        os.kill(os.getpid(), sig)


def pre_request(worker, req):
    worker.log.debug("%s %s", req.method, req.path)
    worker.kuiper_request_in_flight = True


def post_request(worker, req, environ, resp):
    worker.kuiper_request_in_flight = False
    if environ.get("REQUEST_METHOD") not in ("GET", "HEAD", "OPTIONS"):
        release_free_memory()  # a write (an install above all) may have freed megabytes a read never needs


def release_free_memory() -> None:
    """Give back to the kernel what glibc's malloc holds free (malloc_trim); nothing without glibc.

    Python's allocator returns its emptied arenas to malloc, and glibc keeps freed memory for the next
    allocation: after the work of an install, a worker would keep it resident for as long as it idles.
    About a millisecond, after writes only (and once in the master, before the workers are forked).
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


def _find_malloc_trim():
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = (ctypes.c_size_t,)
    return trim


_malloc_trim = _find_malloc_trim()


def worker_int(worker):
    """SIGINT or SIGQUIT in a worker: interrupt the request in flight (see `_interrupt`)."""
    _interrupt(worker, "the service is stopping")


def worker_abort(worker):
    """SIGABRT, sent by the master to a worker past its timeout: interrupt the request in flight."""
    _interrupt(worker, "the request outlasted the worker timeout")


def _interrupt(worker, reason: str) -> None:
    """Raise, from the signal handler, into the request being served, if there is one.

    This reaches the request because the worker (gunicorn_worker.BufferingWorker) serves it in the main
    thread, where Python runs signal handlers, and the signal breaks it out of the call it waits in. A
    threaded worker would lose both (docs/deployment.md).

    The installer undoes what the operation started as the exception unwinds it (whatever it cannot
    finish, start-up recovery does), the client gets a 503, and the worker, no longer alive, exits
    after answering. With no request in flight, gunicorn's own exit goes ahead.
    """
    if getattr(worker, "kuiper_request_in_flight", False):
        worker.kuiper_request_in_flight = False
        raise RequestInterrupted(f"{reason}: the request was interrupted and nothing it started is kept")
