"""The online protocol: hook order, boundaries, prefix coverage of val, hand-checked accuracies."""

import numpy as np
import pytest
import torch
from torch import nn

from competitors.base import Competitor
from data.stream import to_stream
from memhead.protocol import hinge_loss, run_protocol, xent_loss


def make_stream(train_dist, val_dist, test_dist):
    def split(dist, offset):
        n = len(dist)
        # x[0] > 0 <=> label 1; every third sample has its label flipped so accuracies are not trivial.
        x = np.stack([np.linspace(-1, 1, n) + offset, np.zeros(n)], axis=1)
        y = (x[:, 0] > 0).astype(np.int64)
        y[::3] = 1 - y[::3]
        return x, y, np.asarray(dist)

    arrays = {}
    for name, dist, offset in (
        ("train", train_dist, 0.05),
        ("val", val_dist, 0.01),
        ("test", test_dist, 0.02),
    ):
        x, y, d = split(dist, offset)
        arrays.update({f"X_{name}": x, f"y_{name}": y, f"distributions_{name}": d})
    return to_stream(arrays, torch.device("cpu")), arrays


class Recorder(Competitor):
    """Records the order in which the loop calls the hooks."""

    def __init__(self, model):
        super().__init__(
            {},
            loss_fn=xent_loss,
            make_optimizer=None,
            num_classes=2,
            device=torch.device("cpu"),
            generator=torch.Generator(),
        )
        self.model = model
        self.events = []
        self.seen = 0

    def after_backward(self, model, optimizer, x, y):
        grad = model.weight.grad
        self.events.append(("after_backward", len(x), grad is not None and bool(grad.abs().sum() > 0)))
        self.before = model.weight.detach().clone()

    def after_step(self, x, y):
        self.seen += len(x)
        changed = not torch.equal(self.before, self.model.weight)
        self.events.append(("after_step", len(x), changed))

    def at_boundary(self, model, optimizer):
        self.events.append(("at_boundary", self.seen))


def plain_training():
    """``competitor=none``: the loop's own training step only."""
    return Competitor(
        {},
        loss_fn=xent_loss,
        make_optimizer=None,
        num_classes=2,
        device=torch.device("cpu"),
        generator=torch.Generator(),
    )


def sign_model():
    """Predicts class 1 when x[0] > 0: known accuracies on the stream above."""
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        model.bias.zero_()
    return model


def expected_accuracy(arrays, name):
    x, y, d = arrays[f"X_{name}"], arrays[f"y_{name}"], arrays[f"distributions_{name}"]
    hit = ((x[:, 0] > 0).astype(int) == y).astype(float)
    return np.array([hit[d == j].mean() for j in range(d.max() + 1)])


def test_hooks_run_in_order_and_boundaries_follow_the_train_split():
    stream, _ = make_stream([0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 0, 1], [0, 1, 2])
    model = sign_model()
    rec = Recorder(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result = run_protocol(model, opt, rec, stream, xent_loss)
    assert [e[1] for e in rec.events if e[0] == "at_boundary"] == [3, 5, 9]
    steps = [e for e in rec.events if e[0] != "at_boundary"]
    assert [e[0] for e in steps] == ["after_backward", "after_step"] * 9
    assert all(e[2] for e in steps if e[0] == "after_backward")  # gradients exist before the step
    assert all(e[2] for e in steps if e[0] == "after_step")  # the step changed the weights
    assert [b["index"] for b in result.boundaries] == [0, 1, 2]


def test_confusion_matrices_hold_hand_computed_accuracies_and_val_covers_a_prefix():
    stream, arrays = make_stream([0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 0, 1, 1], [0, 0, 1, 2, 2, 2])
    model = sign_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # a frozen model: every row is the same
    result = run_protocol(
        model,
        opt,
        plain_training(),
        stream,
        xent_loss,
        chunk_size=2,
    )
    for name in ("train", "val", "test"):
        acc = expected_accuracy(arrays, name)
        assert result.ccm[name].shape == (len(acc), len(acc))
        for row in result.ccm[name]:
            np.testing.assert_allclose(row, acc)
    # val has 2 distributions: after boundary 2 it keeps the metrics of boundary 1.
    last = result.boundaries[-1]
    assert last["val"]["boundary"] == 1 and last["test"]["boundary"] == 2
    assert result.final["val"] == result.boundaries[1]["val"]
    acc = expected_accuracy(arrays, "test")
    assert result.final["test"]["avg_accuracy"] == pytest.approx(acc.mean())
    # forward transfer after boundary 2 = 2/(3*2) * (R01 + R02 + R12)
    assert result.final["test"]["forward_transfer"] == pytest.approx((acc[1] + acc[2] + acc[2]) / 3)


def test_unfilled_rows_are_nan_until_their_boundary():
    stream, _ = make_stream([0, 0, 1, 1], [0, 0], [0, 1])
    boundaries_seen = []
    model = sign_model()

    def on_boundary(i, row, *_):
        boundaries_seen.append((i, row["val"]["boundary"]))

    result = run_protocol(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        plain_training(),
        stream,
        xent_loss,
        on_boundary=on_boundary,
    )
    assert boundaries_seen == [(0, 0), (1, 0)]
    assert result.ccm["val"].shape == (1, 1)


def test_batches_never_cross_a_boundary():
    stream, _ = make_stream([0] * 5 + [1] * 3 + [2] * 4, [0], [0])
    model = sign_model()
    rec = Recorder(model)
    run_protocol(model, torch.optim.SGD(model.parameters(), lr=0.1), rec, stream, xent_loss, batch_size=4)
    sizes = [e[1] for e in rec.events if e[0] == "after_step"]
    assert sizes == [4, 1, 3, 4]


def test_hinge_loss_is_the_papers_sum():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.5, 0.25, 1.0]])
    y = torch.tensor([0, 1])
    # t = [[1,-1,-1],[-1,1,-1]]; max(0, -t*o) = [[0,0,0.5],[0,0,1.0]] -> 1.5
    assert hinge_loss(logits, y).item() == pytest.approx(1.5)


def weak_inverted_sign_model():
    """Predicts the opposite of :func:`sign_model`, weakly enough for the first distribution to change it."""
    model = sign_model()
    with torch.no_grad():
        model.weight.mul_(-0.1)
    return model


def test_the_untrained_model_is_evaluated_once_before_the_first_sample():
    stream, arrays = make_stream([0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 0, 1, 1], [0, 0, 1, 2, 2, 2])
    model = weak_inverted_sign_model()
    result = run_protocol(
        model, torch.optim.SGD(model.parameters(), lr=0.5), plain_training(), stream, xent_loss
    )
    for name in ("train", "val", "test"):
        # Before training the model predicts the opposite of the sign model: known accuracies.
        np.testing.assert_allclose(result.initial[name], 1 - expected_accuracy(arrays, name))
    R, b = result.ccm["test"], result.initial["test"]
    assert not np.allclose(R[0], b)  # training changed the model, so the baseline is not row 0
    assert result.final["test"]["forward_transfer_gem"] == pytest.approx(
        ((R[0, 1] - b[1]) + (R[1, 2] - b[2])) / 2
    )


def test_a_resumed_state_keeps_the_untrained_baseline():
    stream, _ = make_stream([0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 0, 1, 1], [0, 0, 1, 2, 2, 2])

    def fresh():
        model = weak_inverted_sign_model()
        return model, torch.optim.SGD(model.parameters(), lr=0.5)

    model, opt = fresh()
    reference = run_protocol(model, opt, plain_training(), stream, xent_loss)

    saved = {}

    class Stop(Exception):
        pass

    def stop_after_first(i, row, model, optimizer, state):
        saved.update(model=model.state_dict(), opt=optimizer.state_dict(), state=state.state_dict())
        raise Stop

    model, opt = fresh()
    with pytest.raises(Stop):
        run_protocol(model, opt, plain_training(), stream, xent_loss, on_boundary=stop_after_first)
    from memhead.protocol import ProtocolState

    model, opt = fresh()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    # Evaluating the (now trained) model again on resume would give another baseline.
    assert not np.array_equal(np.asarray(saved["state"]["ccm"]["test"][0]), reference.initial["test"])
    resumed = run_protocol(
        model, opt, plain_training(), stream, xent_loss, state=ProtocolState.from_state_dict(saved["state"])
    )
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(resumed.initial[name], reference.initial[name])
    assert resumed.final == reference.final
