# SPDX-License-Identifier: Apache-2.0
"""Guest side of the vm tests: run a test module's ``check_*`` functions inside the guest.

Usage (inside the guest, started by conftest's ``guest_checks`` fixture)::

    python harness.py TEST_FILE OUT_JSON [CHECK ...]

Checks run in definition order (all of them unless CHECKs are named), then the module's
``teardown()`` if it has one (recorded as "teardown"). Each check runs as ``check(ctx)``
with a :class:`Ctx` and records passed / failed (with the traceback) / hung into OUT_JSON, rewritten after every check so a guest killed half-way
still reports what ran. A check's wall-clock guard is ``check.timeout`` seconds (default 60,
set with :func:`guestlib.guard`): a SIGALRM interrupts the check at that time; if it is
stuck in the kernel even so, a watchdog thread records it as hung after 10 more seconds and
reboots the guest, so one hang fails one test quickly instead of the whole boot timing out.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Ctx:
    """Per-check context: scratch dirs and a place for data the host test may look at."""

    name: str
    tmp: Path      # guest tmpfs scratch, private to the check
    cache: Path    # a dir on the ext4 cache disk, private to the check (cachefiles needs ext4)
    out: Path      # dir in the results share (comes back to the host)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


class CheckTimeout(Exception):
    """The check's wall-clock guard fired."""


def _alarm(signum: int, frame: object) -> None:
    raise CheckTimeout("wall-clock guard fired")


def main(argv: list[str]) -> int:
    test_file, out_json, *names = argv
    spec = importlib.util.spec_from_file_location(Path(test_file).stem, test_file)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names = names or [n for n in vars(module) if n.startswith("check_")]  # definition order
    results: dict[str, dict[str, Any]] = {n: {"status": "not_run"} for n in names}
    out = Path(out_json)
    lock = threading.Lock()

    def save() -> None:
        with lock:
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=1, default=str))
            os.replace(tmp, out)

    signal.signal(signal.SIGALRM, _alarm)
    save()
    for name in names:
        check = getattr(module, name)
        limit = float(getattr(check, "timeout", 60))
        ctx = Ctx(name, Path("/tmp/checks") / name, Path(os.environ.get("ODG_CACHE", "/mnt/cache"))
                  / name, out.parent / name)
        for d in (ctx.tmp, ctx.cache, ctx.out):
            d.mkdir(parents=True, exist_ok=True)
        record = results[name] = {"status": "running", "timeout": limit}
        save()
        print(f"harness: {name} started (guard {limit:.0f} s)", flush=True)
        started = time.monotonic()
        done = threading.Event()

        def watchdog(record: dict[str, Any] = record, started: float = started,
                     done: threading.Event = done, name: str = name) -> None:
            if done.wait(limit + 10):
                return
            record.update(status="hung", seconds=round(time.monotonic() - started, 3),
                          error=f"stuck in the kernel past its {limit:.0f} s guard "
                                f"(SIGALRM did not get it out); guest rebooted",
                          data=ctx.data)
            save()
            print(f"harness: {name} HUNG; rebooting the guest", flush=True)
            # No sync(): it would wait for the s_umount of a superblock a stuck mount holds.
            # The results share is cache=none, so what save() wrote is already on the host.
            Path("/proc/sysrq-trigger").write_text("b")

        threading.Thread(target=watchdog, daemon=True).start()
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            check(ctx)
        except BaseException as exc:  # noqa: BLE001 - every failure is recorded for the host
            signal.setitimer(signal.ITIMER_REAL, 0)
            status = "timeout" if isinstance(exc, CheckTimeout) else "failed"
            record.update(status=status, error="".join(traceback.format_exception(exc)))
        else:
            signal.setitimer(signal.ITIMER_REAL, 0)
            record["status"] = "passed"
        finally:
            done.set()
        record.update(seconds=round(time.monotonic() - started, 3), data=ctx.data)
        save()
        print(f"harness: {name} {record['status']} in {record['seconds']} s", flush=True)
    teardown = getattr(module, "teardown", None)
    if teardown is not None:  # module-level clean-up (e.g. a daemon shared by checks)
        try:
            teardown()
            results["teardown"] = {"status": "passed"}
        except Exception as exc:  # noqa: BLE001 - recorded for the host
            results["teardown"] = {"status": "failed",
                                   "error": "".join(traceback.format_exception(exc))}
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
