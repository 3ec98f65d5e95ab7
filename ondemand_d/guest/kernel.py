# SPDX-License-Identifier: Apache-2.0
"""Build (once per machine) the test guests' kernels: one per *kind* in :data:`KINDS`.

Debian's stock kernels ship without ``CONFIG_CACHEFILES_ONDEMAND``, so the real-kernel tests
boot kernels built here from Debian source packages. Two kinds:

* ``6.12`` (the default): trixie's ``linux-source-6.12``; the fscache front end
  (cachefiles on-demand + EROFS over fscache). Every vm test without a kind boots it.
* ``7.2``: sid's ``linux-source-7.2`` (spec/kernel-7.2.md); the fanotify front end on
  file-backed EROFS, page-cache sharing. EROFS there no longer mounts by ``fsid``.

Each kind is a row (source package, suite, fragments, required options), one code path:

1. fetch the source .deb with a *private* apt sources list, state and cache dir per suite (the
   machine's apt configuration is never read for sources nor written);
2. unpack it once per source version;
3. ``make tinyconfig``, merge the kind's fragments (``kernel.config`` beside this file, then
   e.g. ``kernel-7.2.config``), ``make olddefconfig``, and check that the kind's required
   options survived (6.12: ``CACHEFILES_ONDEMAND``, ``EROFS_FS_ONDEMAND``; 7.2: every option
   of its own fragment);
4. ``make bzImage`` (``nice -n 5``, ``-j nproc+1``), output to ``build.log``;
5. keep the result at ``<cache>/<source-version>-<fragment-hash>/bzImage``.

The cache root is ``$ONDEMAND_D_KERNEL_CACHE`` or ``~/.cache/ondemand-d/kernel``. The fragment
hash is the sha256 (first 12 hex digits) of the kind's fragments' option lines, so editing
comments does not cause a rebuild. A cached kernel for the current fragments is reused without
touching the network; ``--refresh`` asks apt for the newest source version and builds if it
changed. A kind is built only when something asks for it (a vm test of that kind, the demo,
or this command).

Usage::

    python3 -m ondemand_d.guest.kernel [--kind 6.12|7.2|all ...] [--refresh] [--cache-dir DIR]
                                       [--no-install] [--prune]

The source trees (1.7 GB each) and the object dirs (200 MB each) are kept so that a changed fragment
rebuilds incrementally (a new fragment's object dir is seeded from the previous one);
``--prune`` deletes them and keeps only the built kernels.

API: :func:`ensure_kernel` (``kind="6.12"``) returns a :class:`Kernel` (bzImage path, kind,
version, whether it was built now). Missing build tools, ``qemu-system-x86``, ``e2fsprogs`` and ``erofs-utils`` are
installed with ``apt-get`` (as root, or through ``sudo -n``) unless ``install=False``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

DEBIAN_MIRROR = "http://deb.debian.org/debian"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
FRAGMENT = Path(__file__).with_name("kernel.config")
FRAGMENT_7_2 = Path(__file__).with_name("kernel-7.2.config")


@dataclasses.dataclass(frozen=True, slots=True)
class KernelKind:
    """One kind of guest kernel: where its source comes from and how it is configured.

    Attributes:
        name: what callers ask for (``"6.12"``, ``"7.2"``).
        package: Debian source package (``linux-source-X.Y``).
        suite: Debian suite that has it.
        fragments: merged over ``make tinyconfig`` in this order.
        required: options that must be ``=y`` after olddefconfig (else the build fails).
        minutes: rough build time on 2 loaded cores, for the progress line.
    """

    name: str
    package: str
    suite: str
    fragments: tuple[Path, ...]
    required: tuple[str, ...]
    minutes: int


#: The guest kernels the project tests on; a test names one by its key.
KINDS: dict[str, KernelKind] = {
    "6.12": KernelKind("6.12", "linux-source-6.12", "trixie", (FRAGMENT,),
                       ("CONFIG_CACHEFILES_ONDEMAND", "CONFIG_EROFS_FS_ONDEMAND"), 8),
    "7.2": KernelKind("7.2", "linux-source-7.2", "sid", (FRAGMENT, FRAGMENT_7_2),
                      ("CONFIG_FANOTIFY", "CONFIG_FANOTIFY_ACCESS_PERMISSIONS",
                       "CONFIG_EROFS_FS_XATTR", "CONFIG_EROFS_FS_BACKED_BY_FILE",
                       "CONFIG_EROFS_FS_PAGE_CACHE_SHARE", "CONFIG_CGROUPS", "CONFIG_MEMCG"), 20),
}
DEFAULT_KIND = "6.12"
# The default kind's names, as before there were kinds.
SOURCE_PACKAGE = KINDS[DEFAULT_KIND].package
DEBIAN_SUITE = KINDS[DEFAULT_KIND].suite
REQUIRED = KINDS[DEFAULT_KIND].required

#: Debian packages and a file each provides; a package is installed when its file is missing.
HOST_PACKAGES: dict[str, str] = {
    "bc": "bc",
    "bison": "bison",
    "flex": "flex",
    "make": "make",
    "gcc": "gcc",
    "libelf-dev": "/usr/include/libelf.h",
    "libssl-dev": "/usr/include/openssl/ssl.h",
    "xz-utils": "xz",
    "debian-archive-keyring": str(KEYRING),
    "qemu-system-x86": "qemu-system-x86_64",
    "e2fsprogs": "mkfs.ext4",
    "erofs-utils": "mkfs.erofs",   # the vm tests build their images with it
}

Progress = Callable[[str], None]


class KernelBuildError(RuntimeError):
    """The guest kernel could not be fetched, configured or built; the message says why."""


@dataclasses.dataclass(frozen=True, slots=True)
class Kernel:
    """A built guest kernel.

    Attributes:
        bzimage: path of the bootable image.
        kind: the :data:`KINDS` key it was built for.
        version: Debian version of the source package, e.g. ``6.12.117-1``.
        fragment_hash: first 12 hex digits of the fragment's option-line sha256.
        built: True if this call built it, False if it came from the cache.
        seconds: wall-clock time of this call.
    """

    bzimage: Path
    kind: str
    version: str
    fragment_hash: str
    built: bool
    seconds: float


def _stderr(line: str) -> None:
    print(f"kernel: {line}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """Return the kernel cache directory (``$ONDEMAND_D_KERNEL_CACHE`` or the XDG default)."""
    env = os.environ.get("ONDEMAND_D_KERNEL_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "ondemand-d" / "kernel"


def fragment_lines(fragment: Path = FRAGMENT) -> list[str]:
    """Return the fragment's option lines (``CONFIG_X=v`` and ``# CONFIG_X is not set``)."""
    out = []
    for raw in fragment.read_text().splitlines():
        line = raw.strip()
        if line.startswith("CONFIG_") or re.fullmatch(r"# CONFIG_\w+ is not set", line):
            out.append(line)
    return out


def fragment_hash(*fragments: Path) -> str:
    """Return the cache key part for fragments (default: the 6.12 one): sha256 of their option
    lines, in order, 12 hex digits (a single fragment hashes as it did before kinds)."""
    lines = [line for fragment in fragments or (FRAGMENT,) for line in fragment_lines(fragment)]
    return hashlib.sha256(("\n".join(lines) + "\n").encode()).hexdigest()[:12]


def kernel_kind(name: str) -> KernelKind:
    """Return the :data:`KINDS` row for ``name``.

    Raises:
        KernelBuildError: no such kind (the message lists the known ones).
    """
    try:
        return KINDS[name]
    except KeyError:
        raise KernelBuildError(f"unknown guest kernel kind {name!r}; known: "
                               f"{', '.join(KINDS)}") from None


def _run(argv: list[str], *, log: Path | None = None, cwd: Path | None = None) -> str:
    """Run a command; raise KernelBuildError with its output tail if it fails."""
    if log is None:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
        output = proc.stdout + proc.stderr
    else:
        with log.open("a") as fh:
            fh.write(f"$ {' '.join(argv)}\n")
            fh.flush()
            proc = subprocess.run(argv, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, check=False)
        output = log.read_text(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(output.splitlines()[-25:])
        where = f" (full log: {log})" if log else ""
        raise KernelBuildError(f"{' '.join(argv[:3])} ... exited {proc.returncode}{where}:\n{tail}")
    return output


def missing_host_packages() -> list[str]:
    """Return the Debian packages of HOST_PACKAGES whose marker file or command is absent."""
    return [
        pkg for pkg, marker in HOST_PACKAGES.items()
        if not (Path(marker).exists() if marker.startswith("/") else shutil.which(marker))
    ]


def install_host_packages(progress: Progress = _stderr) -> None:
    """Install missing build tools, QEMU and e2fsprogs through apt-get.

    Raises:
        KernelBuildError: something is missing and cannot be installed (no apt-get, not root
            and no password-less sudo, or apt-get failed).
    """
    missing = missing_host_packages()
    if not missing:
        return
    if not shutil.which("apt-get"):
        raise KernelBuildError(f"missing {', '.join(missing)} and no apt-get to install them")
    prefix: list[str] = []
    if os.geteuid() != 0:
        if not shutil.which("sudo"):
            raise KernelBuildError(f"missing {', '.join(missing)}; run as root or install them")
        prefix = ["sudo", "-n"]
    progress(f"installing {' '.join(missing)} with apt-get")
    env_prefix = ["env", "DEBIAN_FRONTEND=noninteractive"]
    _run([*prefix, *env_prefix, "apt-get", "update", "-q"])
    _run([*prefix, *env_prefix, "apt-get", "install", "-y", "-q", "--no-install-recommends",
          *missing])


class _PrivateApt:
    """apt-get/apt-cache pointed at a private sources list (one suite), state and cache."""

    def __init__(self, root: Path, suite: str) -> None:
        self.root, self.suite = root, suite
        (root / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (root / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        sources = root / "sources.list"
        sources.write_text(f"deb [signed-by={KEYRING}] {DEBIAN_MIRROR} {suite} main\n")
        self.options = [
            "-o", f"Dir::Etc::sourcelist={sources}",
            "-o", "Dir::Etc::sourceparts=-",
            "-o", f"Dir::State::Lists={root / 'lists'}",
            "-o", f"Dir::Cache={root / 'cache'}",
            "-o", "APT::Sandbox::User=root" if os.geteuid() == 0 else "Debug::NoLocking=1",
        ]

    def update(self) -> None:
        _run(["apt-get", *self.options, "-q", "update"])

    def candidate(self, package: str) -> str:
        out = _run(["apt-cache", *self.options, "policy", package])
        match = re.search(r"Candidate:\s*(\S+)", out)
        if not match or match.group(1) == "(none)":
            raise KernelBuildError(f"{package} not found in {self.suite}; apt-cache said:\n{out}")
        return match.group(1)

    def download(self, package: str, version: str, into: Path) -> Path:
        into.mkdir(parents=True, exist_ok=True)
        _run(["apt-get", *self.options, "-q", "download", f"{package}={version}"], cwd=into)
        debs = sorted(into.glob(f"{package}_{version.replace(':', '%3a')}_*.deb"))
        if not debs:
            raise KernelBuildError(f"apt-get download left no {package} .deb in {into}")
        return debs[0]


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on the cache so concurrent callers build only once."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cached(root: Path, fhash: str) -> list[Path]:
    """Return cached bzImages for this fragment hash, newest first."""
    found = [p for p in root.glob(f"*-{fhash}/bzImage") if p.is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _apt_dir(root: Path, suite: str) -> Path:
    """Private apt state per suite (trixie keeps the ``apt`` dir it had before kinds)."""
    return root / ("apt" if suite == KINDS[DEFAULT_KIND].suite else f"apt-{suite}")


def cached_kernel(cache_dir: Path | None = None, kind: str = DEFAULT_KIND) -> Path | None:
    """The cached bzImage of a kind for its fragments, or None if the next use must build one."""
    found = _cached(cache_dir or cache_root(), fragment_hash(*kernel_kind(kind).fragments))
    return found[0] if found else None


def _unpack(deb: Path, dest: Path, progress: Progress) -> Path:
    """Unpack the source tarball inside the .deb to ``dest`` (once); return the tree."""
    if (dest / "Makefile").is_file():
        return dest
    progress(f"unpacking {deb.name}")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    extract = 'dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2" --wildcards "./usr/src/*.tar.xz"'
    _run(["sh", "-c", extract,
          "sh", str(deb), str(tmp)])
    tarballs = list((tmp / "usr" / "src").glob("linux-source-*.tar.xz"))
    if len(tarballs) != 1:
        raise KernelBuildError(f"expected one linux-source tarball in {deb}, found {tarballs}")
    _run(["tar", "-xJf", str(tarballs[0]), "-C", str(tmp)])
    trees = [p for p in tmp.iterdir() if p.is_dir() and (p / "Makefile").is_file()]
    if len(trees) != 1:
        raise KernelBuildError(f"expected one kernel tree in {tarballs[0]}, found {trees}")
    shutil.rmtree(dest, ignore_errors=True)
    trees[0].rename(dest)
    shutil.rmtree(tmp)
    return dest


def check_config(config: Path, fragments: tuple[Path, ...] = (FRAGMENT,),
                 required: tuple[str, ...] = REQUIRED) -> list[str]:
    """Check a final .config against the fragments.

    Returns:
        Warnings for fragment options that did not survive olddefconfig.

    Raises:
        KernelBuildError: a ``required`` option is not ``=y``.
    """
    text = config.read_text()
    for name in required:
        if not re.search(rf"^{name}=y$", text, re.M):
            raise KernelBuildError(
                f"{config} lacks {name}=y after olddefconfig: a dependency of it is missing "
                f"from {', '.join(map(str, fragments))}")
    warnings = []
    # The last fragment that sets an option wins (merge_config.sh order).
    wanted = {}
    for fragment in fragments:
        for line in fragment_lines(fragment):
            wanted[line.split()[1] if line.startswith("#") else line.split("=", 1)[0]] = line
    for line in wanted.values():
        if line.startswith("#"):
            name, want = line.split()[1], "n"
        else:
            name, want = line.split("=", 1)
        got = re.search(rf"^{name}=(.*)$", text, re.M)
        value = got.group(1) if got else "n"
        if value != want:
            warnings.append(f"{name}={want} requested, got {value}")
    return warnings


def _heartbeat(log: Path, stop: threading.Event, progress: Progress, started: float) -> None:
    while not stop.wait(60):
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        last = lines[-1].strip() if lines else ""
        progress(f"building ... {time.monotonic() - started:.0f} s, at: {last}")


def _seed_objdir(objdir: Path, version: str, progress: Progress) -> None:
    """Start a new fragment's build from the newest object dir of the same source version.

    Kbuild rebuilds what the changed options touch, so a fragment tweak costs seconds, not
    a full build. Nothing to copy (a fresh machine, or after --prune): a full build.
    """
    if objdir.exists():
        return
    previous = sorted((p for p in objdir.parent.parent.glob(f"{version}-*/build")
                       if (p / ".config").is_file()), key=lambda p: p.stat().st_mtime)
    if previous:
        progress(f"seeding the build from {previous[-1]} (incremental)")
        tmp = objdir.with_name("build.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(previous[-1], tmp, symlinks=True)
        tmp.rename(objdir)


def prune(root: Path, progress: Progress = _stderr) -> None:
    """Delete sources, downloads and object dirs; keep each kernel's bzImage, config, logs."""
    for path in [root / "src", root / "downloads", root / "apt", *root.glob("apt-*"),
                 *root.glob("*/build")]:
        if path.exists():
            progress(f"pruning {path}")
            shutil.rmtree(path)


def build(src: Path, outdir: Path, version: str, progress: Progress = _stderr,
          kind: KernelKind = KINDS[DEFAULT_KIND]) -> Path:
    """Configure and build bzImage out of tree in ``outdir/build``; return the cached bzImage."""
    fragments = kind.fragments
    objdir = outdir / "build"
    outdir.mkdir(parents=True, exist_ok=True)
    _seed_objdir(objdir, version, progress)
    objdir.mkdir(parents=True, exist_ok=True)
    log = outdir / "build.log"
    log.write_text("")
    names = " + ".join(str(f) for f in fragments)
    progress(f"configuring {kind.package}: tinyconfig + {names} (log: {log})")
    _run(["make", "-C", str(src), f"O={objdir}", "tinyconfig"], log=log)
    _run([str(src / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(objdir),
          str(objdir / ".config"), *map(str, fragments)], log=log, cwd=src)
    _run(["make", "-C", str(src), f"O={objdir}", "olddefconfig"], log=log)
    for warning in check_config(objdir / ".config", fragments, kind.required):
        progress(f"warning: {warning}")
    jobs = (os.cpu_count() or 1) + 1
    progress(f"build started: make -j{jobs} bzImage (nice -n 5), about {kind.minutes} min "
             "on 2 cores")
    started = time.monotonic()
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(log, stop, progress, started), daemon=True)
    beat.start()
    try:
        _run(["nice", "-n", "5", "make", "-C", str(src), f"O={objdir}", f"-j{jobs}", "bzImage"],
             log=log)
    finally:
        stop.set()
    image = objdir / "arch/x86/boot/bzImage"
    if not image.is_file():
        raise KernelBuildError(f"make succeeded but {image} is missing (log: {log})")
    shutil.copy2(objdir / ".config", outdir / "config")
    tmp = outdir / "bzImage.tmp"
    shutil.copy2(image, tmp)
    tmp.rename(outdir / "bzImage")
    (outdir / "meta.json").write_text(json.dumps({
        "kind": kind.name, "source_package": kind.package, "version": version,
        "fragment_hash": fragment_hash(*fragments),
        "build_seconds": round(time.monotonic() - started),
    }) + "\n")
    progress(f"build done in {time.monotonic() - started:.0f} s")
    return outdir / "bzImage"


def ensure_kernel(*, kind: str = DEFAULT_KIND, cache_dir: Path | None = None,
                  refresh: bool = False, install: bool = True,
                  progress: Progress = _stderr) -> Kernel:
    """Return a guest kernel of ``kind``, building it first if the cache has none for its fragments.

    Args:
        kind: a :data:`KINDS` key (``"6.12"``, ``"7.2"``).
        cache_dir: cache root; default :func:`cache_root`.
        refresh: ask apt for the newest source version even if a cached kernel exists.
        install: install missing host packages with apt-get.
        progress: called with one human-readable line per step.

    Raises:
        KernelBuildError: unknown kind, or fetching, configuring or building failed (the
            message says why).
    """
    started = time.monotonic()
    spec = kernel_kind(kind)
    root = cache_dir or cache_root()
    fhash = fragment_hash(*spec.fragments)
    if install:
        install_host_packages(progress)
    with _locked(root):
        cached = _cached(root, fhash)
        if cached and not refresh:
            version = cached[0].parent.name.rsplit("-", 1)[0]
            return Kernel(cached[0], kind, version, fhash, False, time.monotonic() - started)
        apt = _PrivateApt(_apt_dir(root, spec.suite), spec.suite)
        progress(f"fetching package lists for {spec.suite} (private apt state in {apt.root})")
        apt.update()
        version = apt.candidate(spec.package)
        outdir = root / f"{version}-{fhash}"
        if (outdir / "bzImage").is_file():
            return Kernel(outdir / "bzImage", kind, version, fhash, False,
                          time.monotonic() - started)
        deb_dir = root / "downloads"
        debs = list(deb_dir.glob(f"{spec.package}_{version.replace(':', '%3a')}_*.deb"))
        if debs:
            deb = debs[0]
        else:
            progress(f"fetching {spec.package} {version} (about 150 MB)")
            deb = apt.download(spec.package, version, deb_dir)
        src = _unpack(deb, root / "src" / version, progress)
        image = build(src, outdir, version, progress, spec)
        return Kernel(image, kind, version, fhash, True, time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    """CLI: build or reuse guest kernels and print where they are."""
    parser = argparse.ArgumentParser(prog="python3 -m ondemand_d.guest.kernel",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", action="append", choices=[*KINDS, "all"],
                        help=f"kernel kind to build or reuse, repeatable; 'all' for every kind "
                        f"(default: {DEFAULT_KIND})")
    parser.add_argument("--cache-dir", type=Path, help="cache root (default: %(default)s)",
                        default=cache_root())
    parser.add_argument("--refresh", action="store_true",
                        help="check apt for a newer source package and build it if so")
    parser.add_argument("--no-install", action="store_true",
                        help="do not apt-get install missing build tools / qemu")
    parser.add_argument("--prune", action="store_true",
                        help="afterwards delete sources and object dirs (~2 GB per kind), "
                        "keeping the bzImages (e.g. before saving the cache dir in CI)")
    args = parser.parse_args(argv)
    kinds = args.kind or [DEFAULT_KIND]
    if "all" in kinds:
        kinds = list(KINDS)
    for kind in dict.fromkeys(kinds):
        try:
            kernel = ensure_kernel(kind=kind, cache_dir=args.cache_dir, refresh=args.refresh,
                                   install=not args.no_install)
        except KernelBuildError as exc:
            print(f"kernel: FAILED ({kind}): {exc}", file=sys.stderr)
            return 1
        what = "built" if kernel.built else "reused cached"
        print(f"kernel: {what} {KINDS[kind].package} {kernel.version} (kind {kind}, fragment "
              f"{kernel.fragment_hash}) in {kernel.seconds:.0f} s: {kernel.bzimage}")
    if args.prune:
        with _locked(args.cache_dir):
            prune(args.cache_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
