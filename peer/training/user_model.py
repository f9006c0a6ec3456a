"""A model of the user's own, ``model = "package.module:factory"``: built, checked, identified.

The factory is called as ``factory(input_shape, num_classes)`` (``input_shape`` without the
batch dimension) and must return an ``nn.Module`` whose output for a batch of B examples is
[B, num_classes] logits. :func:`build_user_model` refuses, with :class:`ModelFactoryError`
naming the reason, everything DP-SGD cannot train exactly, before the peer connects:

* a factory that does not import, raises, or returns something other than a module;
* a layer that normalises with the batch's statistics (BatchNorm; InstanceNorm with running
  statistics): one example's output, and so its "per-example" gradient, would depend on the
  other examples of the batch, and clipping it would bound nothing. GroupNorm and LayerNorm
  normalise each example on its own and are the suggested replacements;
* any other model whose output for one example changes with the rest of its batch (checked
  on a dry run with two random examples, alone and together);
* a model whose per-example gradients no engine can compute.

Security property: the factory runs under a fixed torch seed, so whatever it draws is the
same on every peer; the trainer then re-draws every Linear and ConvNd from the network's seed
(``models.seeded_init``). Every peer of a network therefore starts from the same weights, and
the model id carries a digest of the architecture (:func:`architecture_digest`) besides the
digest of those weights, so peers with different models never group.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections import Counter

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from peer.errors import PeerError
from peer.training.dpsgd import GhostClipEngine, UnsupportedModelError, VmapEngine
from peer.training.import_path import ImportPathError, load_callable

#: The torch seed a factory runs under: the same on every peer, so a factory that draws
#: (a custom layer's init) builds the same weights everywhere.
FACTORY_SEED = 0
#: Examples in the dry run: two, so that mixing between examples can show.
DRY_RUN_BATCH = 2
#: Outputs of one example alone and in a batch may differ by float rounding only.
MIXING_TOLERANCE = 1e-4


class ModelFactoryError(PeerError, ValueError):
    """A user's model factory or the model it built cannot be trained with DP-SGD; the
    message names the factory, the reason and, where there is one, the fix."""


def build_user_model(path: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The checked module ``path``'s factory builds for ``input_shape`` and ``num_classes``."""
    try:
        factory = load_callable(path, "model")
    except ImportPathError as exc:
        raise ModelFactoryError(str(exc)) from exc
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FACTORY_SEED)
        try:
            model = factory(tuple(input_shape), num_classes)
        except Exception as exc:  # the user's code: any error becomes one typed error
            raise ModelFactoryError(f"model: factory {path!r} raised {type(exc).__name__}: "
                                    f"{exc}") from exc
        if not isinstance(model, nn.Module):
            raise ModelFactoryError(f"model: factory {path!r} returned a "
                                    f"{type(model).__name__}, not a torch.nn.Module")
        refuse_batch_statistics(model, path)
        _check_outputs(model, path, tuple(input_shape), num_classes)
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelFactoryError(f"model: {path!r} has no trainable parameters")
    return model


def refuse_batch_statistics(model: nn.Module, path: str) -> None:
    """ModelFactoryError for a layer that normalises with statistics of the whole batch."""
    for name, module in model.named_modules():
        mixes = isinstance(module, _BatchNorm) or (
            isinstance(module, _InstanceNorm) and module.track_running_stats)
        if mixes:
            raise ModelFactoryError(
                f"model: {path!r} has {type(module).__name__} at {name or 'the top'!r}: it "
                "normalises each example with statistics of the whole batch, so per-example "
                "gradients are not defined and DP-SGD cannot clip them; use nn.GroupNorm "
                "(or nn.LayerNorm), which normalises each example on its own")


def _dry_inputs(input_shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(FACTORY_SEED)
    return torch.randn((DRY_RUN_BATCH, *input_shape), generator=generator)


def _check_outputs(model: nn.Module, path: str, input_shape: tuple[int, ...],
                   num_classes: int) -> None:
    """Run two random examples together and alone: the output must be [2, num_classes],
    finite, and each row a function of its own example only."""
    x = _dry_inputs(input_shape)
    training = model.training
    model.eval()  # random layers (dropout) are off, so only mixing can change a row
    try:
        with torch.no_grad():
            together = model(x)
            alone = torch.cat([model(x[i:i + 1]) for i in range(DRY_RUN_BATCH)])
    except Exception as exc:
        raise ModelFactoryError(
            f"model: {path!r} failed on a batch of inputs of shape "
            f"{(DRY_RUN_BATCH, *input_shape)}: {type(exc).__name__}: {exc}") from exc
    finally:
        model.train(training)
    expected = (DRY_RUN_BATCH, num_classes)
    if not isinstance(together, torch.Tensor) or tuple(together.shape) != expected:
        shown = tuple(together.shape) if isinstance(together, torch.Tensor) else type(together)
        raise ModelFactoryError(f"model: {path!r} returned {shown} for a batch of "
                                f"{DRY_RUN_BATCH}; expected logits of shape {expected}")
    if not bool(torch.isfinite(together).all()):
        raise ModelFactoryError(f"model: {path!r} gave non-finite outputs on the dry run")
    if not torch.allclose(together, alone, atol=MIXING_TOLERANCE, rtol=MIXING_TOLERANCE):
        raise ModelFactoryError(
            f"model: {path!r} gives an example a different output alone than in a batch: "
            "one example's output depends on the others (a batch statistic, or an operation "
            "across the batch dimension), so per-example gradients are not defined")


def engine_for(model: nn.Module, input_shape: tuple[int, ...]) -> str:
    """The engine that computes this model's per-example gradients exactly: ``"ghost"``
    when every trainable layer is one the fast engine knows and each runs exactly once per
    forward pass (its hooks keep one input per layer), ``"vmap"`` (the general engine)
    otherwise. ModelFactoryError when the general engine cannot either."""
    try:
        GhostClipEngine(copy.deepcopy(model))  # on a copy: the engine hooks the layers
        ghost_refusal = None
    except UnsupportedModelError as exc:
        ghost_refusal = str(exc)
    if ghost_refusal is None and _layers_run_once(model, input_shape):
        return "ghost"
    x = _dry_inputs(input_shape)
    try:
        VmapEngine(model).per_example_flat(x, torch.zeros(DRY_RUN_BATCH, dtype=torch.long))
    except Exception as exc:
        hint = (" (dropout and other random layers: the general engine, torch.func.vmap, "
                "refuses randomness; remove them)" if "randomness" in str(exc) else "")
        raise ModelFactoryError(
            f"model: no engine computes its per-example gradients: the fast engine "
            f"refuses it ({ghost_refusal or 'a layer runs more than once'}) and the general "
            f"engine failed: {type(exc).__name__}: {exc}{hint}") from exc
    return "vmap"


def _layers_run_once(model: nn.Module, input_shape: tuple[int, ...]) -> bool:
    """Whether each Linear / Conv2d with trainable parameters runs exactly once per forward."""
    calls: Counter[int] = Counter()
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)
              and any(p.requires_grad for p in m.parameters(recurse=False))]
    handles = [m.register_forward_hook(lambda mod, _i, _o: calls.update([id(mod)]))
               for m in layers]
    try:
        with torch.no_grad():
            model(_dry_inputs(input_shape))
    finally:
        for handle in handles:
            handle.remove()
    return all(calls[id(m)] == 1 for m in layers)


def choose_engine(model: nn.Module, input_shape: tuple[int, ...], requested: str, path: str
                  ) -> str:
    """The engine a user model trains with: ``requested`` unless it is ``"auto"``
    (then :func:`engine_for`); ModelFactoryError for ``"ghost"`` on a model it cannot handle
    exactly."""
    needed = engine_for(model, input_shape)
    if requested == "ghost" and needed != "ghost":
        raise ModelFactoryError(f"model: {path!r} needs the general engine (engine = 'vmap' "
                                "or 'auto'): the fast engine cannot compute its per-example "
                                "gradients exactly")
    return needed if requested == "auto" else requested


def architecture_digest(model: nn.Module) -> str:
    """8 hex digits of BLAKE2b over the module tree (its repr: every layer and setting) and
    every parameter's and buffer's name and shape."""
    lines = [repr(model)]
    lines += [f"p {name} {tuple(p.shape)} {p.requires_grad}"
              for name, p in model.named_parameters()]
    lines += [f"b {name} {tuple(b.shape)}" for name, b in model.named_buffers()]
    return hashlib.blake2b("\n".join(lines).encode(), digest_size=4).hexdigest()


def user_model_base_id(path: str, model: nn.Module, param_count: int) -> str:
    """The model-id base of a user model: the factory's name (for people reading logs), the
    architecture digest and the parameter count."""
    short = re.sub(r"[^A-Za-z0-9_-]", "-", path.rpartition(":")[2])[-24:]
    return f"{short}-{architecture_digest(model)}-{param_count}"
