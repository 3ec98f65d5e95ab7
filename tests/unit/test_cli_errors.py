# SPDX-License-Identifier: Apache-2.0
"""Every bad input of issue 8 (and its kind) through the real command line.

Each case runs `ondemand-d` as a person would (a child process) and checks: the README's exit
code, exactly one line on stderr in the one error style, no traceback, and the store byte for
byte as it was (every path, type, mode and content under it hashed before and after).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ondemand_d.device import check_cache_dir
from ondemand_d.errors import CacheDirError
from ondemand_d.guest.runner import ondemand_d_argv
from ondemand_d.image import format as fmt
from ondemand_d.importer import SB_OFFSET

SLOT = 9 * 128  # mkfs.erofs puts the device table at devt_slotoff 9


def run_cli(*argv: str | Path, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "HOME": str(cwd or "/tmp")}
    return subprocess.run([*ondemand_d_argv(), *map(str, argv)], capture_output=True,
                          text=True, env={**base, **(env or {})}, timeout=120, check=False)


def tree_state(root: Path) -> dict[str, str] | None:
    """Every path under root with its type, mode and (for files) content hash."""
    if not root.exists() and not root.is_symlink():
        return None
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(dirpath, name)
            st = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
            out[str(path.relative_to(root))] = f"{st.st_mode:o} {digest}"
    return out


@dataclass
class Inputs:
    """Files the cases use: a store with two images, mkfs images (good and damaged), tars."""

    dir: Path
    store: Path
    meta: Path
    blob: Path
    plain: Path


def _mkfs(dst: Path, src: Path, *extra: str) -> None:
    subprocess.run(["mkfs.erofs", "--quiet", "--chunksize=65536", *extra, str(dst), str(src)],
                   check=True, capture_output=True)


def _patched(src: Path, dst: Path, offset: int, data: bytes) -> Path:
    """A copy of an image with bytes replaced in block 0 and its checksum made valid again."""
    raw = bytearray(src.read_bytes())
    raw[offset:offset + len(data)] = data
    block0 = bytearray(raw[:fmt.BLOCK])
    block0[SB_OFFSET + 4:SB_OFFSET + 8] = bytes(4)
    raw[SB_OFFSET + 4:SB_OFFSET + 8] = fmt.sb_checksum(bytes(block0)).to_bytes(4, "little")
    dst.write_bytes(raw)
    return dst


def _tar(path: Path, name: str, *, pax: dict[str, str], data: bytes = b"x\n") -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.pax_headers = pax
        tar.addfile(info, io.BytesIO(data))
    return path


def _oci(root: Path, index: object) -> Path:
    root.mkdir()
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    d = tmp_path_factory.mktemp("cli-errors")
    src = d / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a").write_bytes(os.urandom(300_000))
    (src / "sub" / "b").write_text("b\n")
    meta, blob, plain = d / "meta.img", d / "blob.img", d / "plain.img"
    _mkfs(meta, src, f"--blobdev={blob}")
    _mkfs(plain, src)
    store = d / "store"
    for argv in (["import", meta, "--name", "app", "--blob", f"{blob}=appdata"],
                 ["build", src, "--name", "built"]):
        done = run_cli("--store", store, *argv)
        assert done.returncode == 0, done.stderr
    return Inputs(d, store, meta, blob, plain)


@dataclass(frozen=True)
class Case:
    """argv (from Inputs), the exit code, a fragment the message must have, and one it must not."""

    argv: Callable[[Inputs], list[str | Path]]
    code: int
    says: str
    never: str = "Traceback"
    env: Callable[[Inputs], dict[str, str]] | None = None


def _file(name: str, data: bytes) -> Callable[[Inputs], Path]:
    def make(i: Inputs) -> Path:
        path = i.dir / name
        path.write_bytes(data)
        return path
    return make


def _random_blob(i: Inputs) -> Path:
    return _file("random8k.img", os.urandom(8192))(i)


def _truncated(i: Inputs) -> Path:
    return _file("truncated.img", i.plain.read_bytes()[:20_000])(i)


def _short(i: Inputs) -> Path:
    return _file("short.img", i.plain.read_bytes()[:1000])(i)


def _slot_blocks(i: Inputs) -> Path:
    """The blobdev image with its slot's block count set (as newer mkfs.erofs writes it)."""
    blocks = -(-i.blob.stat().st_size // fmt.BLOCK)
    return _patched(i.meta, i.dir / "slotblocks.img", SLOT + 64, blocks.to_bytes(4, "little"))


def _bad_tag(i: Inputs) -> Path:
    return _patched(i.meta, i.dir / "badtag.img", SLOT, b"\xff\xfebad")


def _store_file(i: Inputs) -> Path:
    return _file("store-is-a-file", b"not a store\n")(i)


def _nan_tar(i: Inputs) -> Path:
    return _tar(i.dir / "nan.tar", "etc/nan", pax={"mtime": "nan"})


def _big_xattr_tar(i: Inputs) -> Path:
    return _tar(i.dir / "bigx.tar", "etc/bigx", pax={"SCHILY.xattr.user.big": "v" * 70_000})


def _long_xattr_name_tar(i: Inputs) -> Path:
    return _tar(i.dir / "longx.tar", "etc/longx", pax={"SCHILY.xattr.user." + "n" * 300: "v"})


def _oci_manifests_string(i: Inputs) -> Path:
    return _oci(i.dir / "oci-str", {"schemaVersion": 2, "manifests": "everything"})


def _oci_manifest_entry_int(i: Inputs) -> Path:
    return _oci(i.dir / "oci-int", {"schemaVersion": 2, "manifests": [7]})


def _oci_platform_string(i: Inputs) -> Path:
    entry = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "platform": "linux",
             "digest": "sha256:" + "0" * 64, "size": 2}
    return _oci(i.dir / "oci-plat", {"schemaVersion": 2, "manifests": [entry, entry]})


def _bad_config(i: Inputs) -> Path:
    return _file("bad.toml", b"concurency = 3\n")(i)


CASES: dict[str, Case] = {
    # import: the image and its blobs
    "import-missing-blob": Case(lambda i: ["import", i.meta, "--name", "x", "--blob",
                                           "/nonexistent.blob"], 1, "no such file"),
    "import-blob-is-directory": Case(lambda i: ["import", i.meta, "--name", "x", "--blob",
                                                i.dir], 1, "is a directory"),
    "import-blob-too-short": Case(lambda i: ["import", i.meta, "--name", "x", "--blob",
                                             _random_blob(i)], 1, "reads device 1 up to byte"),
    "import-blob-not-its-slot": Case(lambda i: ["import", _slot_blocks(i), "--name", "x",
                                                "--blob", i.plain], 1, "blocks but device 1"),
    "import-truncated-image": Case(lambda i: ["import", _truncated(i), "--name", "x"], 1,
                                   "is truncated"),
    "import-image-shorter-than-superblock": Case(lambda i: ["import", _short(i), "--name", "x"],
                                                 1, "too short"),
    "import-image-is-directory": Case(lambda i: ["import", i.dir, "--name", "x"], 1,
                                      "is a directory"),
    "import-image-missing": Case(lambda i: ["import", i.dir / "nope.img", "--name", "x"], 1,
                                 "no such file"),
    "import-tag-not-utf8": Case(lambda i: ["import", _bad_tag(i), "--name", "x", "--blob",
                                           i.blob], 1, "not UTF-8"),
    "import-name-taken": Case(lambda i: ["import", i.plain, "--name", "app"], 1, "exists"),
    "import-bad-name": Case(lambda i: ["import", i.plain, "--name", "../x"], 1, "name"),
    "import-chunk-size-64G": Case(lambda i: ["import", i.plain, "--name", "x",
                                             "--chunk-size", "64G"], 2, "--chunk-size"),
    "import-chunk-size-unaligned": Case(lambda i: ["import", i.plain, "--name", "x",
                                                   "--chunk-size", "5000"], 2, "multiple of 4K"),
    "import-no-name": Case(lambda i: ["import", i.plain], 2, "--name"),
    # build: sizes and untrusted sources
    "build-chunk-size-64G": Case(lambda i: ["build", i.dir / "src", "--name", "x",
                                            "--chunk-size", "64G"], 2, "--chunk-size"),
    "build-missing-source": Case(lambda i: ["build", i.dir / "nope", "--name", "x"], 1, "nope"),
    "build-nan-mtime": Case(lambda i: ["build", _nan_tar(i), "--name", "x"], 1, "etc/nan"),
    "build-xattr-value-too-long": Case(lambda i: ["build", _big_xattr_tar(i), "--name", "x"], 1,
                                       "user.big of /etc/bigx"),
    "build-xattr-name-too-long": Case(lambda i: ["build", _long_xattr_name_tar(i), "--name",
                                                 "x"], 1, "/etc/longx"),
    "build-oci-manifests-not-a-list": Case(lambda i: ["build", _oci_manifests_string(i),
                                                      "--name", "x"], 1, "'manifests'"),
    "build-oci-manifest-entry-not-an-object": Case(lambda i: ["build", _oci_manifest_entry_int(i),
                                                              "--name", "x"], 1, "entry 0"),
    "build-oci-platform-not-an-object": Case(lambda i: ["build", _oci_platform_string(i),
                                                        "--name", "x"], 1, "'platform'"),
    # the store setting
    "ls-store-is-a-file": Case(lambda i: ["--store", _store_file(i), "ls"], 3, "is a file"),
    "import-store-is-a-file": Case(lambda i: ["--store", _store_file(i), "import", i.plain,
                                              "--name", "x"], 3, "is a file"),
    "build-store-is-a-file": Case(lambda i: ["build", i.dir / "src", "--name", "x", "--store",
                                             _store_file(i)], 3, "is a file"),
    "serve-store-is-a-file": Case(lambda i: ["serve", "--store", _store_file(i)], 3,
                                  "is a file"),
    "push-no-store": Case(lambda i: ["--store", i.dir / "typo", "push", "app",
                                     "127.0.0.1:1/x:y"], 3, "there is no store"),
    # configuration and usage
    "serve-concurrency-0": Case(lambda i: ["serve", "--concurrency", "0"], 2, "--concurrency"),
    "serve-readahead-5X": Case(lambda i: ["serve", "--readahead", "5X"], 2, "--readahead"),
    "serve-concurrency-0-in-environment": Case(lambda i: ["serve"], 3, "ONDEMAND_D_CONCURRENCY",
                                               env=lambda i: {"ONDEMAND_D_CONCURRENCY": "0"}),
    "ls-bad-config-file": Case(lambda i: ["--config", _bad_config(i), "ls"], 3,
                               "unknown key 'concurency'"),
    "ls-missing-config-file": Case(lambda i: ["--config", i.dir / "none.toml", "ls"], 3,
                                   "cannot read the config file"),
    "unknown-command": Case(lambda i: ["frobnicate"], 2, "invalid choice"),
    "unknown-option": Case(lambda i: ["ls", "--colour"], 2, "--colour"),
    # the device
    "serve-device-dev-null": Case(lambda i: ["serve", "--device", "/dev/null", "--cache-dir",
                                             i.dir / "cache"], 4, "cannot be polled"),
    "serve-device-missing": Case(lambda i: ["serve", "--device", i.dir / "nodev",
                                            "--cache-dir", i.dir / "cache"], 4,
                                 "CONFIG_CACHEFILES_ONDEMAND=y"),
    # registries: credentials never echoed
    "add-credentials-in-reference": Case(lambda i: ["add", "user:s3cret@127.0.0.1:1/x:y"], 2,
                                         "credentials", never="s3cret"),
    "push-credentials-in-reference": Case(lambda i: ["push", "app",
                                                     "https://user:s3cret@example.com/x"], 2,
                                          "credentials", never="s3cret"),
    "add-malformed-reference": Case(lambda i: ["add", "no-registry-here"], 2,
                                    "expected REGISTRY/REPO:TAG"),
}


def _command(argv: list[str]) -> str:
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in ("--store", "--config", "--log-level"):
            skip = True
        elif not word.startswith("-"):
            return word
    return ""


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_sentence_an_exit_code_and_no_change(inputs: Inputs, name: str) -> None:
    case = CASES[name]
    argv = [str(a) for a in case.argv(inputs)]
    if "--store" not in argv:
        argv = ["--store", str(inputs.store), *argv]
    store = Path(argv[argv.index("--store") + 1])
    before = tree_state(store)
    done = run_cli(*argv, env=case.env(inputs) if case.env else None, cwd=inputs.dir)
    lines = done.stderr.splitlines()
    assert done.returncode == case.code, (done.returncode, done.stderr)
    assert len(lines) == 1, done.stderr
    command = _command(argv)
    prefix = f"ondemand-d {command}: error: " if command in (
        "import", "build", "ls", "serve", "push", "add") else "ondemand-d: error: "
    assert lines[0].startswith(prefix), lines[0]
    assert case.says in lines[0], lines[0]
    assert case.never not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    assert tree_state(store) == before


def test_ls_on_a_typo_does_not_create_a_store(inputs: Inputs) -> None:
    typo = inputs.dir / "stroe"
    done = run_cli("ls", "--store", typo)
    assert done.returncode == 3 and "there is no store at" in done.stderr
    assert not typo.exists()


def test_import_into_a_missing_store_with_bad_input_creates_nothing(inputs: Inputs) -> None:
    fresh = inputs.dir / "fresh-store"
    done = run_cli("--store", fresh, "import", inputs.meta, "--name", "x", "--blob",
                   "/nonexistent.blob")
    assert done.returncode == 1
    assert not fresh.exists()


def test_serve_that_fails_to_start_creates_no_store(inputs: Inputs) -> None:
    """serve creates a missing store only once the device is bound (a fresh StateDirectory)."""
    fresh = inputs.dir / "serve-store"
    done = run_cli("--store", fresh, "serve", "--device", "/dev/null")
    assert done.returncode == 4 and done.stderr.count("\n") == 1
    assert not fresh.exists()


@pytest.fixture
def read_only_store(inputs: Inputs) -> Iterator[Path]:
    """A copy of the store on a read-only bind mount (the host's root runs the tests)."""
    copy = inputs.dir / "ro-store"
    subprocess.run(["cp", "-a", str(inputs.store), str(copy)], check=True)
    subprocess.run(["mount", "--bind", str(copy), str(copy)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(copy)], check=True)
        yield copy
    finally:
        subprocess.run(["umount", str(copy)], check=True)


def test_read_only_store(inputs: Inputs, read_only_store: Path) -> None:
    """Writers say the store is on a read-only filesystem (3); ls still lists it."""
    before = tree_state(read_only_store)
    for argv in (["import", inputs.plain, "--name", "x"],
                 ["build", inputs.dir / "src", "--name", "x"]):
        done = run_cli("--store", read_only_store, *argv)
        assert done.returncode == 3, done.stderr
        assert done.stderr.count("\n") == 1 and "read-only filesystem" in done.stderr
    listing = run_cli("ls", "--store", read_only_store)
    assert listing.returncode == 0 and "2 image(s)" in listing.stdout
    assert tree_state(read_only_store) == before


def test_import_with_a_key_for_a_non_utf8_tag(inputs: Inputs, tmp_path: Path) -> None:
    """The non-UTF-8 tag is refused only when no KEY names the device instead."""
    image = _bad_tag(inputs)
    done = run_cli("--store", tmp_path / "s", "import", image, "--name", "x", "--blob",
                   f"{inputs.blob}=data-x")
    assert done.returncode == 0, done.stderr
    assert "device=data-x" in done.stdout


def test_out_of_range_mtimes_are_clamped_with_a_warning(tmp_path: Path) -> None:
    """Before 1970 and past 2^64 s are clamped (EROFS keeps u64 seconds); the entry is named."""
    old = _tar(tmp_path / "old.tar", "etc/old", pax={"mtime": "-86400.5"})
    future = _tar(tmp_path / "future.tar", "etc/future", pax={"mtime": "1e30"})
    done = run_cli("--store", tmp_path / "s", "build", old, future, "--name", "t")
    assert done.returncode == 0, done.stderr
    warnings = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    clamped = {w["entry"]: w["to_ns"] for w in warnings if w.get("event") == "mtime_clamped"}
    assert clamped == {"/etc/old": 0, "/etc/future": (2**64 - 1) * 10**9 + 999_999_999}


def test_cache_dir_on_tmpfs_is_a_configuration_error(tmp_path: Path) -> None:
    """The cache directory is a setting: on tmpfs it is exit 3, as the README says."""
    shm = Path("/dev/shm")
    assert os.statvfs(shm)
    with pytest.raises(CacheDirError, match="tmpfs") as info:
        check_cache_dir(shm / f"ondemand-d-test-{os.getpid()}")
    assert info.value.exit_code == 3
    (shm / f"ondemand-d-test-{os.getpid()}").rmdir()


def test_global_options_after_the_command(inputs: Inputs) -> None:
    """--store and --log-level work after the command as before it."""
    after = run_cli("ls", "--store", inputs.store, "--log-level", "error")
    before = run_cli("--store", inputs.store, "--log-level", "error", "ls")
    assert after.returncode == before.returncode == 0
    assert after.stdout == before.stdout and "app" in after.stdout


def test_readme_exit_code_table_is_the_one_tested() -> None:
    """The README's table lists the codes the errors carry, and nothing else."""
    from ondemand_d import errors

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = [line for line in readme.splitlines() if line.startswith("| ") and "|---" not in line]
    codes = {int(line.split("|")[1]) for line in table if line.split("|")[1].strip().isdigit()}
    assert codes == {errors.EXIT_OK, errors.EXIT_FAILED, errors.EXIT_USAGE, errors.EXIT_CONFIG,
                     errors.EXIT_DEVICE, errors.EXIT_INTERRUPTED}
    assert {c.code for c in CASES.values()} == {1, 2, 3, 4}
    assert (errors.OndemandError.exit_code, errors.UsageError.exit_code,
            errors.ConfigError.exit_code, errors.DeviceError.exit_code) == (1, 2, 3, 4)


def test_directory_mtime_before_1970_is_clamped_with_a_warning(tmp_path: Path) -> None:
    """A directory source's pre-1970 mtime takes the same path as a tarball's: clamped, named."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "old").write_bytes(b"old\n")
    os.utime(src / "old", ns=(-5 * 10**9, -5 * 10**9))
    done = run_cli("--store", tmp_path / "s", "build", src, "--name", "d")
    assert done.returncode == 0, done.stderr
    warnings = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert [(w["event"], w["entry"], w["to_ns"]) for w in warnings] == \
        [("mtime_clamped", "/old", 0)]
