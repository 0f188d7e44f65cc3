"""``run_population(cfgs, out_dirs)``: the runs of one group trained together, one stream pass for all.

Each member is the run it replaces: :func:`memhead.runner.prepare` settles its seed and directory,
:func:`memhead.runner.build_learner` (after its own :func:`~memhead.runner.seed_everything`) builds its
exact initial state, and a :class:`memhead.runner.Recorder` writes its ``metrics.json``. Only the loop
is shared: every step advances all members, every boundary evaluates all members.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from memhead import metrics, runner
from memhead.population.build import build_model, build_optimizer, member_generator
from memhead.population.members import group_key, unsupported
from memhead.population.replay import MemberReplay
from memhead.protocol import ProtocolState, Timer, distribution_ends, format_metrics
from memhead.registry import ConfigError

log = logging.getLogger(__name__)

# Floats of the selected units an evaluation forward may gather (all members together).
EVAL_FLOATS = 1 << 24


def population_loss(name: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The sum over members of each member's loss (so each member's gradient is its run's).

    ``logits``: ``(P, b, classes)``; ``y``: ``(b,)`` shared by every member, or ``(P, b)`` per member.
    """
    size, batch, classes = logits.shape
    y = y.expand(size, batch)
    if name == "xent":
        losses = F.cross_entropy(logits.reshape(-1, classes), y.reshape(-1), reduction="none")
        return losses.view(size, batch).mean(dim=1).sum()
    if name == "hinge":
        t = 2.0 * F.one_hot(y, classes).to(logits.dtype) - 1.0
        return torch.clamp(-t * logits, min=0).sum()
    raise ConfigError(f"loss={name!r} is unknown; known: xent, hinge")


def eval_chunk(model, size: int, chunk_size: int) -> int:
    """Samples per evaluation forward: the run's chunk, fewer when the gathered units would not fit."""
    head = next((m for m in model.modules() if hasattr(m, "unit_size")), None)
    if head is None:
        return chunk_size
    per_sample = head.size * head.num_key_sets * head.delta * head.unit_size
    return max(1, min(chunk_size, EVAL_FLOATS // per_sample))


def accuracies(model, size: int, split, chunk: int) -> np.ndarray:
    """Accuracy ``(P, distributions)`` of every member on ``split`` (eval mode, no gradient)."""
    model.eval()
    correct = torch.empty(size, len(split), dtype=torch.float32, device=split.y.device)
    with torch.inference_mode():
        for start in range(0, len(split), chunk):
            x = split.x[start : start + chunk]
            logits = model(x.expand(size, *x.shape))
            correct[:, start : start + chunk] = (
                logits.argmax(dim=-1) == split.y[start : start + chunk]
            ).float()
    model.train()
    counts = torch.bincount(split.dist, minlength=split.num_distributions)
    # Per member, as the run alone counts (same reduction, same float values).
    hits = [torch.bincount(split.dist, weights=row, minlength=split.num_distributions) for row in correct]
    return torch.stack([h / counts for h in hits]).cpu().numpy().astype(np.float64)


class MemberRecorder(runner.Recorder):
    """A member's :class:`~memhead.runner.Recorder`: the population's shared times, and its size."""

    def __init__(self, *args, population: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.population = population

    def timing(self) -> dict:
        return {**super().timing(), "population": self.population}

    def at_boundary(self, i, model, optimizer, state, num_distributions) -> None:
        # No member checkpoints: populations do not checkpoint yet (a killed one reruns its unfinished
        # members from the start); a member only writes its record so far.
        runner.write_json_atomic(self.plan.metrics_path, self.record(state, complete=False))


def check_group(cfgs: list[DictConfig]) -> None:
    """Refuse configs that are not one population (another group, or unsupported)."""
    keys = {group_key(cfg) for cfg in cfgs}
    if len(keys) != 1:
        raise ConfigError(
            "a population's runs must differ only in member options (see members.MEMBER_OPTIONS)"
        )
    reason = unsupported(cfgs[0])
    if reason is not None:
        raise ConfigError(f"these runs cannot train as a population: {reason}")


def run_population(
    cfgs: list[DictConfig], out_dirs: list[str | Path], *, models_out: list | None = None
) -> list[dict]:
    """Run every config (one group) as one population; returns each run's ``metrics.json`` record.

    Runs whose directory already holds a finished record are not run again. ``models_out``, a list,
    receives the final model of each run that ran (its run-alone module, holding the member's state).
    """
    t_start = time.perf_counter()
    check_group(cfgs)
    plans: list[runner.RunPlan] = []
    try:  # each member holds its run directory's lock until the population ends
        for cfg, out_dir in zip(cfgs, out_dirs):
            plans.append(runner.prepare(cfg, out_dir))
        return _run_prepared(plans, t_start, models_out)
    finally:
        for plan in plans:
            plan.release()


def _run_prepared(plans: list, t_start: float, models_out: list | None) -> list[dict]:
    records: list[dict | None] = [plan.done for plan in plans]
    todo = [i for i, plan in enumerate(plans) if plan.done is None]
    if len(todo) < len(plans):
        log.info("%d of %d runs already finished: not run again", len(plans) - len(todo), len(plans))
    if not todo:
        return records
    first = plans[todo[0]].cfg
    device = runner.resolve_device(first.device)
    if first.threads is not None:
        torch.set_num_threads(first.threads)
    progress = runner.default_progress() if first.progress is None else bool(first.progress)
    timer = Timer(device)
    stream, features_s = runner.build_stream(first, device, progress)
    learners, generators = [], []
    for i in todo:
        generator = runner.seed_everything(plans[i].seed)
        learners.append(runner.build_learner(plans[i].cfg, stream, device, generator))
        generators.append(member_generator(device))
    members = [plans[i] for i in todo]
    size = len(members)
    cfgs_todo = [plan.cfg for plan in members]
    model = build_model(cfgs_todo, learners, stream.in_features, stream.num_classes, device, generators)
    optimizer = build_optimizer(cfgs_todo, model)
    log.info("population of %d runs: %s", size, learners[0].model)
    initial_keys = None
    if first.plots.enabled:
        from memhead.plots import snapshot_keys

        initial_keys = [snapshot_keys(learner.model) for learner in learners]
    recorders = [
        MemberRecorder(
            plan, learner, timer, features_s=features_s, earlier_s=0.0, device=device, t_start=t_start,
            population=size,
        )
        for plan, learner in zip(members, learners)
    ]  # fmt: skip
    states = [ProtocolState.start(stream) for _ in members]
    replay = MemberReplay.of([learner.competitor for learner in learners])
    _loop(model, optimizer, replay, stream, first, timer, states, recorders, size)
    for j, (plan, learner, state, recorder) in enumerate(zip(members, learners, states, recorders)):
        learner.model.load_state_dict(model.member_state(j))
        record = recorder.finish(state)
        if first.plots.enabled:
            from memhead.plots import save_run_plots

            save_run_plots(plan.out_dir, record, learner.model, stream, initial_keys[j])
        records[todo[j]] = record
        if models_out is not None:
            models_out.append(learner.model)
    _log_population_summary([records[i] for i in todo], size)
    return records


def _step(model, optimizer, replay: MemberReplay | None, x, y, loss_name: str, size: int) -> None:
    """One online step of every member: the run alone's forward, backward, replay, step and storage."""
    loss = population_loss(loss_name, model(x.expand(size, *x.shape)), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if replay is not None:
        batch = replay.sample()
        if batch is not None:
            replay_x, replay_y = batch
            population_loss(loss_name, model(replay_x), replay_y).backward()
    optimizer.step()
    if replay is not None:
        replay.store(x, y)


def _loop(model, optimizer, replay, stream, cfg, timer, states, recorders, size) -> None:
    train = stream.train
    splits = stream.splits()
    ends = distribution_ends(train.dist)
    batch_size, loss_name = cfg.stream.batch_size, cfg.loss.name
    chunk = eval_chunk(model, size, cfg.eval.chunk_size)
    # The untrained members once on every split: the baseline of forward_transfer_gem, as run_protocol does.
    for name, split in splits.items():
        with timer.measure("eval_s", len(split) * size):
            rows = accuracies(model, size, split, chunk)
        for state, row in zip(states, rows):
            state.initial[name] = row
    model.train()
    start = 0
    for i in range(len(ends)):
        end = ends[i]
        with timer.measure("train_s", end - start):
            for lo in range(start, end, batch_size):
                hi = min(lo + batch_size, end)
                _step(model, optimizer, replay, train.x[lo:hi], train.y[lo:hi], loss_name, size)
        start = end
        for name, split in splits.items():
            if i < split.num_distributions:
                with timer.measure("eval_s", len(split) * size):
                    rows = accuracies(model, size, split, chunk)
                for state, row in zip(states, rows):
                    state.ccm[name][i] = row
                    state.last[name] = {
                        "boundary": i,
                        **metrics.all_metrics(state.ccm[name], i, state.initial.get(name)),
                    }
        for state, recorder in zip(states, recorders):
            state.boundaries.append({"index": i, **state.last})
            state.next_distribution = i + 1
            recorder.at_boundary(i, model, optimizer, state, stream.num_distributions)
        test = np.array([state.last["test"].get("avg_accuracy", np.nan) for state in states])
        log.info("boundary %d/%d: test avg_accuracy over %d members: mean %.4f, best %.4f",
                 i + 1, len(ends), size, test.mean(), test.max())  # fmt: skip


def _log_population_summary(records: list[dict], size: int) -> None:
    best = max(records, key=lambda r: r["final"]["test"]["avg_accuracy"])
    log.info(
        "population of %d: best final test %s (seed %d)",
        size,
        format_metrics(best["final"]["test"]),
        best["seed"],
    )
    t = records[0]["timing"]
    log.info(
        "time: train %.2fs, eval %.2fs, total %.2fs for %d runs",
        t["train_s"],
        t["eval_s"],
        t["total_s"],
        size,
    )
