"""Test set-up shared by the whole suite.

Two logical CPU devices are configured before TensorFlow initialises its devices, so the
MirroredStrategy tests can run 2 replicas on one CPU. Everything else uses the first device.
"""
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

REPO = pathlib.Path(__file__).resolve().parents[1]


def cifar10_subset_dir():
    """The shared real CIFAR-10 subset: $SBT_CIFAR10_DIR or ../shared/data/cifar10-subset."""
    path = os.environ.get("SBT_CIFAR10_DIR") or str(REPO.parent / "shared/data/cifar10-subset")
    return path if os.path.isdir(path) else None


@pytest.fixture
def cifar10_dir():
    path = cifar10_subset_dir()
    if path is None:
        pytest.skip("CIFAR-10 subset not found; set SBT_CIFAR10_DIR")
    return path


_MIRRORED = []


@pytest.fixture
def mirrored():
    """One 2-replica MirroredStrategy for the whole session.

    Several MirroredStrategy objects over the same devices in one process reuse collective
    instance keys and abort each other's all-reduces, so every test shares this one.
    """
    if not _MIRRORED:
        _MIRRORED.append(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    return _MIRRORED[0]


# ---------------------------------------------------------------------- fault table
# Tests marked `fault("what was injected")` or `bad_input("what was tried")` are recorded
# with their outcome in FAULT_LOG (merged over runs, by test id); tools/fault_table.py
# renders it as the README's reliability table. A marker's text may name the test's
# parameters, e.g. "--output_dir {case}".
FAULT_LOG = pathlib.Path(os.environ.get("SBT_FAULT_LOG") or REPO / ".faults" / "log.json")
FAULT_MARKERS = ("fault", "bad_input")
_fault_outcomes = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    marks = [m for name in FAULT_MARKERS for m in item.iter_markers(name)]
    if not marks or (report.when != "call" and report.passed):
        return
    params = getattr(getattr(item, "callspec", None), "params", {})
    for mark in marks:
        try:
            what = mark.args[0].format(**params)
        except (KeyError, IndexError, ValueError):
            what = mark.args[0]
        _fault_outcomes[item.nodeid] = {
            "kind": mark.name, "what": what, "test": item.nodeid.split("[")[0],
            "outcome": report.outcome if report.when == "call" else
            ("skipped" if report.skipped else "failed"),
            "seconds": round(report.duration, 2)}


def pytest_sessionfinish(session):
    if not _fault_outcomes:
        return
    import fcntl
    import json
    FAULT_LOG.parent.mkdir(parents=True, exist_ok=True)
    # `make test` runs pytest-xdist workers, each merging its own outcomes: one at a time.
    with open(FAULT_LOG.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            log = json.loads(FAULT_LOG.read_text()) if FAULT_LOG.exists() else {}
        except ValueError:
            log = {}
        log.update(_fault_outcomes)
        tmp = FAULT_LOG.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(log, indent=1, sort_keys=True))
        tmp.replace(FAULT_LOG)


# ---------------------------------------------------------------------- SIGTERM hygiene
@pytest.fixture(autouse=True)
def _no_sigterm_left_over():
    """Fails the test that leaves an in-process SIGTERM un-acted on: the next in-process
    run would otherwise stop as `preempted` and be blamed for it."""
    from sbt_keras import termination

    yield
    if termination.received():
        termination.acted_on()
        pytest.fail("this test left a SIGTERM that nothing acted on (termination.received())")
