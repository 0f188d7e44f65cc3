"""Experience Replay for a population: each member keeps the buffer and generator of its run alone.

The members' own :class:`~competitors.er.ERReservoir` / ``ERRandom`` objects (built by
:func:`memhead.runner.build_learner` for each member) keep their buffers' bookkeeping and draw, each
from its own generator, the replay slots and storage choices in the order its run alone draws them:
slots after the stream batch's backward, storage after the step. The stored tensors are the
population's, ``(P, size, ...)``, and each member's buffer holds views of its rows, so one gather
reads every member's replay batch and one write stores every member's samples.
"""

from __future__ import annotations

import torch

from competitors.er import ERReservoir


class MemberReplay:
    """The replay of every member at once (``None`` from :meth:`of` when the members do not replay)."""

    def __init__(self, competitors: list[ERReservoir]) -> None:
        self.competitors = competitors
        self.buffers = [competitor.buffer for competitor in competitors]
        self.batch_size = competitors[0].cfg.buffer_batch_size
        self.rows = torch.arange(len(competitors), device=self.buffers[0].device)[:, None]
        self.labels: torch.Tensor | None = None  # (P, size): every member's stored labels
        self.inputs: torch.Tensor | None = None  # (P, size, ...): allocated at the first stored input

    @classmethod
    def of(cls, competitors: list) -> MemberReplay | None:
        if not isinstance(competitors[0], ERReservoir):
            return None
        return cls(competitors)

    def _bind(self, x: torch.Tensor | None) -> None:
        """Stack the members' stored tensors (a resumed buffer holds some) and point each buffer at
        its rows. ``x``: an incoming batch, to allocate inputs that no buffer holds yet."""
        if self.labels is None:
            self.labels = torch.stack([buffer.labels for buffer in self.buffers])
            for buffer, row in zip(self.buffers, self.labels):
                buffer.labels = row
        if self.inputs is None:
            if self.buffers[0].inputs is not None:
                self.inputs = torch.stack([buffer.inputs for buffer in self.buffers])
            elif x is not None:  # as ReplayBuffer.write allocates
                buffer = self.buffers[0]
                self.inputs = torch.zeros((len(self.buffers), buffer.size, *x.shape[1:]), dtype=x.dtype,
                                          device=buffer.device)  # fmt: skip
            else:
                return
            for buffer, row in zip(self.buffers, self.inputs):
                buffer.inputs = row

    def sample(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Each member's replay batch, stacked: ``(P, r, ...)`` inputs and ``(P, r)`` labels (or ``None``).

        Every member's buffer has seen the same samples, so all hold the same number of valid slots and
        draw batches of the same size ``r``.
        """
        slots = [
            buffer.sample_slots(self.batch_size, c.generator)
            for buffer, c in zip(self.buffers, self.competitors)
        ]
        if len(slots[0]) == 0:
            return None
        for competitor in self.competitors:
            competitor.replayed += len(slots[0])
        self._bind(None)
        slots = torch.stack(slots).to(self.rows.device)
        return self.inputs[self.rows, slots], self.labels[self.rows, slots]

    def store(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Offer the step's samples to every member's buffer (after the step, as the run alone does)."""
        x, y = x.detach(), y.detach()
        labels = y.tolist()
        written: dict[tuple[int, int], int] = {}  # (member, slot) -> the batch row stored there last
        for member, (buffer, competitor) in enumerate(zip(self.buffers, self.competitors)):
            for i, label in enumerate(labels):
                slot = buffer.offer(label, competitor.generator)
                if slot is not None:
                    written[member, slot] = i
        if not written:
            return
        self._bind(x)
        members, slots = (torch.tensor(v, device=self.rows.device) for v in zip(*written))
        batch_rows = torch.tensor(list(written.values()), device=x.device)
        self.inputs[members, slots] = x[batch_rows]
        self.labels[members, slots] = y[batch_rows]
