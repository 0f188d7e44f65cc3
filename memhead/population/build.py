"""A population's model and optimizer, built from the runs' own learners (their exact initial state)."""

from __future__ import annotations

import torch
from torch import nn

from memhead.layer import check_options
from memhead.models import head_options
from memhead.population.models import (
    MH_MEMBER_OPTIONS,
    PopulationEnsemble,
    PopulationLinear,
    PopulationMemoryHead,
    PopulationModule,
    PopulationSequential,
)
from memhead.population.optim import PopulationAdam, PopulationSGD


def _base_model(cfgs, in_features: int, num_classes: int, generators) -> PopulationModule:
    """The population of ``len(cfgs)`` plain models (one per config, all of one shape)."""
    model_cfg = cfgs[0].model
    size = len(cfgs)
    if model_cfg.name == "lp":
        return PopulationLinear(size, in_features, num_classes, model_cfg.bias)
    if model_cfg.name == "mlp":
        return PopulationSequential(
            [
                (0, PopulationLinear(size, in_features, model_cfg.hidden, model_cfg.bias)),
                (1, nn.Tanh()),
                (2, PopulationLinear(size, model_cfg.hidden, num_classes, model_cfg.bias)),
            ]
        )
    hidden = model_cfg.hidden
    head_in = in_features if hidden is None else hidden
    options = [check_options(head_in, num_classes, bias=c.model.bias, **head_options(c.model)) for c in cfgs]
    scalars = [{name: o[name] for name in MH_MEMBER_OPTIONS} for o in options]
    head = PopulationMemoryHead(size, options[0], scalars, generators)
    if hidden is None:
        return head
    return PopulationSequential(
        [(0, PopulationLinear(size, in_features, hidden, model_cfg.bias)), (1, nn.Tanh()), (2, head)]
    )


def build_model(cfgs, learners, in_features: int, num_classes: int, device, generators) -> PopulationModule:
    """The population of the learners' models, holding each learner's initial state."""
    k = cfgs[0].competitor.members if cfgs[0].competitor.name == "ensemble" else 1
    expanded = [cfg for cfg in cfgs for _ in range(k)]
    expanded_generators = [g for g in generators for _ in range(k)]
    model = _base_model(expanded, in_features, num_classes, expanded_generators)
    if k > 1 or cfgs[0].competitor.name == "ensemble":
        model = PopulationEnsemble(model, k)
    model = model.to(device)
    model.load_members([learner.model.state_dict() for learner in learners])
    return model


def build_optimizer(cfgs, model: PopulationModule):
    """Adam or SGD over the population's parameters, with each member's lr and weight decay."""
    k = getattr(model, "k", 1)  # ensemble: every sub-model of a member takes the member's values
    lr = [float(c.optimizer.lr) for c in cfgs for _ in range(k)]
    weight_decay = [float(c.optimizer.weight_decay) for c in cfgs for _ in range(k)]
    params = [p for p in model.parameters() if p.requires_grad]
    name = cfgs[0].optimizer.name
    if name == "adam":
        return PopulationAdam(params, lr, weight_decay)
    if name == "sgd":
        return PopulationSGD(params, lr, weight_decay, momentum=cfgs[0].optimizer.momentum)
    raise ValueError(f"optimizer={name} has no population version")


def member_generator(device: torch.device) -> torch.Generator:
    """A copy of the global RNG as it is now (what the run alone draws fresh memories from)."""
    generator = torch.Generator(device=device)
    state = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
    generator.set_state(state)
    return generator
