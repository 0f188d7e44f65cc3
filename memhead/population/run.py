"""``run_population(cfgs, out_dirs)``: the runs of one group trained together, one stream pass for all.

Each member is the run it replaces: :func:`memhead.runner.prepare` settles its seed and directory,
:func:`memhead.runner.build_learner` (after its own :func:`~memhead.runner.seed_everything`) builds its
exact initial state, and a :class:`memhead.runner.Recorder` writes its ``metrics.json``. Only the loop
is shared: every step advances all members, every boundary evaluates all members.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from memhead import checkpoint, metrics, run_dir, runner
from memhead.config import resolve_threads
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
    if head.evaluates_per_member:  # scores only: the units are applied where they lie
        per_sample = head.size * head.num_key_sets * head.key_mem_units
    else:  # the selected units, gathered
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


def member_checkpoint(member: Member, model, optimizer, state, recorder: MemberRecorder) -> dict:
    """What member ``member.index`` needs to continue with its population after this boundary.

    The model state is keyed as the run alone's; the optimizer's is the population optimizer's rows of
    this member (``"population": True`` says so: only a population resumes it)."""
    payload = checkpoint.capture(
        config=member.plan.config,
        seed=member.plan.seed,
        model_state=model.member_state(member.index),
        optimizer_state=optimizer.member_state(member.rows),
        competitor_state=member.learner.competitor.state_dict(),
        state=state,
        timer=recorder.timer,
        elapsed_s=recorder.elapsed_s(),
        rng={"generator": member.learner.generator.get_state(), "memories": member.memories.get_state()},
    )
    return {"population": True, **payload}


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
) -> list[dict | Exception]:
    """Run every config (one group) as one population; returns each run's ``metrics.json`` record.

    Runs whose directory already holds a finished record are not run again. A run refused before
    training (its directory holds another run, or is in use) fails alone: its entry is the error, and
    the others train. ``models_out``, a list, receives the final model of each run that trained (its
    run-alone module, holding the member's state).
    """
    t_start = time.perf_counter()
    check_group(cfgs)
    outcomes: list[runner.RunPlan | Exception] = []
    try:  # each member holds its run directory's lock until the population ends
        for cfg, out_dir in zip(cfgs, out_dirs):
            try:
                outcomes.append(runner.prepare(cfg, out_dir))
            except ConfigError as err:
                log.error("%s: %s", out_dir, err)
                outcomes.append(err)
        plans = [o for o in outcomes if isinstance(o, runner.RunPlan)]
        records = iter(_run_prepared(plans, t_start, models_out) if plans else [])
        return [o if isinstance(o, Exception) else next(records) for o in outcomes]
    finally:
        for outcome in outcomes:
            if isinstance(outcome, runner.RunPlan):
                outcome.release()


@dataclass
class Member:
    """One run of a population: its plan, its learner, and where its state sits in the population."""

    index: int  # its position in the population
    rows: slice  # its rows of the population's parameters (an ensemble's members have k rows)
    plan: runner.RunPlan
    learner: runner.Learner
    memories: torch.Generator  # the copy of the global RNG it draws fresh memories from
    state: ProtocolState
    earlier_s: float = 0.0  # seconds spent before a resume
    saved: dict | None = None


def _run_prepared(plans: list, t_start: float, models_out: list | None) -> list[dict]:
    records: list[dict | None] = [plan.done for plan in plans]
    todo = [i for i, plan in enumerate(plans) if plan.done is None]
    if len(todo) < len(plans):
        log.info("%d of %d runs already finished: not run again", len(plans) - len(todo), len(plans))
    alone = [i for i in todo if plans[i].saved is not None and not plans[i].saved.get("population")]
    for i in alone:  # a run alone's checkpoint: that run continues alone, where it stopped
        log.info("%s holds a checkpoint of a run alone: it resumes alone", plans[i].out_dir)
        plans[i].release()
        records[i] = runner.run(plans[i].cfg, plans[i].out_dir)
    # Members resume together only from the same boundary: one population per resume point.
    starts: dict[int, list[int]] = {}
    for i in todo:
        if i not in alone:
            saved = plans[i].saved
            starts.setdefault(0 if saved is None else saved["protocol"]["next_distribution"], []).append(i)
    for start, indices in sorted(starts.items()):
        if start:
            log.info("%d runs resume together after boundary %d", len(indices), start - 1)
        finished = _train([plans[i] for i in indices], t_start, models_out)
        for i, record in zip(indices, finished):
            records[i] = record
    return records


def _train(plans: list, t_start: float, models_out: list | None) -> list[dict]:
    """Build, resume, train and record the population of ``plans`` (all at one resume point)."""
    first = plans[0].cfg
    for plan in plans:
        checkpoint.remove_stale_temporaries(plan.out_dir)
    device = runner.resolve_device(first.device)
    progress = runner.default_progress() if first.progress is None else bool(first.progress)
    timer = Timer(device)
    stream, features_s = runner.build_stream(first, device, progress)
    threads = resolve_threads(first.threads, first.stream.batch_size, stream.in_features)
    if threads is not None:
        torch.set_num_threads(threads)
    k = first.competitor.members if first.competitor.name == "ensemble" else 1  # rows per member
    members = _build_members(plans, stream, device, k)
    size = len(members)
    cfgs = [plan.cfg for plan in plans]
    initial_keys = None
    if first.plots.enabled:  # before any checkpoint: the keys the runs' first start drew
        from memhead.plots import snapshot_keys

        initial_keys = [snapshot_keys(member.learner.model) for member in members]
    _resume(members, timer)
    model = build_model(
        cfgs, [m.learner for m in members], stream.in_features, stream.num_classes, device,
        [m.memories for m in members],
    )  # fmt: skip
    optimizer = build_optimizer(cfgs, model)
    for member in members:
        if member.saved is not None:
            optimizer.load_member(member.rows, member.saved["optimizer"])
    log.info("population of %d runs: %s", size, members[0].learner.model)
    recorders = [
        MemberRecorder(
            m.plan, m.learner, timer, features_s=features_s, earlier_s=m.earlier_s, device=device,
            t_start=t_start, population=size,
        )
        for m in members
    ]  # fmt: skip
    replay = MemberReplay.of([m.learner.competitor for m in members])
    with run_dir.Preemption() as preemption:
        _loop(model, optimizer, replay, stream, first, timer, members, recorders, preemption)
    records = []
    for j, (member, recorder) in enumerate(zip(members, recorders)):
        member.learner.model.load_state_dict(model.member_state(j))
        record = recorder.finish(member.state)
        if first.plots.enabled:
            from memhead.plots import save_run_plots

            save_run_plots(member.plan.out_dir, record, member.learner.model, stream, initial_keys[j])
        records.append(record)
        if models_out is not None:
            models_out.append(member.learner.model)
    _log_population_summary(records, size)
    return records


def _build_members(plans: list, stream, device, k: int) -> list[Member]:
    """Each run's learner, built exactly as the run alone builds it (after its own seeding)."""
    members = []
    for index, plan in enumerate(plans):
        generator = runner.seed_everything(plan.seed)
        learner = runner.build_learner(plan.cfg, stream, device, generator, optimizer=False)
        rows = slice(index * k, (index + 1) * k)
        memories = member_generator(device)
        members.append(Member(index, rows, plan, learner, memories, ProtocolState.start(stream)))
    return members


def _resume(members: list[Member], timer: Timer) -> None:
    """Load each member's population checkpoint (all at one boundary) into its learner and state."""
    for member in members:
        saved = member.plan.saved
        if saved is None:
            continue
        member.saved = saved
        member.learner.model.load_state_dict(saved["model"])
        member.learner.competitor.load_state_dict(saved["competitor"])
        member.learner.generator.set_state(saved["rng"]["generator"])
        member.memories.set_state(saved["rng"]["memories"])
        member.state = ProtocolState.from_state_dict(saved["protocol"])
        member.earlier_s = saved["timer"]["elapsed_s"]
        timer.seconds.update(saved["timer"]["seconds"])  # the population's, the same in every member's
        timer.samples.update(saved["timer"]["samples"])
        log.info("resuming %s after boundary %d", member.plan.out_dir, member.state.next_distribution - 1)


def population_step(model, optimizer, replay: MemberReplay | None, x, y, loss_name: str, size: int) -> None:
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


def _evaluate(model, size, splits, chunk, timer, members, record) -> None:
    """Every member's accuracy on every split: ``record(member, split name, row)``."""
    for name, split in splits.items():
        if split is None:
            continue
        with timer.measure("eval_s", len(split) * size):
            rows = accuracies(model, size, split, chunk)
        for member, row in zip(members, rows):
            record(member, name, row)


def _loop(model, optimizer, replay, stream, cfg, timer, members, recorders, preemption) -> None:
    train = stream.train
    splits = stream.splits()
    ends = distribution_ends(train.dist)
    size, batch_size, loss_name = len(members), cfg.stream.batch_size, cfg.loss.name
    chunk = eval_chunk(model, size, cfg.eval.chunk_size)
    begin = members[0].state.next_distribution  # every member of a population resumes at the same one
    if begin == 0:
        # The untrained members on every split: the baseline of forward_transfer_gem, as run_protocol does.
        _evaluate(
            model,
            size,
            splits,
            chunk,
            timer,
            members,
            lambda m, name, row: m.state.initial.update({name: row}),
        )
    model.train()
    start = ends[begin - 1] if begin > 0 else 0
    for i in range(begin, len(ends)):
        end = ends[i]
        with timer.measure("train_s", end - start):
            for lo in range(start, end, batch_size):
                hi = min(lo + batch_size, end)
                population_step(model, optimizer, replay, train.x[lo:hi], train.y[lo:hi], loss_name, size)
        start = end

        def fill(member, name, row, i=i):
            state = member.state
            state.ccm[name][i] = row
            state.last[name] = {
                "boundary": i,
                **metrics.all_metrics(state.ccm[name], i, state.initial.get(name)),
            }

        current = {name: split if i < split.num_distributions else None for name, split in splits.items()}
        _evaluate(model, size, current, chunk, timer, members, fill)
        for member in members:
            member.state.boundaries.append({"index": i, **member.state.last})
            member.state.next_distribution = i + 1
        _at_boundary(i, model, optimizer, stream, members, recorders, preemption)
        test = np.array([m.state.last["test"].get("avg_accuracy", np.nan) for m in members])
        log.info("boundary %d/%d: test avg_accuracy over %d members: mean %.4f, best %.4f",
                 i + 1, len(ends), size, test.mean(), test.max())  # fmt: skip


def _at_boundary(i, model, optimizer, stream, members, recorders, preemption) -> None:
    """Every member's checkpoint and record so far, when a checkpoint is due (time-spaced, as a run
    alone's, or on a preemption signal, after which the population stops). The record is written with
    the checkpoint: what a killed population's records say is what its resume continues from."""
    n = stream.num_distributions
    state = members[0].state
    stopping = preemption.signum is not None and state.next_distribution < n
    if recorders[0].checkpoint_due(i, state, n, stopping):
        for member, recorder in zip(members, recorders):
            recorder.write_checkpoint(member_checkpoint(member, model, optimizer, member.state, recorder))
            runner.write_json_atomic(member.plan.metrics_path, recorder.record(member.state, complete=False))
    if stopping:
        where = (
            f"its {len(members)} runs resume together after boundary {i}"
            if members[0].plan.cfg.checkpoint.enabled
            else "checkpoint.enabled=false: its runs start over when relaunched"
        )
        preemption.hand_on()
        raise run_dir.Preempted(
            preemption.signum, f"population stopped by signal {preemption.signum}; {where}"
        )


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
