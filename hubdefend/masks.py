"""Neuron masks applied through removable forward hooks.

`NeuronMasks` holds, per `NeuronGroup`, a mask ``m`` (init 1) and optionally ANP's perturbation pair
(``delta`` on the scale, ``xi`` on the shift), all trainable parameters of one module that Accelerate
can prepare. `attach` registers one hook per group so that each layer computes exactly

    norm(x; gamma * (m + delta), beta * (1 + xi))

before any fused activation. With ``y = gamma * x_hat + beta`` the layer's affine output, that is
``y' = s * y + (1 + xi - s) * beta`` with ``s = m + delta``; written this way, ``s = 1, xi = 0``
gives back ``y`` bit for bit. For ``mlp`` and ``head`` units (no shift) it is ``y' = s * y`` on the
projection's input. Hooks never touch the state_dict, so detaching restores the model exactly,
the way ``torch.nn.utils.prune.remove`` leaves plain weights behind.

Plain norm layers (torch's BatchNorm/InstanceNorm, LayerNorm, GroupNorm and their subclasses, such
as timm's BatchNormAct2d and LayerNorm2d) get the same formula more cheaply: a pre-hook swaps
``gamma * s`` and ``beta * (1 + xi)`` in for the layer's own forward and a post-hook swaps the
parameters back, as ``torch.func.functional_call`` does. The layer's own kernel then applies the
mask, with no extra pass over the activations (an output hook cost ResNet-18 about 19% of a
forward+backward on CPU; see benchmarks/hook_overhead.py).

MLP units, heads and attention channels on a plain ``nn.Linear`` projection get the same idea: while
attached, the projection's ``forward`` is one autograd function computing ``x @ (W * s).T + b``.
Scaling the weight's columns costs ``out x in`` multiplies instead of a pass over the 4x-wide hidden
activation, and its backward takes the mask's gradient from the input gradient it computes anyway
(``sum_n x_n * (dy_n @ W)``), not from the frozen weight's gradient, a matmul as large as the forward.
The module's hooks still run; detaching deletes the replacement (Accelerate's ``add_hook_to_module``
swaps ``forward`` the same way). On the ViT at 2 threads it cut the MLP units' overhead from about
9% to 6% of a forward+backward, the default's (MLP units + attention channels) from 9% to 8%
(benchmarks/hook_overhead.py: what remains is the backward's two passes).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from hubdefend.errors import MaskError
from hubdefend.neurons import NeuronGroup


class NeuronMasks(nn.Module):
    """Masks (and optional ANP perturbations) for a list of neuron groups.

    Args:
        groups: the groups to mask, usually from `hubdefend.adapters.discover`.
        perturbation: also create ``delta`` and ``xi`` (zero-initialised) for ANP-style noise.
    """

    def __init__(self, groups: Sequence[NeuronGroup], *, perturbation: bool = False) -> None:
        super().__init__()
        if not groups:
            raise MaskError(
                "No neuron groups to mask: discover(model) found none, or an empty list was given."
            )
        self.groups = list(groups)
        self.mask = nn.ParameterList(nn.Parameter(torch.ones(g.num_neurons)) for g in self.groups)
        self.has_perturbation = perturbation
        if perturbation:
            self.delta = nn.ParameterList(nn.Parameter(torch.zeros(g.num_neurons)) for g in self.groups)
            self.xi = nn.ParameterList(nn.Parameter(torch.zeros(g.num_neurons)) for g in self.groups)
        # Perturbation is applied only while enabled, so one module serves the clean and noisy passes;
        # while bypassed the hooks change nothing, so the same module also serves the original model.
        self.perturbing = False
        self.bypassed = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    # -- values ---------------------------------------------------------------------------------
    def scale_and_shift(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The per-neuron scale ``m + delta`` and shift factor ``xi`` (None when unperturbed)."""
        scale = self.mask[index]
        if self.perturbing and self.has_perturbation:
            return scale + self.delta[index], self.xi[index]
        return scale, None

    def mask_values(self) -> dict[str, torch.Tensor]:
        """Detached copies of the masks, keyed by group name."""
        return {g.name: m.detach().clone() for g, m in zip(self.groups, self.mask, strict=True)}

    def perturbations(self) -> Iterator[nn.Parameter]:
        """The perturbation parameters (``delta`` then ``xi``), for the adversarial step. ``xi`` of a
        group without a shift (MLP units, heads, attention channels) is left out: it has no effect, hence no gradient."""
        if not self.has_perturbation:
            return iter(())
        shifts = [xi for g, xi in zip(self.groups, self.xi, strict=True) if g.beta is not None]
        return iter([*self.delta, *shifts])

    @torch.no_grad()
    def reset_perturbation(self, eps: float = 0.0, *, generator: torch.Generator | None = None) -> None:
        """Set ``delta`` and ``xi`` to zero, or uniform in [-eps, eps] (ANP's random start)."""
        for param in self.perturbations():
            if eps > 0:
                noise = torch.rand(param.shape, generator=generator, dtype=param.dtype)
                param.copy_((2 * noise - 1).mul_(eps))
            else:
                param.zero_()

    def adversarial_perturbation(
        self, loss_of, *, eps: float, steps: int = 1, generator=None, backward=torch.Tensor.backward
    ) -> None:
        """ANP's neuron noise, shared by ANP, CNP and target inference: a random start in
        [-eps, eps], then ``steps`` signed-gradient ascent steps of ``eps / steps`` on ``loss_of()``
        (no projection, as in the references). ``backward`` is the accelerator's under Accelerate."""
        self.reset_perturbation(eps, generator=generator)
        for param in self.perturbations():
            param.grad = None
        for _ in range(steps):
            backward(loss_of())
            with torch.no_grad():
                for param in self.perturbations():
                    param.add_(param.grad.sign(), alpha=eps / steps)
                    param.grad = None

    @torch.no_grad()
    def clip_masks(self) -> None:
        """Clamp every mask to [0, 1], as ANP, RNP and CNP do after each step."""
        for mask in self.mask:
            mask.clamp_(0.0, 1.0)

    # -- hooks ----------------------------------------------------------------------------------
    # The fast paths (module docstring): plain norms swap the masked gamma/beta in for the forward,
    # plain Linear projections compute the masked product in one function. False: hooks only.
    swap_affine = True

    def _hook(self, index: int, group: NeuronGroup, model: nn.Module) -> _MaskHook:
        return _MaskHook(self, index, group, model)

    def attach(self, model: nn.Module) -> NeuronMasks:
        """Register one hook per group on ``model``. All or nothing: on failure none stays."""
        if self._handles:
            raise MaskError("These masks are already attached; call detach() first.")
        if is_masked(model):
            raise MaskError(
                "The model already carries hubdefend masks; detach them before attaching new ones."
            )
        handles = []
        try:
            for index, group in enumerate(self.groups):
                hook = self._hook(index, group, model)
                handles.append(_register(model, group, hook, swap_affine=self.swap_affine))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        self._handles = handles
        return self

    def detach(self) -> None:
        """Remove every hook this object registered. The model is left exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @contextmanager
    def attached_to(self, model: nn.Module) -> Iterator[NeuronMasks]:
        """Attach to ``model`` for the ``with`` block; always detach, errors included."""
        self.attach(model)
        try:
            yield self
        finally:
            self.detach()


class _MaskHook:
    """The hook object: owns nothing but a pointer to its group's mask, like prune's methods."""

    def __init__(self, masks: NeuronMasks, index: int, group: NeuronGroup, model: nn.Module) -> None:
        self.masks = masks
        self.index = index
        self.group = group
        self.layer = _submodule(model, group.name, group)

    def _beta(self) -> torch.Tensor | None:
        return None if self.group.beta is None else getattr(self.layer, self.group.beta)

    def scale_for(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...]]:
        """The per-feature scale (a head's mask repeated over its features), the shift factor, and
        the shape that broadcasts them over ``y``; a clear error when ``y`` does not fit the group."""
        scale, xi = self.masks.scale_and_shift(self.index)
        if self.group.neuron_width > 1:
            scale = scale.repeat_interleave(self.group.neuron_width)
        return scale, xi, _broadcast_shape(y, self.group.channel_dim, scale.numel(), self.group)

    def apply(self, y: torch.Tensor) -> torch.Tensor:
        scale, xi, shape = self.scale_for(y)
        scale = scale.to(y.dtype)
        beta = self._beta()
        if beta is None:
            return y * scale.view(shape)
        # (1 + xi - s) * beta: the shift keeps its (perturbed) value whatever the mask does. The
        # per-channel terms are computed first and applied in ONE fused pass over the activations
        # (addcmul), so the hook costs one elementwise kernel, not two.
        shift_factor = 1 - scale if xi is None else 1 + xi.to(y.dtype) - scale
        return torch.addcmul((shift_factor * beta.to(y.dtype)).view(shape), y, scale.view(shape))

    def __call__(self, module: nn.Module, args: tuple, *rest) -> torch.Tensor | tuple | None:
        if self.masks.bypassed:
            return None  # hooks that return None leave the input / output as it was
        if self.group.hook_on == "input":  # forward pre-hook: (module, args)
            return (self.apply(args[0]), *args[1:])
        if self.group.hook_on == "recompute":  # forward hook: (module, args, output)
            return _recompute_tlu(self.layer, args[0], self.apply)
        return self.apply(rest[0])


def _broadcast_shape(y: torch.Tensor, channel_dim: int, channels: int, group: NeuronGroup) -> tuple[int, ...]:
    dim = channel_dim % y.ndim
    if y.shape[dim] != channels:
        raise MaskError(
            f"Layer {group.name!r} ({group.layer_type}) produced a tensor of shape {tuple(y.shape)}; expected "
            f"{channels} features on dim {channel_dim}. Its neuron group does not describe this model: "
            "discover the groups again from this model."
        )
    shape = [1] * y.ndim
    shape[dim] = channels
    return tuple(shape)


def _recompute_tlu(layer: nn.Module, x: torch.Tensor, mask_affine) -> torch.Tensor:
    """timm's FilterResponseNormTlu2d with the mask applied between the affine and the TLU."""
    v_shape = (1, -1, 1, 1)
    x_hat = x * x.float().square().mean(dim=(2, 3), keepdim=True).add(layer.eps).rsqrt().to(x.dtype)
    y = x_hat * layer.weight.view(v_shape).to(x.dtype) + layer.bias.view(v_shape).to(x.dtype)
    y = mask_affine(y)
    return torch.maximum(y, layer.tau.view(v_shape).to(x.dtype)) if layer.tau is not None else y


def _submodule(model: nn.Module, path: str, group: NeuronGroup) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise MaskError(
            f"Neuron group {group.name!r} points at {path!r}, which this model does not have. "
            "Discover the groups from the same model you mask."
        ) from exc


class _AffineSwap(_MaskHook):
    """The plain-norm fast path (module docstring): ``gamma * s`` and ``beta * (1 + xi)`` take the
    place of the layer's parameters for one forward."""

    def __init__(self, masks: NeuronMasks, index: int, group: NeuronGroup, model: nn.Module) -> None:
        super().__init__(masks, index, group, model)
        self.saved: dict[str, torch.Tensor] | None = None

    def __call__(self, module: nn.Module, args: tuple) -> None:  # forward pre-hook
        if self.masks.bypassed:
            return
        params = module._parameters
        scale, xi = self.masks.scale_and_shift(self.index)
        gamma, beta = params["weight"], params.get("bias")
        self.saved = {"weight": gamma} if beta is None else {"weight": gamma, "bias": beta}
        params["weight"] = gamma * scale.to(gamma.dtype)
        if beta is not None:
            params["bias"] = beta if xi is None else beta * (1 + xi.to(beta.dtype))

    def restore(self, module: nn.Module, args: tuple, output) -> None:  # forward hook, always called
        if self.saved is not None:
            module._parameters.update(self.saved)
            self.saved = None


_PLAIN_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def _swappable(layer: nn.Module, group: NeuronGroup) -> bool:
    """Whether ``layer`` computes its affine from its own ``weight``/``bias`` parameters, once.

    Not for a Linear projection's input units: swapping in ``W * s`` would make autograd compute the
    frozen weight's gradient, a matmul as large as the forward (ViT MLP: +30%); `_FusedLinear` avoids it."""
    return (
        isinstance(layer, _PLAIN_NORMS)
        and group.kind == "norm"
        and group.hook_on != "recompute"
        and group.gamma == "weight"
        and group.beta in ("bias", None)
        and group.gamma_offset == 0
        and group.neuron_width == 1
        and isinstance(layer._parameters.get("weight"), nn.Parameter)
        and (group.beta is None) == (layer._parameters.get("bias") is None)
    )


class _ColumnMaskedLinear(torch.autograd.Function):
    """``F.linear(x * s, W, b)`` computed as ``F.linear(x, W * s, b)``, with a backward that never
    forms the weight's gradient unless the weight itself needs one (module docstring)."""

    @staticmethod
    def forward(ctx, x, scale, weight, bias):
        ctx.save_for_backward(x, scale, weight)
        return F.linear(x, weight * scale.to(weight.dtype), bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, scale, weight = ctx.saved_tensors
        grad_masked_x = grad_y @ weight.to(grad_y.dtype)  # d loss / d (x * s)
        grad_x = grad_scale = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_masked_x * scale.to(grad_y.dtype)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_scale = (grad_masked_x * x).reshape(-1, x.shape[-1]).sum(0, dtype=torch.float32)
            grad_scale = grad_scale.to(scale.dtype)
        if ctx.needs_input_grad[2]:
            flat_x = (x * scale.to(x.dtype)).reshape(-1, x.shape[-1])
            grad_weight = (grad_y.reshape(-1, grad_y.shape[-1]).T @ flat_x.to(grad_y.dtype)).to(weight.dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_scale, grad_weight, grad_bias


class _FusedLinear(_MaskHook):
    """Takes the place of a plain ``nn.Linear``'s ``forward`` while attached (module docstring)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if self.masks.bypassed:
            return nn.Linear.forward(layer, x)
        scale, _, _ = self.scale_for(x)  # channel_dim is -1 (`_fusable`): the scale is the columns'
        return _ColumnMaskedLinear.apply(x, scale, layer.weight, layer.bias)

    def remove(self) -> None:
        if self.layer.__dict__.get("forward") is self:
            del self.layer.forward


def _fusable(layer: nn.Module, group: NeuronGroup) -> bool:
    """A projection's input units on torch's own Linear whose forward nobody else replaced (an
    Accelerate offload hook, a LoRA or quantised layer keep the plain hook)."""
    return (
        type(layer) is nn.Linear
        and group.kind != "norm"
        and group.hook_on == "input"
        and group.hook_point == group.name
        and group.channel_dim == -1
        and "forward" not in layer.__dict__
    )


class _Handles:
    """Removes several hooks as one (the fast path registers a pair)."""

    def __init__(self, *handles: torch.utils.hooks.RemovableHandle) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _register(
    model: nn.Module, group: NeuronGroup, hook: _MaskHook, *, swap_affine: bool
) -> torch.utils.hooks.RemovableHandle | _Handles | _FusedLinear:
    layer = hook.layer
    if swap_affine and _fusable(layer, group):
        fused = _FusedLinear(hook.masks, hook.index, group, model)
        layer.forward = fused
        return fused
    if swap_affine and _swappable(layer, group):
        swap = _AffineSwap(hook.masks, hook.index, group, model)
        pre = layer.register_forward_pre_hook(swap)
        return _Handles(pre, layer.register_forward_hook(swap.restore, always_call=True))
    target = _submodule(model, group.hook_point, group)
    if group.hook_on == "input":
        return target.register_forward_pre_hook(hook)
    return target.register_forward_hook(hook)


def is_masked(model: nn.Module) -> bool:
    """Whether any hubdefend mask hook is registered on ``model``."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), _MaskHook):
            return True
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            if any(isinstance(h, _MaskHook) for h in hooks.values()):
                return True
    return False


@contextmanager
def masked(
    model: nn.Module, groups: Sequence[NeuronGroup], *, perturbation: bool = False
) -> Iterator[NeuronMasks]:
    """Attach fresh masks for ``groups`` to ``model`` for the ``with`` block; always detach."""
    with NeuronMasks(groups, perturbation=perturbation).attached_to(model) as masks:
        yield masks
