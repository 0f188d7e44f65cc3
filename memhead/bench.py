"""``python -m memhead.bench``: the paper's NS-ImageNet Memory Head against its speed targets.

Measured in one process, each figure against its baseline call by call (an online step, a floor
step, the next online step...; medians), so that caches, thread state and machine load are alike:

* the floor: one fused Adam step over a tensor the size of the memories, which every online step
  must pay since weight decay changes every memory row;
* the online step (batch size 1: forward, loss, zero_grad, backward, optimizer step, as the loop
  body of :mod:`memhead.protocol`), target at most ``STEP_TARGET`` times the floor;
* evaluation of a ``CHUNK``-sample chunk, target at most ``EVAL_TARGET`` times a plain
  ``nn.Linear(512, 100)`` on the same chunk, with the peak memory of one chunk; the same head with
  ``distance=euclidean`` (same target) and with per-neuron keys, cosine and euclidean
  (``PER_NEURON_TARGET``);
* the reference implementation's online step and evaluation (``impl="reference"``; no target: its
  cost made visible);
* a whole NS-ImageNet-shaped stream through :func:`memhead.runner.run` (needs Hydra), target under
  ``STREAM_TARGET_S`` seconds, and again with ``distance=euclidean``, whose evaluation time should stay
  within ``EUCLIDEAN_STREAM_TARGET`` times the cosine stream's.

Options: ``--device cpu|cuda``, ``--quick`` (a smoke run: few repeats, a short stream), ``--repeats N``;
``--population`` prints instead the per-member cost of a population's online step
(:mod:`memhead.population.bench`).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from memhead.layer import MemoryHead

IN_FEATURES, CLASSES, CHUNK = 512, 100, 1000
# The paper's NS-ImageNet configuration (conf/experiment/ns_imagenet_mh.yaml).
HEAD_OPTIONS = {
    "key_mem_units": 100, "delta": 2, "distance": "cosine", "upd_m": "WTA", "upd_k": "ad_hoc_WTA",
    "scramble": True, "shared_keys": True, "gamma_alpha": 5.0, "beta_k": 1e-3,
    "tau_alpha": 0.7, "tau_mu": 50, "tau_eta": 500,
}  # fmt: skip
LR, WEIGHT_DECAY = 1e-4, 1e-3
STEP_TARGET, EVAL_TARGET, STREAM_TARGET_S = 1.5, 8.0, 60.0
PER_NEURON_TARGET, EUCLIDEAN_STREAM_TARGET = 20.0, 2.0
# Heads measured beside the paper's: name -> options that differ.
VARIANTS = {
    "euclidean": {"distance": "euclidean"},
    "per_neuron": {"shared_keys": False},
    "per_neuron_euclidean": {"shared_keys": False, "distance": "euclidean"},
    "reference": {"impl": "reference"},
}
# NS-ImageNet's shape: 100 classes x 3 perturbations; samples per distribution; val keeps the first
# half of the distributions, as data/ns_imagenet.py does.
STREAM_SHAPE = {"distributions": 300, "train": 10, "val": 2, "test": 4}
QUICK_DISTRIBUTIONS = 12


def prepare_process() -> None:
    """What :func:`memhead.runner.seed_everything` sets, so that figures match real runs."""
    try:
        from memhead.runner import seed_everything
    except ImportError:  # no Hydra/OmegaConf on this machine: the same settings by hand
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.manual_seed(0)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False
    else:
        seed_everything(0)


def make_optimizer(module: torch.nn.Module) -> tuple[torch.optim.Optimizer, str]:
    """The run's own optimizer factory (Adam, the paper's settings), and where it came from."""
    try:
        from types import SimpleNamespace

        from memhead.runner import make_optimizer_factory
    except ImportError:  # without OmegaConf: the factory's choice, rebuilt here
        params = [p for p in module.parameters() if p.requires_grad]
        fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
        return torch.optim.Adam(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=fused), "fallback"
    cfg = SimpleNamespace(name="adam", lr=LR, weight_decay=WEIGHT_DECAY, momentum=0.0)
    return make_optimizer_factory(cfg)(module), "memhead.runner"


def make_head(device: torch.device, **changes) -> MemoryHead:
    return MemoryHead(IN_FEATURES, CLASSES, **{**HEAD_OPTIONS, **changes}, device=device)


class Workload:
    """The head, its optimizer, the floor's tensor and a random feature stream on ``device``."""

    def __init__(self, device: torch.device, stream_length: int = 3000):
        self.device = device
        self.head = make_head(device)
        self.optimizer, self.optimizer_source = make_optimizer(self.head)
        floor = torch.zeros_like(self.head.memories, requires_grad=True)
        floor.grad = torch.randn_like(floor)
        self.floor_optimizer = torch.optim.Adam([floor], lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
        self.linear = torch.nn.Linear(IN_FEATURES, CLASSES, device=device)
        self.x = torch.randn(stream_length, IN_FEATURES, device=device)
        self.y = torch.randint(0, CLASSES, (stream_length,), device=device)
        self.chunk = self.x[:CHUNK]
        self.position = 0
        self.variants = {name: make_head(device, **changes) for name, changes in VARIANTS.items()}
        self.reference_optimizer = make_optimizer(self.variants["reference"])[0]

    def floor_steps(self, n: int) -> None:
        for _ in range(n):
            self.floor_optimizer.step()

    def online_steps(self, n: int, reference: bool = False) -> None:
        """``n`` steps of the protocol's loop body, one sample each, along the stream."""
        head, optimizer = self.head, self.optimizer
        if reference:
            head, optimizer = self.variants["reference"], self.reference_optimizer
        head.train()
        for _ in range(n):
            i = self.position
            self.position = (i + 1) % len(self.x)
            loss = F.cross_entropy(head(self.x[i : i + 1]), self.y[i : i + 1])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def linear_chunks(self, n: int) -> None:
        with torch.inference_mode():
            for _ in range(n):
                self.linear(self.chunk)

    def head_chunks(self, n: int, variant: str | None = None) -> None:
        head = self.head if variant is None else self.variants[variant]
        head.eval()
        with torch.inference_mode():
            for _ in range(n):
                head(self.chunk)


def interleaved_medians(
    device: torch.device, parts: dict[str, tuple[Callable[[int], None], int]], repeats: int
) -> dict[str, float]:
    """Median seconds per unit of work of each part, the parts called in turn, one call at a time.

    Alternating single calls (an online step, then one floor step, then the next online step...)
    gives every part the same caches, thread state and machine load.

    Args:
        device: synchronised around each timed call.
        parts: name -> (run(n) doing n calls, units of work per call).
        repeats: timed calls per part.
    """

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for run, _ in parts.values():  # warm-up: first calls allocate state and pick kernels
        run(3)
    seconds: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(repeats):
        for name, (run, units) in parts.items():
            sync()
            start = time.perf_counter()
            run(1)
            sync()
            seconds[name].append((time.perf_counter() - start) / units)
    return {name: statistics.median(values) for name, values in seconds.items()}


def _max_rss_bytes() -> int:
    # Linux reports kilobytes, macOS bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _rss_growth_child(part: str, queue) -> None:
    prepare_process()
    torch.set_num_threads(1)  # the same arithmetic with fewer thread-local buffers in the figure
    work = Workload(torch.device("cpu"))
    run = {"step": work.online_steps, "eval": work.head_chunks}[part]
    # Building the workload peaked higher than the part may: where the high-water mark can be reset,
    # the part's peak is measured from here on; elsewhere the growth of the process's maximum.
    resident, before = _reset_peak_resident(), _max_rss_bytes()
    run(2)
    queue.put(_max_rss_bytes() - before if resident is None else _status_bytes("VmHWM") - resident)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_resident() -> int | None:
    """Reset the resident set's high-water mark (Linux) and return the resident bytes now; ``None``
    where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return _status_bytes("VmRSS")
    except (OSError, KeyError):
        return None


def peak_memory(work: Workload, part: str) -> int:
    """Bytes that two calls of ``part`` (``step`` or ``eval``) add at their peak to what was there.

    CUDA: the allocator's peak. CPU: in a fresh process that sees only this part, its resident set's
    high-water mark (reset once the workload is built) over what was resident then; elsewhere the
    growth of the maximum resident set. The operating system counts whole pages: an estimate.
    """
    if work.device.type == "cuda":
        run = {"step": work.online_steps, "eval": work.head_chunks}[part]
        torch.cuda.synchronize(work.device)
        base = torch.cuda.memory_allocated(work.device)
        torch.cuda.reset_peak_memory_stats(work.device)
        run(2)
        torch.cuda.synchronize(work.device)
        return torch.cuda.max_memory_allocated(work.device) - base
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_rss_growth_child, args=(part, queue))
    child.start()
    growth = queue.get(timeout=300)
    child.join()
    return growth


def write_stream(path: Path, distributions: int, seed: int = 0) -> dict[str, int]:
    """An ``.npz`` for ``benchmark=features`` with NS-ImageNet's shape and random 512-d features."""
    import numpy as np

    rng = np.random.default_rng(seed)
    val_distributions = max(1, distributions // 2)
    arrays, sizes = {}, {}
    for split in ("train", "val", "test"):
        count = val_distributions if split == "val" else distributions
        dist = np.repeat(np.arange(count), STREAM_SHAPE[split])
        arrays[f"X_{split}"] = rng.standard_normal((len(dist), IN_FEATURES), dtype=np.float32)
        arrays[f"y_{split}"] = (dist % CLASSES).astype(np.int64)
        arrays[f"distributions_{split}"] = dist.astype(np.int64)
        sizes[split] = len(dist)
    np.savez(path, **arrays)
    return sizes


def run_stream(device: torch.device, distributions: int, distance: str = "cosine") -> dict:
    """Seconds of :func:`memhead.runner.run` on a random NS-ImageNet-shaped stream."""
    try:
        from hydra import compose, initialize_config_dir

        from memhead.config import register_configs
        from memhead.runner import run
    except ImportError as err:
        return {"skipped": f"needs Hydra ({err.name} is not installed)"}
    register_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with tempfile.TemporaryDirectory() as tmp:
        sizes = write_stream(Path(tmp) / "stream.npz", distributions)
        overrides = [
            "experiment=ns_imagenet_mh", "benchmark=features", f"benchmark.path={tmp}/stream.npz",
            "checkpoint.enabled=false", "progress=false", f"device={device}", "seed=1",
            f"model.distance={distance}",
        ]  # fmt: skip
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        start = time.perf_counter()
        record = run(cfg, Path(tmp) / "run")
        total = time.perf_counter() - start
    timing = record["timing"]
    return {"total_s": total, "train_s": timing["train_s"], "eval_s": timing["eval_s"], "sizes": sizes}


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MB"


def _row(cells: list[str]) -> str:
    widths = (34, 11, 11, 7, 7, 6, 11)
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()


# --- closed-form baselines (model=slda) ----------------------------------------------------------

SLDA_STEP_TARGET, SLDA_EVAL_TARGET = 2.0, 2.0


def closed_form_rows(work: Workload, repeats: int, line: Callable) -> None:
    """SLDA at 512-d beside the Memory Head: one ``learn`` (a rank-one covariance update) against the
    head's online step, and a chunk's evaluation (factor cached) against ``nn.Linear``, alternated;
    the refactorisation that the first evaluation after an update pays is shown on its own."""
    from memhead.slda import StreamingLDA

    slda = StreamingLDA(IN_FEATURES, CLASSES, device=work.device)
    position = [0]

    def learn(n: int) -> None:
        for _ in range(n):
            i = position[0] = (position[0] + 1) % len(work.x)
            slda.learn(work.x[i : i + 1], work.y[i : i + 1])

    def evaluate(n: int) -> None:
        with torch.inference_mode():
            for _ in range(n):
                slda(work.chunk)

    def refresh(n: int) -> None:
        for _ in range(n):
            slda._forget()
            slda.class_weights()

    steps = interleaved_medians(work.device, {"mh": (work.online_steps, 1), "slda": (learn, 1)}, repeats)
    learn(len(work.x))  # every class seen before evaluating
    chunks = {"linear": (work.linear_chunks, CHUNK), "slda": (evaluate, CHUNK), "refresh": (refresh, 1)}
    evals = interleaved_medians(work.device, chunks, max(5, repeats // 3))
    step_ratio, eval_ratio = steps["slda"] / steps["mh"], evals["slda"] / evals["linear"]
    line("SLDA learn, batch 1 (vs MH step)", steps["slda"], f"{step_ratio:.2f}", f"<={SLDA_STEP_TARGET:g}",
         step_ratio <= SLDA_STEP_TARGET)  # fmt: skip
    line(f"SLDA eval, chunk {CHUNK} (vs Linear)", evals["slda"], f"{eval_ratio:.2f}",
         f"<={SLDA_EVAL_TARGET:g}", eval_ratio <= SLDA_EVAL_TARGET)  # fmt: skip
    line("SLDA refactorisation (s, per boundary)", evals["refresh"])


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed are positive integers, comma-separated (1,8,64)")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memhead.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: few repeats, a short stream")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed steps (300, quick 20; --population: 100, quick 10)"
    )
    parser.add_argument("--skip-stream", action="store_true", help="leave out the end-to-end stream")
    parser.add_argument(
        "--population",
        action="store_true",
        help="instead: per-member cost of one online step of populations (2-D MH, NS-ImageNet head)",
    )
    parser.add_argument(
        "--population-sizes",
        type=_sizes,
        default=None,
        help="members of the measured populations, comma-separated (default: 1,8,64)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available here")
    prepare_process()
    if args.population or args.population_sizes:
        from memhead.population.bench import SIZES, population_rows

        # Fewer by default: a step of 64 NS-ImageNet heads takes the better part of a second on a CPU.
        population_rows(device, args.repeats or (10 if args.quick else 100), args.population_sizes or SIZES)
        return 0
    repeats = args.repeats or (20 if args.quick else 300)
    work = Workload(device)
    peaks = {part: peak_memory(work, part) for part in ("step", "eval")}
    # Each step against the floor alone: with the reference's step (its own 80 MB of state) in the same
    # alternation, the online step's ratio read 0.05-0.1 higher.
    steps = {"floor": (work.floor_steps, 1), "step": (work.online_steps, 1)}
    reference_steps = {
        "reference floor": (work.floor_steps, 1),
        "reference step": (lambda n: work.online_steps(n, reference=True), 1),
    }
    chunks = {"linear": (work.linear_chunks, CHUNK), "head": (work.head_chunks, CHUNK)}
    for variant in VARIANTS:
        chunks[variant] = (lambda n, variant=variant: work.head_chunks(n, variant), CHUNK)
    per_unit = interleaved_medians(device, steps, repeats)
    per_unit.update(interleaved_medians(device, reference_steps, repeats))
    per_unit.update(interleaved_medians(device, chunks, max(5, repeats // 3)))
    distributions = QUICK_DISTRIBUTIONS if args.quick else STREAM_SHAPE["distributions"]
    cpu = device.type == "cpu"
    threads = torch.get_num_threads()
    where = f"{threads} threads" if cpu else torch.cuda.get_device_name(device)
    streams = {}
    for distance in ("cosine", "euclidean"):
        skipped = {"skipped": "--skip-stream"}
        streams[distance] = skipped if args.skip_stream else run_stream(device, distributions, distance)
    torch.set_num_threads(threads)  # a run sets its own (one, for one-sample steps); the rows after use these
    stream = streams["cosine"]

    step_ratio = per_unit["step"] / per_unit["floor"]
    eval_ratio = per_unit["head"] / per_unit["linear"]
    quick = ", quick" if args.quick else ""
    print(f"memhead benchmark: device {device} ({where}), torch {torch.__version__}{quick}")
    units, delta = HEAD_OPTIONS["key_mem_units"], HEAD_OPTIONS["delta"]
    print(
        f"Memory Head {IN_FEATURES} -> {CLASSES}, m={units}, delta={delta}, "
        f"cosine, WTA/ad_hoc_WTA, scrambling; Adam lr {LR:g}, weight decay {WEIGHT_DECAY:g} "
        f"(optimizer from {work.optimizer_source}); medians of {repeats} alternated steps and "
        f"{max(5, repeats // 3)} alternated chunks"
    )
    print(_row(["measure", "s/sample", "samples/s", "ratio", "target", "result", "peak memory"]))

    def line(name, seconds, ratio="", target="", ok=None, peak=None):
        result = "" if ok is None else ("pass" if ok else "FAIL")
        print(_row([name, f"{seconds:.3e}", f"{1 / seconds:,.0f}", ratio, target, result, _mb(peak)]))

    floor_name = f"floor: fused Adam, {tuple(work.head.memories.shape)}"
    line(floor_name, per_unit["floor"], "1.00")
    line("online step, batch 1", per_unit["step"], f"{step_ratio:.2f}", f"<={STEP_TARGET:g}",
         step_ratio <= STEP_TARGET, peaks["step"])  # fmt: skip
    line(f"nn.Linear eval, chunk {CHUNK}", per_unit["linear"], "1.00")
    line(f"Memory Head eval, chunk {CHUNK}", per_unit["head"], f"{eval_ratio:.2f}", f"<={EVAL_TARGET:g}",
         eval_ratio <= EVAL_TARGET, peaks["eval"])  # fmt: skip
    targets = {
        "euclidean": EVAL_TARGET, "per_neuron": PER_NEURON_TARGET, "per_neuron_euclidean": PER_NEURON_TARGET,
        "reference": None,
    }  # fmt: skip
    for variant, target in targets.items():
        ratio = per_unit[variant] / per_unit["linear"]
        ok = None if target is None else ratio <= target
        line(f"  {variant.replace('_', '-')} eval", per_unit[variant], f"{ratio:.2f}",
             "" if target is None else f"<={target:g}", ok)  # fmt: skip
    line(
        "  reference online step",
        per_unit["reference step"],
        f"{per_unit['reference step'] / per_unit['reference floor']:.2f}",
    )
    closed_form_rows(work, repeats, line)
    per_distribution = "/".join(str(STREAM_SHAPE[split]) for split in ("train", "val", "test"))
    shape = f"{distributions} distributions x {per_distribution}"
    if "skipped" in stream:
        print(f"stream ({shape}): skipped, {stream['skipped']}")
    else:
        target = STREAM_TARGET_S * distributions / STREAM_SHAPE["distributions"]
        ok = "pass" if stream["total_s"] < target else "FAIL"
        print(
            f"stream ({shape} train/val/test samples per distribution, runner.run): "
            f"{stream['total_s']:.1f} s (train {stream['train_s']:.1f} s, eval {stream['eval_s']:.1f} s); "
            f"target < {target:.0f} s: {ok}"
        )
    euclidean = streams["euclidean"]
    if "skipped" not in euclidean and "skipped" not in stream:
        ratio = euclidean["eval_s"] / stream["eval_s"]
        ok = "pass" if ratio <= EUCLIDEAN_STREAM_TARGET else "FAIL"
        print(
            f"stream with distance=euclidean: {euclidean['total_s']:.1f} s "
            f"(train {euclidean['train_s']:.1f} s, eval {euclidean['eval_s']:.1f} s = "
            f"{ratio:.2f}x the cosine stream's); "
            f"target <= {EUCLIDEAN_STREAM_TARGET:g}x: {ok}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
