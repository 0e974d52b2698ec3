"""Map an official V-MoE parameter tree (vmoe.nn.vit_moe.VisionTransformerMoe) onto vmoe's model.

The architecture is read off the shapes: patch size and width from the HWIO patch kernel, image
size from the position embeddings, heads from the `[D, heads, D/heads]` query kernel, MLP size,
which blocks are MoE and E from the stacked expert kernels `[E, D, H]`, the representation layer
and the classes from `pre_logits` and `head`. What the weights cannot say (K, capacity factor,
group size, BPR, dispatch precision) comes from a preset of the official configs and `--set`.

Official names (`/`-joined)                         vmoe state dict
embedding/kernel [P, P, C, D] (HWIO)                patch_embed.weight [D, C, P, P]
cls [1, 1, D], Encoder/posembed_input/...           cls_token, pos_embed
Encoder/encoderblock_i/LayerNorm_0, LayerNorm_1     blocks.i.norm1, blocks.i.norm2
.../SelfAttention/{query,key,value} [D, h, D/h]     blocks.i.attn.qkv [3D, D] (q, k, v stacked)
.../SelfAttention/out [h, D/h, D]                   blocks.i.attn.proj [D, D]
.../Mlp/Dense_0, Dense_1 [in, out]                  blocks.i.mlp.fc1, fc2 [out, in]
.../Moe/Router/dense/kernel [D, E] (no bias)        blocks.i.mlp.router.proj.weight [E, D]
.../Moe/Mlp/Dense_0 [E, D, H], bias [E, H]          blocks.i.mlp.experts.w1 [E, D, H], b1 [E, 1, H]
.../Moe/Mlp/Dense_1 [E, H, D], bias [E, D]          blocks.i.mlp.experts.w2 [E, H, D], b2 [E, 1, D]
Encoder/encoder_norm, pre_logits, head              norm, pre_logits.0, head
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vmoe_cli.checkpoint import save_checkpoint
from vmoe_cli.config import Recipe, recipe_from_dict, recipe_to_dict
from vmoe_cli.convert.fidelity import TOLERANCE, compare_outputs, within_tolerance
from vmoe_cli.convert.jax_checkpoint import read_jax_checkpoint
from vmoe_cli.data.config import DataConfig
from vmoe_cli.errors import VmoeError
from vmoe_cli.models.config import ModelConfig, MoEConfig
from vmoe_cli.models.presets import SIZES
from vmoe_cli.models.vit import VisionTransformer

# Routing of the official configs (vmoe/configs/vmoe_paper/common.py): groups of 8 images with all their
# tokens, bfloat16 dispatch, no BPR; fine-tuning raised the capacity factor to 1.5.
PRESETS: dict[str, dict[str, object]] = {
    "vmoe-paper": {"k": 2, "capacity_factor": 1.05, "group_images": 8, "bpr": False, "bfloat16_dispatch": True},
    "vmoe-finetune": {"k": 2, "capacity_factor": 1.5, "group_images": 8, "bpr": False, "bfloat16_dispatch": True},
}
ENSEMBLE_PRESETS = ("eee", "e3")  # E^3 checkpoints: same tree, but routing per ensemble member


@dataclass
class Converted:
    """What `convert_jax` wrote."""

    checkpoint: Path  # the vmoe checkpoint directory
    recipe: Recipe
    version: str | None  # the official index version (None: written before 2022-06-22)
    arrays: int  # official arrays read
    parameters: int  # vmoe parameters written
    fidelity: dict[str, dict[str, float]] | None  # largest |vmoe - official| per setting and tensor, when checked


def infer_model(params: dict[str, np.ndarray], source: str) -> ModelConfig:
    """The vmoe model the official tree describes (routing left at MoEConfig defaults)."""
    _require(params, ("embedding/kernel", "Encoder/posembed_input/pos_embedding", "Encoder/encoder_norm/scale"), source)
    P, P2, C, D = params["embedding/kernel"].shape
    if P != P2:
        raise VmoeError(f"{source}: non-square patches {P}x{P2} cannot be represented in vmoe")
    has_cls = "cls" in params
    tokens = params["Encoder/posembed_input/pos_embedding"].shape[1] - has_cls
    grid = round(tokens**0.5)
    if grid * grid != tokens:
        raise VmoeError(f"{source}: {tokens} position embeddings are not a square grid of patches")
    blocks = sorted({int(m.group(1)) for name in params if (m := re.match(r"Encoder/encoderblock_(\d+)/", name))})
    if blocks != list(range(len(blocks))) or not blocks:
        raise VmoeError(f"{source}: encoder blocks {blocks} are not numbered 0..depth-1")
    _require(params, ("Encoder/encoderblock_0/SelfAttention/query/kernel",), source)
    heads = params["Encoder/encoderblock_0/SelfAttention/query/kernel"].shape[1]
    moe_layers = [i for i in blocks if f"Encoder/encoderblock_{i}/Moe/Router/dense/kernel" in params]
    mlp_kernels = [f"Encoder/encoderblock_{i}/{'Moe/' if i in moe_layers else ''}Mlp/Dense_0/kernel" for i in blocks]
    _require(params, tuple(mlp_kernels), source)
    hidden = {params[name].shape[-1] for name in mlp_kernels}
    if len(hidden) != 1:
        raise VmoeError(f"{source}: MLP sizes {sorted(hidden)} differ between blocks; vmoe has one MLP size")
    (H,) = hidden
    experts = {params[f"Encoder/encoderblock_{i}/Moe/Router/dense/kernel"].shape[1] for i in moe_layers}
    if len(experts) > 1:
        raise VmoeError(f"{source}: MoE blocks have different numbers of experts {sorted(experts)}")
    rep = params["pre_logits/kernel"].shape[1] if "pre_logits/kernel" in params else None
    classes = params["head/kernel"].shape[1] if "head/kernel" in params else 0
    depth = len(blocks)
    size = (depth, D, H, heads)
    named = next((name for name, s in SIZES.items() if tuple(s) == size), None)
    overrides = {} if named else {"depth": depth, "width": D, "mlp_dim": H, "heads": heads}
    moe = MoEConfig(layers=moe_layers, num_experts=experts.pop()) if moe_layers else None
    return ModelConfig(
        variant=f"{named or 'S'}/{P}", image_size=grid * P, channels=C, num_classes=classes,
        pool="cls" if has_cls else "gap", representation_size=rep, layer_norm_eps=1e-6, gelu="tanh",
        moe=moe, **overrides,
    )  # fmt: skip


def to_state_dict(params: dict[str, np.ndarray], cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """vmoe's state dict from the official arrays; every official array must be used exactly once."""
    depth, D, _, heads, _ = cfg.sizes()
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in params:
            raise VmoeError(f"{source}: missing parameter {name!r}")
        used.add(name)
        return torch.from_numpy(np.ascontiguousarray(params[name], dtype=np.float32))

    def linear(prefix: str, jax_name: str) -> dict[str, torch.Tensor]:  # Dense [in, out] -> Linear [out, in]
        return {f"{prefix}.weight": take(f"{jax_name}/kernel").T, f"{prefix}.bias": take(f"{jax_name}/bias")}

    def norm(prefix: str, jax_name: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": take(f"{jax_name}/scale"), f"{prefix}.bias": take(f"{jax_name}/bias")}

    state = {
        "patch_embed.weight": take("embedding/kernel").permute(3, 2, 0, 1),  # HWIO -> OIHW
        "patch_embed.bias": take("embedding/bias"),
        "pos_embed": take("Encoder/posembed_input/pos_embedding"),
        **norm("norm", "Encoder/encoder_norm"),
    }
    if cfg.pool == "cls":
        state["cls_token"] = take("cls")
    moe_layers = set(cfg.moe_layers())
    for i in range(depth):
        jax, ours = f"Encoder/encoderblock_{i}", f"blocks.{i}"
        attn = f"{jax}/SelfAttention"
        qkv = ("query", "key", "value")
        kernels = [take(f"{attn}/{n}/kernel").reshape(D, D).T for n in qkv]  # [D, h, D/h] -> [D, D], transposed
        state[f"{ours}.attn.qkv.weight"] = torch.cat(kernels)  # [3D, D]: q, k, v, each heads-major
        state[f"{ours}.attn.qkv.bias"] = torch.cat([take(f"{attn}/{n}/bias").reshape(D) for n in qkv])
        state[f"{ours}.attn.proj.weight"] = take(f"{attn}/out/kernel").reshape(D, D).T  # [h, D/h, D] -> [D, D]
        state[f"{ours}.attn.proj.bias"] = take(f"{attn}/out/bias")
        state |= norm(f"{ours}.norm1", f"{jax}/LayerNorm_0") | norm(f"{ours}.norm2", f"{jax}/LayerNorm_1")
        if i in moe_layers:
            moe = f"{jax}/Moe"
            state[f"{ours}.mlp.router.proj.weight"] = take(f"{moe}/Router/dense/kernel").T  # [D, E] -> [E, D]
            for layer, (w, b) in enumerate((("w1", "b1"), ("w2", "b2"))):
                state[f"{ours}.mlp.experts.{w}"] = take(f"{moe}/Mlp/Dense_{layer}/kernel")  # [E, in, out] as is
                state[f"{ours}.mlp.experts.{b}"] = take(f"{moe}/Mlp/Dense_{layer}/bias").unsqueeze(1)  # [E, 1, out]
        else:
            state |= linear(f"{ours}.mlp.fc1", f"{jax}/Mlp/Dense_0") | linear(f"{ours}.mlp.fc2", f"{jax}/Mlp/Dense_1")
    if cfg.representation_size:
        state |= linear("pre_logits.0", "pre_logits")
    if cfg.num_classes:
        state |= linear("head", "head")
    unknown = sorted(set(params) - used)
    if unknown:
        shown = ", ".join(unknown[:6]) + (f" and {len(unknown) - 6} more" if len(unknown) > 6 else "")
        raise VmoeError(f"{source}: parameters vmoe does not know: {shown} (not a VisionTransformerMoe?)")
    return {name: tensor.contiguous() for name, tensor in state.items()}


def convert_jax(
    prefix: str | Path,
    out: str | Path,
    preset: str = "vmoe-paper",
    overrides: tuple[str, ...] = (),
    check: str | Path | None = None,
) -> Converted:
    """Read an official checkpoint, build the vmoe model it describes, load it, optionally compare it with the
    official outputs file `check`, and write it as a vmoe checkpoint.

    Everything is read, mapped, loaded and checked before anything is written, so a failure (a check out of
    tolerance included) leaves `out` untouched.
    """
    if preset.lower().startswith(ENSEMBLE_PRESETS):
        raise VmoeError(
            f"--preset {preset}: E^3 (VisionTransformerMoeEnsemble) routes each ensemble member to its own subset "
            "of experts over tiled inputs; vmoe has no ensemble MoE, so it cannot run those checkpoints faithfully"
        )
    if preset not in PRESETS:
        raise VmoeError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
    source = str(prefix)
    params, version = read_jax_checkpoint(prefix)
    if params and all(name.startswith("params/") for name in params):  # a {'params': ...} tree
        params = {name.removeprefix("params/"): array for name, array in params.items()}
    cfg = infer_model(params, source)
    # pixels to [-1, 1] as the official value_range(-1, 1): (x / 255 - 0.5) / 0.5
    description = f"converted from the official checkpoint {source}"
    data = recipe_to_dict(Recipe(model=cfg, description=description, data=DataConfig(mean=0.5, std=0.5)))
    if data["model"]["moe"] is not None:
        data["model"]["moe"].update(PRESETS[preset])
    recipe = recipe_from_dict(data, overrides, "convert-jax --set")
    state = to_state_dict(params, cfg, source)
    model = VisionTransformer(recipe.model)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # a --set that changed the architecture
        lines = str(e).splitlines()
        raise VmoeError(
            f"convert-jax --set: the model no longer matches the checkpoint ({lines[-1].strip()})"
        ) from None
    fidelity = None
    if check is not None:
        fidelity = compare_outputs(model.eval(), check)
        failed = [setting for setting, diffs in fidelity.items() if not within_tolerance(setting, diffs)]
        if failed:
            raise VmoeError(f"--check {check}: {', '.join(failed)} exceed the tolerance {TOLERANCE}; nothing written")
    path = save_checkpoint(out, 0, model.state_dict(), recipe, {"converted_from": source}, keep_last=1)
    return Converted(path, recipe, version, len(params), sum(p.numel() for p in model.parameters()), fidelity)


def _require(params: dict[str, np.ndarray], names: tuple[str, ...], source: str) -> None:
    missing = [n for n in names if n not in params]
    if missing:
        raise VmoeError(f"{source}: missing parameters {', '.join(missing)} (not a ViT / V-MoE parameter tree?)")
