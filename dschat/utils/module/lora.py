"""Home-grown LoRA with DeepSpeed-Chat flag semantics (`--lora_dim`, `--lora_module_name`, ...).

A converted layer keeps the original `weight`/`bias` parameter objects (so HF checkpoint keys and
ZeRO-3 partitions are untouched) and adds `lora_right_weight` [in, r] and `lora_left_weight` [r, out]:
    y = x W^T + b + dropout(x) @ right @ left * (lora_scaling / r)
`left` starts at zero, so a fresh conversion does not change the model's outputs.

Fusing folds the update into `weight` and marks the layer fused: its forward then skips the LoRA
path, so outputs stay correct; `unfuse_lora_layer` undoes it when training continues after a
periodic save. Savers drop every key containing `lora` (upstream layout = plain HF keys).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dschat.utils.errors import UserError

LORA_PARAM_MARKERS = ("lora_right_weight", "lora_left_weight")
# Where the decoder blocks live, per architecture family, tried in order: OPT (upstream's default), then
# Llama / Mistral / Qwen / Gemma / GPT-NeoX (`layers.N`), Falcon / BLOOM (`transformer.h.N`), `blocks.N`.
DECODER_BLOCK_NAMES = ("decoder.layers.", "layers.", ".h.", "blocks.")


def _shape(param: torch.Tensor) -> torch.Size:
    """Full shape of a parameter, also when ZeRO-3 has partitioned it (then `.shape` is [0])."""
    return getattr(param, "ds_shape", param.shape)


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Gather ZeRO-3 partitioned params for the block (changes by `modifier_rank` are kept);
    a no-op for ordinary tensors, so callers need not know the ZeRO stage."""
    params = [p for p in params if p is not None]
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed  # takes seconds to import; only ZeRO-3 partitioned parameters need it

        with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
            yield
    else:
        yield


class LinearLayer_LoRA(nn.Module):  # noqa: N801  (upstream class name, kept for compatibility)
    """A frozen linear layer plus a trainable low-rank update (see the module docstring)."""

    def __init__(
        self,
        weight: nn.Parameter,
        lora_dim: int = 0,
        lora_scaling: float = 1,
        lora_dropout: float = 0,
        bias: nn.Parameter | None = None,
    ) -> None:
        super().__init__()
        if lora_dim <= 0:
            raise ValueError("lora_dim must be > 0 to build a LoRA layer")
        self.weight = weight
        self.bias = bias
        self.weight.requires_grad = False
        out_features, in_features = _shape(weight)
        self.in_features, self.out_features = in_features, out_features
        self.lora_dim = lora_dim
        self.lora_scaling = lora_scaling / lora_dim
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        factory = {"dtype": weight.dtype, "device": weight.device}
        self.lora_right_weight = nn.Parameter(torch.empty(in_features, lora_dim, **factory))
        self.lora_left_weight = nn.Parameter(torch.zeros(lora_dim, out_features, **factory))
        # Upstream's init: Kaiming-uniform (a=sqrt(5)) of the [in, r] tensor as stored, i.e. fan-in r;
        # kept so upstream's --lora_learning_rate defaults behave the same. The up-projection is zero.
        nn.init.kaiming_uniform_(self.lora_right_weight, a=math.sqrt(5))
        self.fused = False
        self.disabled = False  # `lora_disabled`: the base weights alone, for a LoRA policy's reference

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"lora_dim={self.lora_dim}, scaling={self.lora_scaling:g}, fused={self.fused}"
        )

    def delta_weight(self) -> torch.Tensor:
        """The update in `weight` layout [out, in]: scaling * (right @ left)^T."""
        return self.lora_scaling * (self.lora_right_weight @ self.lora_left_weight).t()

    def fuse_lora_weight(self) -> None:
        """Fold the LoRA update into `weight` (ZeRO-3 aware); idempotent."""
        if self.fused:
            return
        with gathered([self.weight, self.lora_right_weight, self.lora_left_weight], modifier_rank=0):
            self.weight.data += self.delta_weight().to(self.weight.dtype)
        self.fused = True

    def unfuse_lora_weight(self) -> None:
        """Take the LoRA update back out of `weight` (ZeRO-3 aware); idempotent."""
        if not self.fused:
            return
        with gathered([self.weight, self.lora_right_weight, self.lora_left_weight], modifier_rank=0):
            self.weight.data -= self.delta_weight().to(self.weight.dtype)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.fused or self.disabled:
            return out
        update = (self.lora_dropout(x) @ self.lora_right_weight) @ self.lora_left_weight
        return out + update * self.lora_scaling


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Run `model` on its base weights alone (LoRA updates skipped), e.g. as its own DPO reference."""
    layers = [m for m in model.modules() if isinstance(m, LinearLayer_LoRA)]
    if any(layer.fused for layer in layers):
        raise RuntimeError("lora_disabled: the LoRA update is fused into the weights; unfuse it first")
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer in layers:
            layer.disabled = False


def convert_linear_layer_to_lora(
    model: nn.Module,
    part_module_name: str | Iterable[str],
    lora_dim: int = 0,
    lora_scaling: float = 1,
    lora_droppout: float = 0,
    *,
    lora_dropout: float | None = None,
) -> nn.Module:
    """Replace every `nn.Linear` whose qualified name contains `part_module_name` (a string or a list
    of strings) with a `LinearLayer_LoRA`. `lora_droppout` is upstream's spelling; `lora_dropout`
    is accepted too and wins. Returns `model` (changed in place)."""
    if lora_dropout is not None:
        lora_droppout = lora_dropout
    for name in linear_layer_names(model, part_module_name):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        new = LinearLayer_LoRA(old.weight, lora_dim, lora_scaling, lora_droppout, old.bias)
        setattr(parent, child, new)
    return model


def linear_layer_names(model: nn.Module, part_module_name: str | Iterable[str]) -> list[str]:
    """Qualified names of the `nn.Linear` layers whose name contains `part_module_name` (or one of them)."""
    parts = [part_module_name] if isinstance(part_module_name, str) else list(part_module_name)
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and any(part in name for part in parts)]


def resolve_lora_module_name(model: nn.Module, part_module_name: str | None,
                             flag: str = "--lora_module_name") -> str:
    """The `--lora_module_name` to use: the given one, or (None) the decoder blocks of this architecture
    (`DECODER_BLOCK_NAMES`: OPT keeps upstream's `decoder.layers.`, Llama gets `layers.`).

    A name that matches no Linear layer is a UserError: LoRA would otherwise wrap nothing and the run
    would silently fine-tune every weight (or, with --only_optimize_lora, have nothing to train).
    """
    candidates = DECODER_BLOCK_NAMES if part_module_name is None else (part_module_name,)
    for name in candidates:
        if linear_layer_names(model, name):
            return name
    sample = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:3]
    shown = ", ".join(sample) if sample else "none"
    given = f"{flag} {part_module_name!r}" if part_module_name is not None else f"{flag} (default)"
    raise UserError(f"{given} matches no Linear layer of the model (its Linear layers look like: {shown}); "
                    f"pass a substring of those names, e.g. {flag} layers.")


def lora_layers(model: nn.Module) -> list[LinearLayer_LoRA]:
    return [m for m in model.modules() if isinstance(m, LinearLayer_LoRA)]


def convert_lora_to_linear_layer(model: nn.Module) -> nn.Module:
    """Fuse every LoRA layer (before saving). Outputs are unchanged; the LoRA params stay but are
    inactive, and savers drop their `lora` keys. Call `unfuse_lora_layer` to resume LoRA training."""
    for layer in lora_layers(model):
        layer.fuse_lora_weight()
    return model


def unfuse_lora_layer(model: nn.Module) -> nn.Module:
    """Undo `convert_lora_to_linear_layer` so training can go on after a mid-run save."""
    for layer in lora_layers(model):
        layer.unfuse_lora_weight()
    return model


@contextlib.contextmanager
def lora_fused(model: nn.Module) -> Iterator[nn.Module]:
    """Fuse for the block (e.g. a periodic save), then unfuse so LoRA training goes on. Layers that
    were already fused on entry stay fused. ZeRO-3: enter on every rank."""
    newly = [layer for layer in lora_layers(model) if not layer.fused]
    for layer in newly:
        layer.fuse_lora_weight()
    try:
        yield model
    finally:
        for layer in newly:
            layer.unfuse_lora_weight()


def is_lora_param_name(name: str) -> bool:
    return any(marker in name for marker in LORA_PARAM_MARKERS)


def only_optimize_lora_parameters(model: nn.Module, force_optimize_params: Iterable[str] = ()) -> nn.Module:
    """Freeze everything except LoRA matrices and the exactly named `force_optimize_params`
    (e.g. `v_head.weight` in step 2)."""
    forced = set(force_optimize_params)
    for name, param in model.named_parameters():
        param.requires_grad = is_lora_param_name(name) or name in forced
    return model


def make_model_gradient_checkpointing_compatible(model: nn.Module) -> nn.Module:
    """With frozen embeddings no checkpointed segment receives an input that requires grad, so
    backward would skip the LoRA params; make the embedding output require grad."""
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    elif hasattr(model, "get_input_embeddings"):

        def _require_grad(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            output.requires_grad_(True)

        model.get_input_embeddings().register_forward_hook(_require_grad)
    return model
