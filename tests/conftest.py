# SPDX-License-Identifier: Apache-2.0
import os
import sys
from pathlib import Path

# The tests import helpers (fakekernel) from this directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", "/tmp/ondemand-d-hypothesis")

import pytest
import structlog


@pytest.fixture(autouse=True)
def _fresh_structlog():
    """A test that configured logging (e.g. via `serve`) must not leak it into the next."""
    yield
    structlog.reset_defaults()


@pytest.fixture(autouse=True)
def _stores_stay_clean(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Every store a test opened in this process passes `fsck` when the test is done.

    Tests that damage a store on purpose say so with `@pytest.mark.damages_store`.
    """
    from ondemand_d.store.local import LocalStore

    roots: list[Path] = []
    real_init = LocalStore.__init__

    def recording_init(self: LocalStore, root: "str | os.PathLike[str]", **kw: object) -> None:
        real_init(self, root, **kw)  # type: ignore[arg-type]
        roots.append(Path(root))

    monkeypatch.setattr(LocalStore, "__init__", recording_init)
    yield
    monkeypatch.setattr(LocalStore, "__init__", real_init)
    if request.node.get_closest_marker("damages_store"):
        return
    from ondemand_d.store.fsck import fsck

    for root in dict.fromkeys(r.resolve() for r in roots):
        if not (root / "images").is_dir():
            continue  # removed by the test, or never became a store
        report = fsck(LocalStore(root, create=False))
        assert not report.problems, f"store {root} is damaged after the test: {report.problems}"


FANOTIFY_OPT_OUT = "ONDEMAND_D_FANOTIFY_TESTS"


@pytest.fixture(scope="session")
def fanotify_works() -> None:
    """Tests that need fanotify pre-content events (root, Linux 6.14+) fail where they are
    missing, naming what is missing, unless ONDEMAND_D_FANOTIFY_TESTS=skip opts out (CI
    does not): a missing requirement is never silently a pass."""
    import tempfile  # noqa: PLC0415 - only for these tests

    from ondemand_d.fanotify.probe import probe  # noqa: PLC0415

    if os.geteuid() != 0:
        missing: str | None = "fanotify pre-content groups and mount(2) need root"
    else:
        with tempfile.TemporaryDirectory() as tmp:
            found = probe(Path(tmp))
        missing = None if found.available else found.reason
    if missing is None:
        return
    if os.environ.get(FANOTIFY_OPT_OUT) == "skip":
        pytest.skip(f"{FANOTIFY_OPT_OUT}=skip: {missing}")
    pytest.fail(f"the fanotify front end cannot run here: {missing} (set {FANOTIFY_OPT_OUT}="
                "skip to opt out of these tests on such a kernel)", pytrace=False)
