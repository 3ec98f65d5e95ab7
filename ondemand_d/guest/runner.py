# SPDX-License-Identifier: Apache-2.0
"""Run one command as root inside a QEMU guest that has a cachefiles on-demand kernel.

The guest (spec/vm.md) boots a kernel from :mod:`ondemand_d.guest.kernel` (``kernel_kind``:
6.12 by default, or 7.2; the same command line and init scripts for every kind) with:

* the host's ``/`` as its root, read-only over virtio-9p: host binaries, the host's Python and
  this package run unchanged; tmpfs covers ``/run``, ``/mnt`` and ``/dev/shm``, and ``/tmp``
  is an overlay (the host's ``/tmp`` below, writes kept in the guest's memory).
  The root is mounted ``cache=loose`` (Python start-up is about twice as fast under TCG), so
  a host file changed during a boot may be seen stale: put inputs in the results dir;
* a fresh sparse ext4 disk (``/dev/vda``) mounted at ``/mnt/cache`` (cachefiles cannot bind
  on tmpfs);
* a writable 9p share, the *results dir*, mounted **at the same path as on the host** (and
  linked from ``/mnt/results``; ``$ODG_RESULTS`` names it). Inputs the host puts there before
  the boot are visible to the guest, and whatever the guest writes there comes back.

PID 1 is ``init.sh`` beside this file. It runs the command, records its exit status, stdout
and stderr in ``<results>/.guest/`` and reboots, which ends QEMU (``-no-reboot``). A guest that
does not finish within ``timeout`` seconds is killed and reported with ``timed_out=True``.

API::

    from ondemand_d.guest.runner import run_in_guest, guest_python, ondemand_d_argv

    result = run_in_guest([guest_python(), "-c", "print(open('/proc/version').read())"],
                          env={"PYTHONPATH": "/work/main"}, timeout=120)
    result.check()            # raises GuestError (with stdout/stderr/console tail) unless rc 0
    result.returncode, result.stdout, result.stderr, result.console, result.files

The command runs with ``cwd`` (default: the caller's cwd; it is visible in the guest
read-only), an environment of ``PATH`` (the host's, minus pyenv shims, with the real
interpreter's directory first), ``HOME=/tmp``, ``PYTHONDONTWRITEBYTECODE=1``,
``PYTHONUNBUFFERED=1``, ``ONDEMAND_D_IN_GUEST=1``, ``ODG_RESULTS``, ``ODG_CACHE`` plus ``env``.
Call Python by :func:`guest_python` and ondemand-d by :func:`ondemand_d_argv`: pyenv's shims
fail in the guest, and a resolved base interpreter has none of the project's packages.

QEMU uses TCG (software emulation) unless ``ONDEMAND_D_GUEST_ACCEL`` says otherwise (e.g.
``kvm``): a /dev/kvm that exists is not necessarily usable (nested virtualisation here makes
QEMU abort on an MSR write), so KVM is opt-in.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

from ondemand_d.guest import kernel as _kernel

INIT_SCRIPT = "init.sh"
SYSTEMD_INIT_SCRIPT = "init-systemd.sh"
GUEST_CACHE = "/mnt/cache"
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._-+:,=@%")


class GuestError(RuntimeError):
    """The guest could not be started, or its command failed (see the attached result)."""

    def __init__(self, message: str, result: GuestResult | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclasses.dataclass(frozen=True, slots=True)
class GuestResult:
    """What came back from one guest boot.

    Attributes:
        returncode: the command's exit status; None if the guest never reported one (it
            crashed, could not start the command, or was killed after the time limit).
        stdout, stderr: the command's output.
        console: the serial console (kernel messages and init's own lines).
        results_dir: the host results directory (the caller owns it).
        files: paths, relative to results_dir, of the files in it (``.guest/`` excluded).
        seconds: wall-clock time from QEMU start to exit.
        boot_seconds: guest uptime when init started the command (None if it never did).
        timed_out: True if QEMU was killed after ``timeout`` seconds.
    """

    returncode: int | None
    stdout: str
    stderr: str
    console: str
    results_dir: Path
    files: list[Path]
    seconds: float
    boot_seconds: float | None
    timed_out: bool

    def summary(self, tail: int = 40) -> str:
        """Return a multi-line description of the run, for error messages."""
        def last(text: str) -> str:
            return "\n".join(text.rstrip().splitlines()[-tail:]) or "(empty)"
        state = "TIMED OUT (killed)" if self.timed_out else f"exit status {self.returncode}"
        return (f"guest command: {state} after {self.seconds:.1f} s "
                f"(results: {self.results_dir})\n--- stdout ---\n{last(self.stdout)}\n"
                f"--- stderr ---\n{last(self.stderr)}\n--- console ---\n{last(self.console)}")

    def check(self) -> GuestResult:
        """Return self if the command exited 0, else raise GuestError with the summary."""
        if self.returncode != 0:
            raise GuestError(self.summary(), self)
        return self


def guest_python() -> str:
    """Return a path of this interpreter that works in the guest.

    pyenv's shims do not work there, so outside a virtualenv this is the real
    path. Inside one it is the venv's own `bin/python` (a symlink): resolving
    it would lose the venv's site-packages.
    """
    if sys.prefix != sys.base_prefix:
        return os.path.abspath(sys.executable)
    return os.path.realpath(sys.executable)


def ondemand_d_argv() -> list[str]:
    """Return the command that runs ondemand-d, on the host or in the guest: one way for all.

    It is :func:`guest_python` with ``-m ondemand_d``: the interpreter that has the project's
    dependencies (the virtualenv's), never a resolved base interpreter that may have none.
    """
    return [guest_python(), "-m", "ondemand_d"]


def guest_path() -> str:
    """Return a PATH for the guest: the real interpreter's dir, then the host PATH sans shims."""
    parts = [os.path.dirname(guest_python())]
    for part in os.environ.get("PATH", "").split(os.pathsep):
        if part and "shims" not in part.split(os.sep) and part not in parts:
            parts.append(part)
    for part in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        if part not in parts:
            parts.append(part)
    return os.pathsep.join(parts)


def init_script(systemd: bool = False) -> Path:
    """Return the path of init.sh, or of init-systemd.sh (package data, read over 9p)."""
    name = SYSTEMD_INIT_SCRIPT if systemd else INIT_SCRIPT
    return Path(str(resources.files("ondemand_d.guest").joinpath(name))).resolve()


def make_cache_disk(path: Path, size: str = "1G") -> Path:
    """Create a sparse ext4 image for the guest's cache (inode tables zeroed on the host)."""
    path.unlink(missing_ok=True)
    with path.open("wb"):
        pass
    subprocess.run(["truncate", "-s", size, str(path)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                    str(path)], check=True, capture_output=True)
    return path


def _command_script(argv: Sequence[str], env: Mapping[str, str], cwd: str) -> str:
    lines = ["# written by ondemand_d.guest.runner", f"cd {shlex.quote(cwd)} || exit 125"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
    return "\n".join(lines) + "\n"


def qemu_argv(bzimage: Path, results_dir: Path, cache_disk: Path, *, memory_mb: int = 2048,
              cpus: int = 2, path: str | None = None, keep_cache: bool = False,
              systemd: bool = False) -> list[str]:
    """Return the QEMU command line that boots the guest (see spec/vm.md)."""
    for value in (str(results_dir), str(init_script(systemd))):
        if not set(value) <= _SAFE:
            raise GuestError(f"path {value!r} has characters the kernel command line cannot carry")
    accel = os.environ.get("ONDEMAND_D_GUEST_ACCEL", "tcg")
    append = " ".join([
        "console=ttyS0", "root=/dev/root", "rootfstype=9p",
        "rootflags=trans=virtio,version=9p2000.L,msize=512000,cache=loose", "ro",
        "panic=-1", "quiet",
        "init=/bin/sh", f"ODG_RESULTS={results_dir}", f"ODG_CACHE={GUEST_CACHE}",
        f"PATH={path or guest_path()}", *(["ODG_KEEP_CACHE=1"] if keep_cache else []),
        "--", str(init_script(systemd)),
    ])
    return [
        "qemu-system-x86_64", "-machine", f"q35,accel={accel}",
        "-cpu", "max", "-smp", str(cpus), "-m", str(memory_mb),
        "-nographic", "-no-reboot", "-kernel", str(bzimage),
        "-fsdev", "local,id=rootfs,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=rootfs,mount_tag=/dev/root",
        "-fsdev", f"local,id=res,path={results_dir},security_model=none",
        "-device", "virtio-9p-pci,fsdev=res,mount_tag=results",
        "-drive", f"file={cache_disk},if=virtio,format=raw",
        "-append", append,
    ]


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _float(path: Path) -> float | None:
    try:
        return float(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def run_in_guest(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                 timeout: float = 300, results_dir: Path | None = None, cwd: str | None = None,
                 kernel: Path | None = None, kernel_kind: str = _kernel.DEFAULT_KIND,
                 cache_disk: Path | None = None,
                 cache_size: str = "1G", memory_mb: int = 2048, cpus: int = 2,
                 systemd: bool = False) -> GuestResult:
    """Boot the guest, run ``argv`` as root, and return what happened.

    Args:
        argv: the command; call Python as :func:`guest_python`.
        env: extra environment variables for the command.
        timeout: seconds before QEMU is killed (the result then has ``timed_out=True``).
        results_dir: host directory shared writable at the same path in the guest; created
            if missing; default a new temporary directory (the caller owns it either way).
        cwd: working directory of the command in the guest (default: the current one).
        kernel: bzImage to boot; default :func:`ondemand_d.guest.kernel.ensure_kernel` of
            ``kernel_kind``, which builds it on first use.
        kernel_kind: which guest kernel (a key of ``ondemand_d.guest.kernel.KINDS``): ``"6.12"``
            (about 8 min to build on 2 cores) or ``"7.2"`` (about 20 min). The QEMU command
            line and init scripts are the same for every kind.
        cache_disk: an existing ext4 image to use as /mnt/cache (kept, so a later boot sees
            the same cache); default a fresh sparse 1 GiB image, deleted afterwards.
        cache_size: size of the fresh cache image.
        memory_mb, cpus: guest size.
        systemd: boot systemd as PID 1 (:mod:`ondemand_d.guest.sysboot`) and run the command
            as its ``odg-test.service`` once ``multi-user.target`` is up; the root is then an
            overlay (writable, changes kept in the guest's memory) over the host's.

    Raises:
        GuestError: QEMU could not be started.
        ondemand_d.guest.kernel.KernelBuildError: no kernel and it could not be built.
    """
    if kernel is None:
        kernel = _kernel.ensure_kernel(kind=kernel_kind).bzimage
    if not shutil.which("qemu-system-x86_64") or not shutil.which("mkfs.ext4"):
        _kernel.install_host_packages()
    results = Path(results_dir or tempfile.mkdtemp(prefix="odg-results-")).resolve()
    guest_dir = results / ".guest"
    shutil.rmtree(guest_dir, ignore_errors=True)
    guest_dir.mkdir(parents=True)
    path = guest_path()
    full_env = {"PATH": path, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
                "LANG": "C.UTF-8", "ONDEMAND_D_IN_GUEST": "1", **(env or {})}
    (guest_dir / "cmd.sh").write_text(_command_script(argv, full_env, cwd or os.getcwd()))
    if systemd:
        from ondemand_d.guest.sysboot import build_layer

        build_layer(guest_dir / "layer", package_root=Path(__file__).resolve().parent.parent.parent)
    with tempfile.TemporaryDirectory(prefix="odg-disk-") as scratch:
        disk = cache_disk or make_cache_disk(Path(scratch) / "cache.img", cache_size)
        cmd = qemu_argv(kernel, results, disk, memory_mb=memory_mb, cpus=cpus, path=path,
                        keep_cache=cache_disk is not None, systemd=systemd)
        (guest_dir / "qemu.argv").write_text(shlex.join(cmd) + "\n")
        started = time.monotonic()
        timed_out = False
        with (guest_dir / "console.log").open("wb") as console:
            try:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                raise GuestError(f"cannot start QEMU: {exc}") from exc
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                proc.kill()
                proc.wait()
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        seconds = time.monotonic() - started
    status = _read(guest_dir / "status").strip()
    files = sorted(p.relative_to(results) for p in results.rglob("*")
                   if p.is_file() and guest_dir not in p.parents)
    return GuestResult(
        returncode=int(status) if status.lstrip("-").isdigit() else None,
        stdout=_read(guest_dir / "stdout"), stderr=_read(guest_dir / "stderr"),
        console=_read(guest_dir / "console.log"), results_dir=results, files=files,
        seconds=seconds, boot_seconds=_float(guest_dir / "booted"), timed_out=timed_out)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python3 -m ondemand_d.guest.runner [--timeout S] -- COMMAND...``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python3 -m ondemand_d.guest.runner",
                                     description="Run a command as root in the test guest.")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--results-dir", type=Path)
    parser.add_argument("--kernel-kind", choices=list(_kernel.KINDS), default=_kernel.DEFAULT_KIND,
                        help="guest kernel to boot (default: %(default)s)")
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    result = run_in_guest(args.command, timeout=args.timeout, results_dir=args.results_dir,
                          kernel_kind=args.kernel_kind)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    print(f"guest: {'timed out' if result.timed_out else f'exit {result.returncode}'} in "
          f"{result.seconds:.1f} s (init at {result.boot_seconds} s uptime); "
          f"results: {result.results_dir}", file=sys.stderr)
    return 124 if result.timed_out else (result.returncode if result.returncode is not None
                                         else 125)


if __name__ == "__main__":
    sys.exit(main())
