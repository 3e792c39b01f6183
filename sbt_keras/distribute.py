"""The tf.distribute strategy a run asks for, and which process of a cluster this is.

Every strategy gives the same update (see training/summed_sgd.py): per-replica summed losses,
gradients all-reduced with SUM, so the global batch of m examples is summed exactly once.

  default       one device
  mirrored      all local GPUs (one process)
  multi_worker  MultiWorkerMirroredStrategy; the cluster and this process's task come from
                the TF_CONFIG environment variable, as for every tf.distribute cluster
  tpu           TPUStrategy on the TPU named by --tpu (`local` on a TPU VM)

Importing this module does not import TensorFlow: `check_tf_config` and `task` are used by
config validation before anything heavy happens.
"""
import dataclasses
import functools
import json
import os
import re
import threading

from sbt_keras.errors import ConfigError, first_line

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
# Cluster roles a MultiWorkerMirroredStrategy trains with.
_TRAINING_ROLES = ("chief", "worker")
_HOST_PORT = re.compile(r"^\S+:[0-9]{1,5}$")


def check_tf_config(text):
    """Raises ConfigError (one line) unless `text` is a TF_CONFIG a multi-worker run can use."""
    fix = ('set TF_CONFIG to e.g. {"cluster": {"worker": ["host1:port", "host2:port"]}, '
           '"task": {"type": "worker", "index": 0}}')
    if not text:
        raise ConfigError(f"--strategy=multi_worker needs the TF_CONFIG environment variable "
                          f"(or use --strategy=mirrored on one machine); {fix}")
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({e}); {fix}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("cluster"), dict):
        raise ConfigError(f"TF_CONFIG has no \"cluster\" object; {fix}")
    cluster, task = spec["cluster"], spec.get("task")
    for role, addresses in cluster.items():
        if (not isinstance(addresses, list) or not addresses
                or not all(isinstance(a, str) and _HOST_PORT.match(a) for a in addresses)):
            raise ConfigError(f"TF_CONFIG cluster.{role} must be a non-empty list of "
                              f"\"host:port\" strings, got {addresses!r}")
    if not any(role in cluster for role in _TRAINING_ROLES):
        raise ConfigError(f"TF_CONFIG cluster has no \"worker\" or \"chief\" list; {fix}")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ConfigError(f"TF_CONFIG has no \"task\": {{\"type\": ..., \"index\": ...}} "
                          f"saying which process this is; {fix}")
    role, index = task["type"], task["index"]
    if role not in _TRAINING_ROLES or role not in cluster:
        raise ConfigError(f"TF_CONFIG task type {role!r} is not one of this cluster's "
                          f"training roles ({', '.join(r for r in cluster if r in _TRAINING_ROLES)})")
    if not isinstance(index, int) or not 0 <= index < len(cluster[role]):
        raise ConfigError(f"TF_CONFIG task index {index!r} is outside cluster.{role}'s "
                          f"{len(cluster[role])} addresses")


def task():
    """`(type, index)` of this process from TF_CONFIG; `("chief", 0)` outside a cluster."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        return "chief", 0
    spec = json.loads(text)
    t = spec.get("task") or {}
    return t.get("type", "chief"), int(t.get("index", 0))


def is_chief(strategy_name):
    """Whether this process keeps the run's records (the others write to scratch)."""
    if strategy_name != "multi_worker":
        return True
    role, index = task()
    cluster = json.loads(os.environ["TF_CONFIG"])["cluster"]
    # Without a "chief" entry, worker 0 is the chief (the tf.distribute convention).
    return role == "chief" or (role == "worker" and index == 0 and "chief" not in cluster)


def num_workers(strategy_name):
    """Processes that share the replicas: the cluster's training tasks, else 1."""
    if strategy_name != "multi_worker":
        return 1
    cluster = json.loads(os.environ["TF_CONFIG"])["cluster"]
    return sum(len(cluster.get(role, [])) for role in _TRAINING_ROLES)


def scratch_dir(output_dir):
    """Where a non-chief worker writes its copy of the records (deleted when it finishes)."""
    role, index = task()
    return f"{output_dir.rstrip('/')}/workertemp_{role}{index}"


def as_written_here(cfg):
    """`cfg` with the output_dir this process writes to: its own on the chief (and outside
    a cluster), the scratch copy on any other worker, which resumes from the chief's."""
    if is_chief(cfg.strategy):
        return cfg
    return dataclasses.replace(cfg, output_dir=scratch_dir(cfg.output_dir))


# One strategy per process: a cluster or TPU system is initialized once, and several
# collective strategies over the same devices would interfere.
@functools.lru_cache(maxsize=None)
def make_strategy(name, tpu="", tpu_timeout=120.0):
    """The strategy `name` (see the module docstring); raises ConfigError if unreachable, or
    if a TPU has not answered within `tpu_timeout` seconds."""
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        return _tpu_strategy(tf, tpu, tpu_timeout)
    # Config validation lists the valid names; reaching here is a programming error.
    raise ValueError(f"unknown strategy {name!r}")


def _connect_tpu(tf, tpu):
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return resolver


def _tpu_strategy(tf, tpu, timeout):
    # A well-formed but silent address blocks inside gRPC for minutes: connect in a daemon
    # thread and stop waiting after `timeout` seconds (the thread is left behind; the
    # process exits on the error anyway).
    outcome = {}

    def connect():
        try:
            outcome["resolver"] = _connect_tpu(tf, tpu)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = e

    thread = threading.Thread(target=connect, daemon=True, name="sbt-tpu-connect")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise ConfigError(f"--tpu={tpu}: the TPU did not answer within {timeout:g} s "
                          f"(--tpu_timeout); check that it is up and the address is right, "
                          f"or raise --tpu_timeout")
    e = outcome.get("error")
    if isinstance(e, (ValueError, OSError, ImportError, tf.errors.OpError)):
        raise ConfigError(f"--tpu={tpu}: no TPU could be reached ({first_line(e)}); on a TPU "
                          f"VM use --tpu=local, else the TPU's name or grpc://ADDRESS:8470"
                          ) from None
    if e is not None:
        raise e
    return tf.distribute.TPUStrategy(outcome["resolver"])


# keras-tuner's documented distribution contract: a chief oracle serves trials to workers
# when these variables are set (KERASTUNER_TUNER_ID "chief" marks the chief).
TUNER_ENV = ("KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID")


def has_tuner_chief():
    """Whether this process is part of a keras-tuner chief/worker sweep, which (as in
    keras-tuner) KERASTUNER_ORACLE_IP decides; ConfigError if it is set without the
    other two variables."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return False
    missing = [name for name in TUNER_ENV if name not in os.environ]
    if missing:
        raise ConfigError(f"KERASTUNER_ORACLE_IP is set but {', '.join(missing)} is not; a "
                          f"distributed sweep needs all of {', '.join(TUNER_ENV)}")
    return True


def is_tuner_chief():
    """Whether this process is the keras-tuner chief, which hands out grid points."""
    return has_tuner_chief() and "chief" in os.environ["KERASTUNER_TUNER_ID"]
