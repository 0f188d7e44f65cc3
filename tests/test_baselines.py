"""The closed-form baselines on frozen features: nearest class mean (model=ncm) and streaming LDA
(model=slda). Exact updates against hand-computed and batch statistics, predictions against the
formula, the protocol's learn() hook, checkpoints, configuration errors."""

import numpy as np
import pytest
import torch
from conftest import REPO, compose_config

from memhead.models import MODELS, ClosedFormModel
from memhead.ncm import NearestClassMean
from memhead.protocol import run_protocol, xent_loss
from memhead.registry import ConfigError
from memhead.runner import check_config, make_optimizer_factory, run
from memhead.slda import StreamingLDA

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def random_stream(n=600, d=12, classes=5, seed=0):
    """Features with class structure and an uneven, interleaved class order (float32)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    centres = 3 * torch.randn(classes, d, generator=g)
    mixing = torch.randn(d, d, generator=g) / d**0.5  # a correlated, non-diagonal covariance
    x = centres[y] + torch.randn(n, d, generator=g) @ mixing + 0.5
    return x, y


def batch_statistics(x, y, classes):
    """Class means and the pooled within-class covariance of the whole stream, in float64 numpy."""
    x, y = x.double().numpy(), y.numpy()
    means = np.zeros((classes, x.shape[1]))
    for c in np.unique(y):
        means[c] = x[y == c].mean(0)
    deviations = x - means[y]
    return means, deviations.T @ deviations / len(y)


def learn_in_batches(model, x, y, sizes):
    start, i = 0, 0
    while start < len(y):
        stop = start + sizes[i % len(sizes)]
        model.learn(x[start:stop], y[start:stop])
        start, i = stop, i + 1


# --- NCM -----------------------------------------------------------------------------------------


def test_ncm_means_and_predictions_by_hand():
    model = NearestClassMean(2, 3)
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [4.0, 4.0]])
    y = torch.tensor([0, 0, 1, 1])
    for i in range(4):
        model.learn(x[i : i + 1], y[i : i + 1])
    assert model.means.tolist() == [[1.0, 0.0], [2.0, 4.0], [0.0, 0.0]]
    assert model.counts.tolist() == [2, 2, 0]
    logits = model(torch.tensor([[1.0, 1.0], [2.0, 3.0]]))
    # minus squared distances to (1, 0) and (2, 4); class 2 is unseen
    assert logits[:, :2].tolist() == [[-1.0, -10.0], [-10.0, -1.0]]
    assert torch.isinf(logits[:, 2]).all() and (logits[:, 2] < 0).all()


def test_ncm_cosine_and_normalize_by_hand():
    model = NearestClassMean(2, 2, metric="cosine", normalize=True)
    model.learn(torch.tensor([[3.0, 0.0], [0.0, 5.0]]), torch.tensor([0, 0]))
    model.learn(torch.tensor([[-2.0, 0.0]]), torch.tensor([1]))
    # means of the unit vectors: (0.5, 0.5) and (-1, 0)
    torch.testing.assert_close(model.means, torch.tensor([[0.5, 0.5], [-1.0, 0.0]]))
    logits = model(torch.tensor([[10.0, 0.0], [-1.0, 1.0]]))
    h = 0.5**0.5
    torch.testing.assert_close(logits, torch.tensor([[h, -1.0], [0.0, h]]))
    # without normalisation the raw mean (1.5, 2.5) is the class's centre
    raw = NearestClassMean(2, 2)
    raw.learn(torch.tensor([[3.0, 0.0], [0.0, 5.0]]), torch.tensor([0, 0]))
    assert raw.means[0].tolist() == [1.5, 2.5]


@pytest.mark.parametrize("sizes", [[1], [7], [1, 3, 16]])
def test_ncm_running_means_equal_the_batch_means(sizes):
    x, y = random_stream()
    model = NearestClassMean(x.shape[1], 5)
    learn_in_batches(model, x, y, sizes)
    means, _ = batch_statistics(x, y, 5)
    np.testing.assert_allclose(model.means.double().numpy(), means, rtol=1e-5, atol=1e-5)
    assert model.counts.tolist() == torch.bincount(y, minlength=5).tolist()
    expected = torch.cdist(x.double(), torch.from_numpy(means)).argmin(1)
    assert (model(x).argmax(1) == expected).float().mean() > 0.999


# --- SLDA ----------------------------------------------------------------------------------------


def test_slda_covariance_and_means_by_hand():
    model = StreamingLDA(2, 2)
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0], [1.0, 3.0]])
    y = torch.tensor([0, 1, 0, 1])
    for i in range(4):
        model.learn(x[i : i + 1], y[i : i + 1])
    # class means (1, 0) and (1, 2); deviations (-1, 0), (0, -1), (1, 0), (0, 1): S = 2 I, n = 4
    assert model.means.tolist() == [[1.0, 0.0], [1.0, 2.0]]
    assert model.scatter.tolist() == [[2.0, 0.0], [0.0, 2.0]]
    assert model.covariance().tolist() == [[0.5, 0.0], [0.0, 0.5]]
    # scores x^T L mu - mu^T L mu / 2 with L = 1 / (0.5 (1 - e) + e) I
    e = model.shrinkage
    p = 1 / (0.5 * (1 - e) + e)
    point = torch.tensor([[1.0, 1.5]])
    expected = torch.tensor([[p * 1.0 - p * 0.5, p * (1 + 3) - p * 2.5]])
    torch.testing.assert_close(model(point), expected)


@pytest.mark.parametrize("sizes", [[1], [5], [1, 2, 33]])
def test_slda_streaming_statistics_equal_the_batch_ones(sizes):
    x, y = random_stream()
    model = StreamingLDA(x.shape[1], 5)
    learn_in_batches(model, x, y, sizes)
    means, covariance = batch_statistics(x, y, 5)
    np.testing.assert_allclose(model.means.double().numpy(), means, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.covariance().double().numpy(), covariance, rtol=1e-4, atol=1e-5)
    assert int(model.scatter_count) == len(y)


def test_slda_scores_equal_the_lda_formula():
    x, y = random_stream(d=8)
    model = StreamingLDA(8, 5, shrinkage=0.05)
    learn_in_batches(model, x, y, [1])
    means, covariance = batch_statistics(x, y, 5)
    precision = np.linalg.inv(0.95 * covariance + 0.05 * np.eye(8))
    scores = x.double().numpy() @ precision @ means.T - 0.5 * np.einsum(
        "cd,de,ce->c", means, precision, means
    )
    np.testing.assert_allclose(model(x).double().numpy(), scores, rtol=1e-4, atol=1e-3)


def test_slda_hayes_kanan_recursion_equals_a_direct_reading_of_the_paper():
    x, y = random_stream(n=200, d=6)
    model = StreamingLDA(6, 5, covariance_update="hayes_kanan")
    learn_in_batches(model, x, y, [1, 4])  # batches are taken one sample at a time
    sigma, means, counts = np.zeros((6, 6)), np.zeros((5, 6)), np.zeros(5)
    for t, (xi, yi) in enumerate(zip(x.double().numpy(), y.numpy())):
        d = xi - means[yi]
        sigma = (t * sigma + t / (t + 1) * np.outer(d, d)) / (t + 1)
        means[yi] += d / (counts[yi] + 1)
        counts[yi] += 1
    np.testing.assert_allclose(model.covariance().double().numpy(), sigma, rtol=1e-4, atol=1e-5)
    exact = StreamingLDA(6, 5)
    learn_in_batches(exact, x, y, [1])
    assert not torch.allclose(exact.covariance(), model.covariance(), atol=1e-2)  # they do differ


def test_slda_precision_is_computed_only_when_an_evaluation_needs_it(monkeypatch):
    x, y = random_stream(n=50, d=4)
    model = StreamingLDA(4, 5)
    calls = []
    cholesky = torch.linalg.cholesky
    monkeypatch.setattr(torch.linalg, "cholesky", lambda a: calls.append(1) or cholesky(a))
    learn_in_batches(model, x, y, [1])
    assert calls == []  # fifty updates, no factorisation
    first = model(x)
    model.eval()
    with torch.inference_mode():
        second = model(x)
    assert len(calls) == 1 and torch.equal(first, second)
    model.learn(x[:1], y[:1])
    model(x)
    assert len(calls) == 2


def test_slda_fixed_covariance_learns_on_the_first_distribution_only():
    x, y = random_stream(n=300, d=6)
    model = StreamingLDA(6, 5, streaming_covariance=False)
    learn_in_batches(model, x[:100], y[:100], [1])
    model.end_distribution()
    factor_before = (model(x), model._factor)[1]
    learn_in_batches(model, x[100:], y[100:], [1])
    model(x)
    assert model._factor is factor_before  # the covariance did not move: no new factorisation
    _, first_covariance = batch_statistics(x[:100], y[:100], 5)
    means, _ = batch_statistics(x, y, 5)
    np.testing.assert_allclose(model.covariance().double().numpy(), first_covariance, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.means.double().numpy(), means, rtol=1e-5, atol=1e-5)
    # the freeze is state: it travels in state_dict
    copy = StreamingLDA(6, 5, streaming_covariance=False)
    copy.load_state_dict(model.state_dict())
    copy.learn(x[:5], y[:5])
    assert torch.equal(copy.scatter, model.scatter)


@pytest.mark.parametrize("make", [lambda: NearestClassMean(6, 5), lambda: StreamingLDA(6, 5)])
def test_state_dict_carries_everything_and_loading_refreshes_predictions(make):
    x, y = random_stream(n=200, d=6)
    trained, other = make(), make()
    learn_in_batches(trained, x, y, [1])
    learn_in_batches(other, x[:40], y[:40], [1])
    other(x)  # builds any cache from the old statistics
    other.load_state_dict(trained.state_dict())
    assert torch.equal(other(x), trained(x))
    assert list(trained.parameters()) == []
    assert all(torch.equal(trained.state_dict()[k], other.state_dict()[k]) for k in trained.state_dict())


def test_unseen_classes_are_never_predicted():
    x, y = random_stream(n=100, d=4)
    for model in (NearestClassMean(4, 5), StreamingLDA(4, 5)):
        keep = y < 2
        model.learn(x[keep], y[keep])
        assert set(model(x).argmax(1).tolist()) <= {0, 1}


@CUDA
@pytest.mark.parametrize("make", [NearestClassMean, StreamingLDA])
def test_cuda_equals_cpu(make):
    x, y = random_stream(d=8)
    cpu, gpu = make(8, 5), make(8, 5).cuda()
    learn_in_batches(cpu, x, y, [1, 3])
    learn_in_batches(gpu, x.cuda(), y.cuda(), [1, 3])
    torch.testing.assert_close(gpu.means.cpu(), cpu.means, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-4, atol=1e-3)


# --- through the protocol and the runner ---------------------------------------------------------


def test_protocol_calls_learn_and_evaluates_like_any_model(tiny_cfg):
    from competitors import build_competitor
    from data.stream import Stream, to_stream

    arrays = {}
    x, y = random_stream(n=300, d=4, classes=3)
    dist = torch.arange(300) // 100  # three distributions, one class each
    y = dist.clone()
    for split in ("train", "val", "test"):
        arrays.update(
            {f"X_{split}": x.numpy(), f"y_{split}": y.numpy(), f"distributions_{split}": dist.numpy()}
        )
    stream: Stream = to_stream(arrays, torch.device("cpu"), source="test")
    model = StreamingLDA(4, 3)
    competitor = build_competitor(
        {"name": "none"},
        loss_fn=xent_loss,
        make_optimizer=None,
        num_classes=3,
        device=torch.device("cpu"),
        generator=torch.Generator(),
    )
    result = run_protocol(model, None, competitor, stream, xent_loss)
    reference = StreamingLDA(4, 3)
    for i in range(100):  # the first distribution alone, then its evaluation
        reference.learn(x[i : i + 1], y[i : i + 1])
    first = (reference(x[:100]).argmax(1) == y[:100]).float().mean().item()
    assert result.ccm["test"][0, 0] == pytest.approx(first)
    assert int(result.model.scatter_count) == 300 and result.optimizer is None


def test_no_optimizer_when_nothing_is_trainable():
    make = make_optimizer_factory(compose_config().optimizer)
    assert make(NearestClassMean(2, 2)) is None
    assert isinstance(make(torch.nn.Linear(2, 2)), torch.optim.Adam)
    assert issubclass(type(MODELS.get("slda")(compose_config(["model=slda"]).model, 3, 2)), ClosedFormModel)


@pytest.mark.parametrize("competitor", ["er_reservoir", "gdumb", "agem", "mir", "ensemble"])
def test_gradient_competitors_refuse_closed_form_models(competitor):
    with pytest.raises(ConfigError, match=f"competitor={competitor} trains by gradients.*model=ncm"):
        check_config(compose_config(["model=ncm", f"competitor={competitor}"]))


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1"])
def test_bad_shrinkage_is_one_line(value):
    with pytest.raises(ConfigError, match=r"model.shrinkage must be a number in \(0, 1\]") as err:
        check_config(compose_config(["model=slda", f"model.shrinkage={value}"]))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["model=ncm", "model.metric=manhattan"], ["model.metric", "euclidean", "cosine"]),
        (["model=slda", "model.covariance_update=other"], ["model.covariance_update", "hayes_kanan"]),
        (["model=slda", "model.shrinkage=2"], ["model.shrinkage", "(0, 1]"]),
        (["model=slda", "competitor=er_reservoir"], ["competitor=er_reservoir", "competitor=none"]),
    ],
)
def test_bad_input_on_the_command_line_is_one_clear_line(args, expected, tmp_path):
    from test_config import run_cli

    proc = run_cli(*args, f"hydra.run.dir={tmp_path}", "progress=false")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out, out
    assert len([line for line in out.splitlines() if line.strip()]) <= 5, out
    assert all(word in out for word in expected), out


@pytest.mark.parametrize("model", ["ncm", "slda"])
def test_runs_end_to_end_with_plots_and_the_seed_changes_nothing(model, tiny_cfg, tmp_path):
    first = run(tiny_cfg(f"model={model}", "plots.enabled=true", "seed=1"), tmp_path / "a")
    second = run(tiny_cfg(f"model={model}", "seed=2"), tmp_path / "b")
    assert first["complete"] and first["ccm"] == second["ccm"]  # deterministic given the stream
    assert (tmp_path / "a" / "plots" / "surface.png").is_file()


@pytest.mark.parametrize(
    "overrides", [["model=slda", "model.streaming_covariance=false"], ["model=ncm", "model.metric=cosine"]]
)
def test_resume_from_a_boundary_equals_an_uninterrupted_run(overrides, tiny_cfg, tmp_path, monkeypatch):
    from memhead import loggers

    cfg = tiny_cfg(*overrides)
    reference = run(cfg, tmp_path / "reference")
    for k in (0, 4):

        def log_boundary(self, i, row, *args, k=k, **kwargs):
            if i == k:
                raise KeyboardInterrupt

        monkeypatch.setattr(loggers.NullLogger, "log_boundary", log_boundary)
        with pytest.raises(KeyboardInterrupt):
            run(cfg, tmp_path / f"cut{k}")
        monkeypatch.undo()
        resumed = run(cfg, tmp_path / f"cut{k}")
        assert resumed["ccm"] == reference["ccm"], k


@pytest.mark.parametrize("model", ["ncm", "slda"])
def test_ns_imagenet_presets_compose(model):
    cfg = compose_config([f"experiment=ns_imagenet_{model}"])
    assert cfg.model.name == model and cfg.benchmark.name == "ns_imagenet"
    assert (REPO / "conf" / "experiment" / f"ns_imagenet_{model}.yaml").is_file()
