"""Flags -> Config, and every rejected input from the core issue, each with its message."""
import os
import pathlib
import subprocess
import sys

import pytest
from absl import flags

from sbt_keras import config as config_lib
from sbt_keras import flags as run_flags
from sbt_keras.config import Config
from sbt_keras.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
SYNTH = ["--dataset=synthetic", "--model=resnet8"]


def parse(argv):
    fv = flags.FlagValues()
    run_flags.define_flags(fv)
    run_flags.define_sweep_flags(fv)
    fv(["prog"] + argv)
    return run_flags.config_from_flags(fv)


def test_flags_map_onto_config_and_resolve():
    cfg = parse(SYNTH + ["--batch_size=8", "--log2_base_lr=-7", "--epochs=10"]).resolve()
    assert cfg.base_lr == 2.0 ** -7 and cfg.log2_base_lr == -7
    assert cfg.bn_batch_size == 0  # default: the whole per-replica batch ...
    assert cfg.check_replicas(1) == 8 and cfg.check_replicas(2) == 4  # ... once known
    assert cfg.weight_decay == 1e-4  # ResNet default
    assert parse(["--model=alexnet_reduced", "--dataset=synthetic", "--base_lr=0.01"]
                 ).resolve().weight_decay == 5e-4
    assert parse(SYNTH + ["--base_lr=0.0078125"]).resolve().log2_base_lr == -7


def test_config_round_trips_through_dict():
    cfg = parse(SYNTH + ["--base_lr=0.5", "--lr_decay_epochs=3,6"]).resolve()
    assert Config.from_dict(cfg.to_dict()) == cfg




BAD = [
    # (argv, words the one-line message must contain)
    (["--batch_size=12", "--bn_batch_size=8", "--base_lr=0.1"], ["--bn_batch_size=8"]),
    (["--base_lr=0"], ["--base_lr"]),
    (["--base_lr=0.1", "--keep_checkpoint_every_epochs=-1"],
     ["--keep_checkpoint_every_epochs=-1 must be >= 0"]),
    (["--base_lr=-0.5"], ["--base_lr"]),
    (["--base_lr=0.1", "--log2_base_lr=-3"], ["--base_lr", "--log2_base_lr"]),
    ([], ["--base_lr", "--log2_base_lr"]),
    (["--base_lr=0.1", "--epochs=3"], ["--epochs=3", "--median_of"]),
    (["--base_lr=0.1", "--batch_size=0"], ["--batch_size"]),
    (["--base_lr=0.1", "--batch_size=4096"], ["--batch_size=4096"]),
    (["--base_lr=0.1", "--norm=none", "--bn_batch_size=2"], ["--bn_batch_size"]),
    (["--base_lr=0.1", "--lr_decay_fractions=0.75,0.5"], ["--lr_decay_fractions"]),
    (["--base_lr=0.1", "--lr_decay_fractions=0.5,x"], ["--lr_decay_fractions"]),
    (["--base_lr=0.1", "--lr_decay_epochs=90", "--epochs=82"], ["--lr_decay_epochs"]),
    (["--base_lr=0.1", "--warmup", "--warmup_fraction=1.5"], ["--warmup_fraction"]),
    (["--base_lr=0.1", "--bn_momentum=1"], ["--bn_momentum"]),
    (["--base_lr=0.1", "--output_dir="], ["--output_dir"]),
]


@pytest.mark.bad_input("an impossible flag combination (divisibility, ranges, learning-rate forms)")
@pytest.mark.parametrize("argv,words", BAD)
def test_bad_flag_combinations_are_rejected(argv, words):
    with pytest.raises(ConfigError) as info:
        parse(SYNTH + argv).resolve()
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


@pytest.mark.bad_input("an unknown model, norm, dataset or strategy")
@pytest.mark.parametrize("field,value", [("model", "vgg"), ("norm", "weird"),
                                         ("dataset", "mnist"), ("strategy", "tpu9")])
def test_unknown_names_list_the_valid_ones(field, value):
    cfg = Config(**{"dataset": "synthetic", "base_lr": 0.1, field: value})
    with pytest.raises(ConfigError, match=f"--{field}={value}.*choose one of"):
        cfg.resolve()


def test_steps_per_execution_auto_and_checks():
    # 1024 synthetic examples / m=8 = 128 steps per epoch.
    base = dict(dataset="synthetic", base_lr=0.1, batch_size=8)
    assert Config(**base).resolve().steps_per_execution == 32
    assert Config(**base, checkpoint_every_steps=12).resolve().steps_per_execution == 4
    # 1024 // 24 = 42 steps per epoch: divisors 1, 2, 3, 6, 7, 14, 21 (, 42 > 32).
    assert Config(**{**base, "batch_size": 24}).resolve().steps_per_execution == 21
    assert Config(**base, steps_per_execution=16).resolve().steps_per_execution == 16
    # Unrolling: the largest divisor of the block up to the request.
    assert Config(**base).resolve().unrolled_steps == 1  # default: none
    assert Config(**base, unrolled_steps=4).resolve().unrolled_steps == 4
    assert Config(**{**base, "batch_size": 24}, unrolled_steps=4).resolve().unrolled_steps == 3
    assert Config(**base, steps_per_execution=2, unrolled_steps=4).resolve().unrolled_steps == 2
    with pytest.raises(ConfigError, match="--steps_per_execution=5 does not divide the 128"):
        Config(**base, steps_per_execution=5).resolve()
    with pytest.raises(ConfigError, match="does not divide --checkpoint_every_steps=12"):
        Config(**base, steps_per_execution=8, checkpoint_every_steps=12).resolve()


def test_replica_divisibility():
    cfg = Config(dataset="synthetic", base_lr=0.1, batch_size=8, bn_batch_size=4).resolve()
    assert cfg.check_replicas(2) == 4  # per-replica 4, divisible by 4
    with pytest.raises(ConfigError, match="not divisible by the 3 replicas"):
        cfg.check_replicas(3)
    with pytest.raises(ConfigError, match="--bn_batch_size=4 does not divide the per-replica"):
        cfg.check_replicas(4)
    with pytest.raises(ConfigError, match="--eval_batch_size=500 is not divisible by the 8 "):
        Config(dataset="synthetic", base_lr=0.1, batch_size=8, eval_batch_size=500
               ).resolve().check_replicas(8)


def test_manual_dir_is_for_imagenet_only():
    with pytest.raises(ConfigError, match="--manual_dir only applies to --dataset=imagenet2012"):
        Config(dataset="synthetic", base_lr=0.1, manual_dir="/tars").resolve()


@pytest.mark.bad_input("a missing, empty or misused --cifar_dir")
def test_cifar_dir_problems_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="--cifar_dir"):
        Config(base_lr=0.1, cifar_dir=str(tmp_path / "nowhere")).resolve()
    with pytest.raises(ConfigError, match="--cifar_dir"):
        Config(base_lr=0.1, cifar_dir=str(tmp_path)).resolve()  # empty: files missing
    with pytest.raises(ConfigError, match="--cifar_dir"):
        Config(base_lr=0.1, dataset="synthetic", cifar_dir=str(tmp_path)).resolve()


@pytest.mark.bad_input("a --cifar_dir file with a truncated record")
def test_cifar_dir_truncated_record(tmp_path, cifar10_dir):
    src = pathlib.Path(cifar10_dir) / "cifar-10-batches-bin"
    dst = tmp_path / "cifar-10-batches-bin"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    blob = (dst / "data_batch_3.bin").read_bytes()
    (dst / "data_batch_3.bin").write_bytes(blob[:-100])
    with pytest.raises(ConfigError, match="data_batch_3.bin"):
        Config(base_lr=0.1, cifar_dir=str(tmp_path)).resolve()


def _cli(args, env_extra=None, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "sbt_keras.run"] + args, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, **kwargs)


@pytest.mark.bad_input("a bad combination on the command line (one line, exit 2, before TensorFlow)")
def test_cli_bad_input_exits_2_with_one_line_before_tensorflow_loads(tmp_path):
    # A `tensorflow` package that explodes on import proves validation never needs it.
    poison = tmp_path / "poison" / "tensorflow"
    poison.mkdir(parents=True)
    (poison / "__init__.py").write_text("raise ImportError('tensorflow was imported')\n")
    env = {"PYTHONPATH": f"{tmp_path / 'poison'}{os.pathsep}{REPO}"}
    proc = _cli(SYNTH + ["--batch_size=12", "--bn_batch_size=8", "--base_lr=0.1",
                         f"--output_dir={tmp_path / 'out'}"], env_extra=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --batch_size=12"), proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.bad_input("--sweep_workers=0")
def test_cli_sweep_workers_must_be_positive():
    proc = _cli(SYNTH + ["--base_lr=0.1", "--grid_batch_size=4", "--sweep_workers=0"])
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --sweep_workers=0 must be >= 1"


@pytest.mark.bad_input("an unknown flag, or a value outside a flag's choices (command line)")
@pytest.mark.parametrize("bad, named", [
    ("--model=vgg", "--model=vgg"),
    ("--norm=weird", "--norm=weird"),
    ("--dataset=mnist", "--dataset=mnist"),
    ("--no_such_flag=3", "no_such_flag"),
])
def test_cli_bad_flag_is_one_line_exit_2(bad, named):
    proc = _cli([bad, "--base_lr=0.1"])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], proc.stderr


def parse_typed(argv):
    """`parse`, telling config_from_flags which arguments were typed (not from a flagfile)."""
    fv = flags.FlagValues()
    run_flags.define_flags(fv)
    run_flags.define_sweep_flags(fv)
    fv(["prog"] + argv)
    return run_flags.config_from_flags(fv, ["prog"] + argv)


def test_typed_learning_rate_overrides_the_other_form_from_a_flagfile(tmp_path):
    flagfile = tmp_path / "lr.flags"
    flagfile.write_text("--dataset=synthetic\n--model=resnet8\n--log2_base_lr=-7\n")
    cfg = parse_typed([f"--flagfile={flagfile}", "--base_lr=0.25"]).resolve()
    assert cfg.base_lr == 0.25 and cfg.log2_base_lr == -2
    flagfile.write_text("--dataset=synthetic\n--model=resnet8\n--base_lr=0.5\n")
    cfg = parse_typed([f"--flagfile={flagfile}", "--log2_base_lr=-3"]).resolve()
    assert cfg.base_lr == 0.125
    # Both typed, or both from flagfiles, stay ambiguous.
    with pytest.raises(ConfigError, match="both given"):
        parse_typed(SYNTH + ["--base_lr=0.5", "--log2_base_lr=-3"]).resolve()
    flagfile.write_text("--dataset=synthetic\n--model=resnet8\n--base_lr=0.5\n"
                        "--log2_base_lr=-3\n")
    with pytest.raises(ConfigError, match="both given"):
        parse_typed([f"--flagfile={flagfile}"]).resolve()


def test_shipped_single_run_flagfiles_take_either_learning_rate_form():
    for name in ("cifar10", "cifar100"):
        path = REPO / "experiments" / f"{name}.flags"
        cwd = os.getcwd()
        os.chdir(REPO)  # nested flagfiles are relative to the repository root
        try:
            cfg = parse_typed([f"--flagfile={path}", "--base_lr=0.0078125"]).resolve()
        finally:
            os.chdir(cwd)
        assert cfg.log2_base_lr == -7 and cfg.model == "resnet32" and cfg.augment


def test_every_experiment_flagfile_parses_and_resolves(tmp_path):
    files = sorted((REPO / "experiments").glob("*.flags"))
    assert len(files) >= 10
    for path in files:
        # Flagfiles carry no learning rate when the figure sweeps it.
        cfg = parse([f"--flagfile={path}", "--log2_base_lr=-7", "--dataset=synthetic",
                     "--synthetic_train=8192"])  # above every --train_examples
        cfg.resolve()


@pytest.mark.bad_input("an out-of-range setting")
@pytest.mark.parametrize("argv", [
    ["--base_lr=0.1", "--divergence_factor=0.5"],
    ["--base_lr=0.1", "--checkpoint_every_steps=-1"],
    ["--base_lr=0.1", "--weight_decay=-1"],
    ["--base_lr=0.1", "--lr_decay_factor=0"],
    ["--base_lr=0.1", "--unrolled_steps=0"],
    ["--base_lr=0.1", "--tpu_timeout=0"],
    ["--base_lr=0.1", "--sweep_failure_limit=-1"],
])
def test_more_ranges(argv):
    flag = argv[1].split("=")[0]
    with pytest.raises(ConfigError, match=flag):
        parse(SYNTH + argv).resolve()


@pytest.mark.bad_input("a flagfile with an unknown flag; a missing flagfile")
def test_flagfile_errors(tmp_path):
    bad = tmp_path / "bad.flags"
    bad.write_text("--model=resnet8\n--no_such_flag=3\n")
    with pytest.raises(flags.Error, match="no_such_flag"):
        parse([f"--flagfile={bad}"])
    with pytest.raises(flags.Error):
        parse([f"--flagfile={tmp_path / 'missing.flags'}"])


def test_every_flag_comes_from_one_config_declaration():
    import dataclasses
    fv = flags.FlagValues()
    run_flags.define_flags(fv)
    fields = {f.name: f for f in dataclasses.fields(Config)}
    assert set(fv) == set(fields)  # one flag per setting, nothing else
    for name, field in fields.items():
        default = fv[name].default
        expected = list(map(str, field.default)) if isinstance(field.default, tuple) \
            else field.default
        assert default == expected, name
        assert fv[name].help.endswith(field.metadata["help"])  # enums prefix their choices
        in_group = fv.get_flags_for_module(
            run_flags.HELP_MODULE.format(field.metadata["group"]))
        assert name in {f.name for f in in_group}


def test_execution_and_hparam_sets_follow_the_declarations():
    # The settings a run directory may be resumed with other values of: how it executes,
    # never what it computes.
    assert config_lib.EXECUTION_FIELDS == {
        "output_dir", "steps_per_execution", "unrolled_steps", "jit_compile",
        "eval_batch_size", "histogram_freq", "download", "data_dir", "manual_dir",
        "cifar_dir", "strategy", "tpu", "deterministic", "checkpoint_every_steps",
        "keep_checkpoint_every_epochs", "tpu_timeout", "sweep_failure_limit",
        "pack_formulation"}
    cfg = parse(SYNTH + ["--batch_size=8", "--log2_base_lr=-7"]).resolve()
    shown = config_lib.hparams_of(cfg, bn_batch_size=4)
    assert set(shown) == config_lib.HPARAM_FIELDS | {"bn_batch_size"}
    assert shown["bn_batch_size"] == 4 and shown["log2_base_lr"] == -7
    assert {"model", "norm", "batch_size", "base_lr", "seed"} <= set(shown)


def test_helpfull_lists_the_flags_by_group():
    proc = subprocess.run([sys.executable, "-m", "sbt_keras.run", "--helpfull"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    text = proc.stdout
    for group in config_lib.GROUPS + ("sweep",):
        assert run_flags.HELP_MODULE.format(group) + ":" in text, group
    assert "--gn_groups" in text and "--grid_norm" in text
