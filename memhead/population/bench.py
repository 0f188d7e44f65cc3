"""``python -m memhead.bench --population``: what one online step costs each member of a population.

For populations of ``SIZES`` members of the paper's 2-D Memory Head and of its NS-ImageNet head, one
step of the population loop (:func:`memhead.population.run.population_step`: forward on the sample expanded to
every member, :func:`~memhead.population.run.population_loss`, zero_grad, backward, optimizer step),
alternated call by call with the single run's step (the run's own model and optimizer, the loop body
of :mod:`memhead.protocol`); medians per member. The members are the runs of seeds 1..P, built as a
population run builds them (``runner.build_learner`` after ``seed_everything``, then
:mod:`memhead.population.build`), on one sample at a time of the composed config's stream.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf

from memhead import runner
from memhead.config import resolve_threads
from memhead.population.build import build_model, build_optimizer, member_generator
from memhead.population.run import population_step

SIZES = (1, 8, 64)
# Heads measured: name -> overrides of conf/config.yaml. The paper's 2-D MH is conf/model/mh.yaml's
# defaults on modes (the values sweeps/mh_modes.yaml keeps fixed; Adam 0.01 from optimizer/adam.yaml).
HEADS = {
    "2-D MH": ["benchmark=modes", "model=mh"],
    "NS-ImageNet head": ["experiment=ns_imagenet_mh", "benchmark=features"],  # + a random 512-d stream
}
# Distributions of the random NS-ImageNet-shaped stream: every one of the 100 classes labels one.
NS_DISTRIBUTIONS = 100


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from memhead.config import register_configs

    register_configs()
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def _walk(model, step: Callable[[torch.Tensor, torch.Tensor], None], x, y) -> Callable[[int], None]:
    """``run(n)``: ``n`` calls of ``step`` on one sample each, walking round the stream ``x, y``."""
    position = [0]

    def run(n: int) -> None:
        model.train()
        for _ in range(n):
            i = position[0]
            position[0] = (i + 1) % len(x)
            step(x[i : i + 1], y[i : i + 1])

    return run


def single_steps(learner: runner.Learner, x: torch.Tensor, y: torch.Tensor) -> Callable[[int], None]:
    """``run(n)``: ``n`` one-sample steps of the run alone along ``x``, as ``run_protocol``'s loop body."""
    model, optimizer, loss_fn = learner.model, learner.optimizer, learner.loss_fn

    def step(xi: torch.Tensor, yi: torch.Tensor) -> None:
        loss = loss_fn(model(xi), yi)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return _walk(model, step, x, y)


def population_steps(model, optimizer, loss_name: str, size: int, x, y) -> Callable[[int], None]:
    """``run(n)``: ``n`` one-sample steps of the population along ``x``: its loop's own step."""
    return _walk(model, lambda xi, yi: population_step(model, optimizer, None, xi, yi, loss_name, size), x, y)


def build_population(cfg, size: int, stream, device: torch.device):
    """Model and optimizer of the population of ``cfg``'s runs with seeds 1..``size``."""
    cfgs, learners, generators = [], [], []
    for seed in range(1, size + 1):
        member = copy.deepcopy(cfg)
        member.seed = seed
        generator = runner.seed_everything(seed)
        learners.append(runner.build_learner(member, stream, device, generator, optimizer=False))
        generators.append(member_generator(device))
        cfgs.append(member)
    model = build_model(cfgs, learners, stream.in_features, stream.num_classes, device, generators)
    return model, build_optimizer(cfgs, model)


def measure_head(
    overrides: list[str], device: torch.device, sizes, repeats: int, default_threads: int
) -> dict:
    """Median seconds of the single-run step and per member of each population, each size alternated
    with its own single-run step; and what was measured."""
    from memhead.bench import interleaved_medians, write_stream

    with tempfile.TemporaryDirectory() as tmp:
        extra = [f"device={device}", "seed=1", "progress=false"]
        if "benchmark=features" in overrides:
            write_stream(Path(tmp) / "stream.npz", NS_DISTRIBUTIONS)
            extra.append(f"benchmark.path={tmp}/stream.npz")
        cfg = compose([*overrides, *extra])
        stream, _ = runner.build_stream(cfg, device, False)
    threads = resolve_threads(cfg.threads, cfg.stream.batch_size, stream.in_features)
    # As the run sets it: one thread for one-sample steps of small inputs, else torch's default.
    torch.set_num_threads(default_threads if threads is None else threads)
    x, y = stream.train.x, stream.train.y
    single = single_steps(runner.build_learner(cfg, stream, device, runner.seed_everything(1)), x, y)
    rows = {}
    for size in sizes:
        model, optimizer = build_population(cfg, size, stream, device)
        steps = population_steps(model, optimizer, cfg.loss.name, size, x, y)
        medians = interleaved_medians(device, {"single": (single, 1), "member": (steps, size)}, repeats)
        rows[size] = medians
        del model, optimizer, steps
    return {
        "rows": rows,
        "threads": torch.get_num_threads(),
        "shape": f"{stream.in_features} -> {stream.num_classes}",
        "model": cfg.model,
        "optimizer": cfg.optimizer,
    }


def describe(model, optimizer) -> str:
    """The head's and optimizer's settings in a few words (enum options by name)."""
    m = OmegaConf.to_container(model, enum_to_str=True)
    return (
        f"m={m['key_mem_units']}, delta={m['delta']}, {m['distance']}, {m['upd_m']}/{m['upd_k']}, "
        f"gamma_alpha {m['gamma_alpha']:g}, beta_k {m['beta_k']:g}, "
        f"tau ({m['tau_alpha']:g}, {m['tau_mu']:g}, {m['tau_eta']:g}), scramble={m['scramble']}; "
        f"{optimizer.name} lr {optimizer.lr:g}, weight decay {optimizer.weight_decay:g}"
    )


def population_rows(device: torch.device, repeats: int, sizes=SIZES, heads: dict | None = None) -> None:
    """Print one row per head and population size (the bench's ``--population``)."""
    heads = HEADS if heads is None else heads
    default_threads = torch.get_num_threads()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"memhead population benchmark: device {device} ({where}), torch {torch.__version__}")
    print(
        f"per-member cost of one online step (batch 1) of a population of seeds 1..P, against the "
        f"single run's step; medians of {repeats} alternated steps"
    )
    for name, overrides in heads.items():
        measured = measure_head(overrides, device, sizes, repeats, default_threads)
        print(
            f"{name} ({measured['shape']}, {describe(measured['model'], measured['optimizer'])}; "
            f"{measured['threads']} CPU threads):"
        )
        for size, medians in measured["rows"].items():
            member, single = medians["member"], medians["single"]
            print(
                f"population {size}, {name}: per-member step {member * 1e6:.1f} us = "
                f"{member / single:.3f} x single-run step ({single * 1e6:.1f} us; population step "
                f"{member * size * 1e3:.3f} ms)"
            )
