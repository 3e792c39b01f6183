"""`--dry_run`: what a command would train, and what it would cost, without training.

One run: every resolved setting (as config.yaml would record it), its sizes and steps, what
its --output_dir holds, and the estimated time. A sweep: every grid point, valid or
skipped and why, finished or not, its steps and estimated time, and the totals. Estimates
are steps × the documented step time of the model at m (cost.DOCUMENTED_STEP_MS, measured on
this project's 2-core CPU) plus one test-set evaluation per epoch; a model without a
documented step time is costed in steps only. No TensorFlow is imported (except to check
ImageNet's files, as the real run does before anything else).
"""
import os

import yaml

from sbt_keras import cost, grid as grid_lib, results
from sbt_keras.training import resume

NOTHING = "nothing is trained"


def plan(base, grid):
    """The dry run's text for a resolved single-run Config, or a sweep's base and Grid."""
    return _sweep(base, grid) if grid else _run(base)


def _run(cfg):
    info = cfg.data_info()
    per_epoch, total = cost.run_steps(cfg, info)
    step = cost.StepTimes(cfg.model).seconds(cfg.norm, cfg.batch_size)
    settings = yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False)
    lines = [f"dry run: one run into {cfg.output_dir}; {NOTHING}", "", settings.rstrip(), "",
             f"data: {info.num_train:,} train / {info.num_test:,} test examples, "
             f"{info.num_classes} classes, {'×'.join(map(str, info.image_shape))}",
             f"steps: {per_epoch:,} per epoch × {cfg.epochs} epochs = {total:,}; "
             f"η = m·η̃ = {cfg.batch_size} × {cfg.base_lr:.6g} = "
             f"{cfg.batch_size * cfg.base_lr:.6g}",
             f"output_dir: {_directory_state(cfg, info)}",
             "estimated time: " + _estimate(cfg, info, step)]
    return "\n".join(lines)


def _directory_state(cfg, info):
    try:
        finished = resume.check_output_dir(cfg, info, resume.stored_config(cfg.output_dir))
    except Exception as error:  # noqa: BLE001 - ConfigError: the run would be refused
        return f"the run would be refused: {error}"
    if finished is not None:
        return f"already holds this run's result ({finished.get('status')}); nothing to do"
    if results.exists(os.path.join(cfg.output_dir, results.CONFIG_FILE)):
        return "holds this run, unfinished: it would resume from its last checkpoint"
    return "new"


def _estimate(cfg, info, step_seconds):
    if step_seconds is None:
        return (f"no documented step time for {cfg.model}; run `make bench "
                f"BENCH_FLAGS=--models={cfg.model}` for one")
    seconds = cost.run_seconds(cfg, info, step_seconds)
    return (f"~{cost.duration(seconds)} ({step_seconds * 1e3:.1f} ms/step at m = "
            f"{cfg.batch_size}, evaluation included, on {cost.DOCUMENTED_WHERE})")


def _sweep(base, grid):
    out = base.output_dir
    valid, skipped = grid_lib.split_points(
        base, grid, lambda point: os.path.join(out, "trials", point.name))
    info = valid[0][1].data_info()
    times = cost.StepTimes(base.model)
    axes = " × ".join(field for field, _ in grid.axes)
    rows = [("point", "status", "steps", "est. time")]
    todo_steps, todo_seconds, unknown, finished = 0, 0.0, False, 0
    for point, cfg in valid:
        _, total = cost.run_steps(cfg, info)
        state = _trial_state(cfg.output_dir)
        if state:
            finished += 1
            rows.append((point.name, state, f"{total:,}", "—"))
            continue
        seconds = cost.run_seconds(cfg, info, times.seconds(cfg.norm, cfg.batch_size))
        unknown |= seconds is None
        seconds = None if seconds is None else seconds + cost.DOCUMENTED_TRIAL_OVERHEAD_S
        todo_steps += total
        todo_seconds += seconds or 0.0
        rows.append((point.name, "valid", f"{total:,}", cost.duration(seconds)))
    for point, reason in skipped:
        rows.append((point.name, "skipped", "—", reason))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(r[:3], widths)) + "  " + r[3]
             for r in rows]
    total_time = ("time unknown: no documented step time for " + base.model if unknown
                  else f"~{cost.duration(todo_seconds)} on {cost.DOCUMENTED_WHERE}, "
                       f"evaluation and ~{cost.DOCUMENTED_TRIAL_OVERHEAD_S:g} s of set-up per "
                       f"trial included")
    return "\n".join([
        f"dry run: sweep over {axes} into {out}: {len(valid) + len(skipped)} points; "
        f"{NOTHING}", "", *table, "",
        f"{len(valid)} valid ({finished} finished), {len(skipped)} skipped: "
        f"{todo_steps:,} steps to run, {total_time}.",
        "Points were checked for 1 replica (a dry run starts no strategy); the real sweep "
        "also skips points its replicas cannot split."])


def _trial_state(trial_dir):
    """'completed' / 'diverged' for a finished trial directory, else ''."""
    path = os.path.join(trial_dir, results.RESULT_FILE)
    try:
        status = (results.read_yaml(path) or {}).get("status") if results.exists(path) else None
    except Exception:  # noqa: BLE001 - an unreadable record: the sweep would rerun it
        status = None
    return status if status in ("completed", "diverged") else ""
