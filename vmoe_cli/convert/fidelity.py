"""Compare a converted model with the official model's outputs, tensor by tensor.

The outputs file (npz) holds `inputs` (NHWC, already in [-1, 1]) and, per setting named
`cf{CF}_bpr-{on|off}_disp-{bf16|f32}`, the official logits, pre-logits, every block's hidden
states, and per MoE block the router logits, dispatch and combine weights `[G, S, E, C]`,
capacity, dropped assignments and auxiliary losses per group. `compare_outputs` runs the
vmoe model once per setting with the same routing and returns the largest absolute
difference of each tensor.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vmoe_cli.errors import VmoeError
from vmoe_cli.models.config import MoEConfig
from vmoe_cli.models.routing import Plan, RouterOutput, gshard_loss, importance_loss
from vmoe_cli.models.vit import VisionTransformer

SETTING = re.compile(r"^cf(?P<cf>[0-9.]+)_bpr-(?P<bpr>on|off)_disp-(?P<disp>bf16|f32)$")
TOLERANCE = {"f32": 1e-5, "bf16": 1e-2}  # bfloat16 dispatch turns one-ulp differences into bf16 rounding flips


def dense_weights(plan: Plan) -> tuple[Tensor, Tensor]:
    """The plan as the official einsum dispatcher's `[G, S, E, C]` combine weights and boolean dispatch mask."""
    G, S, K = plan.expert_GSK.shape
    combine_GSEC = torch.zeros(G, S, plan.num_experts, plan.capacity)
    g, s, k = torch.nonzero(plan.kept_GSK, as_tuple=True)
    combine_GSEC[g, s, plan.expert_GSK[g, s, k], plan.slot_GSK[g, s, k]] = plan.weight_GSK[g, s, k].float()
    dispatch_GSEC = torch.zeros(G, S, plan.num_experts, plan.capacity, dtype=torch.bool)
    dispatch_GSEC[g, s, plan.expert_GSK[g, s, k], plan.slot_GSK[g, s, k]] = True
    return combine_GSEC, dispatch_GSEC


@torch.no_grad()
def run_traced(model: VisionTransformer, images_BCHW: Tensor) -> dict[str, np.ndarray]:
    """One forward pass, with every tensor the official outputs file names, under the same names."""
    captured: dict[str, Tensor] = {}

    def keep(name: str, pick: Callable[[Any], Tensor] = lambda out: out) -> Callable[..., None]:
        return lambda _module, _inputs, out: captured.__setitem__(name, pick(out))

    hooks = [model.patch_embed.register_forward_hook(keep("hidden/embedding", lambda o: o.permute(0, 2, 3, 1)))]
    for i, block in enumerate(model.blocks):
        hooks.append(block.register_forward_hook(keep(f"hidden/encoderblock_{i}", lambda o: o[0])))
        if i in model.cfg.moe_layers():
            hooks.append(block.mlp.register_forward_hook(keep(f"encoderblock_{i}/moe_output", lambda o: o.y)))
    hooks.append(model.norm.register_forward_hook(keep("hidden/encoder_norm")))
    if model.cfg.representation_size:
        hooks.append(model.pre_logits[0].register_forward_hook(keep("pre_logits_dense")))
    try:
        out = model(images_BCHW)
    finally:
        for hook in hooks:
            hook.remove()
    result = {name: value.float().numpy() for name, value in captured.items()}
    result["logits"], result["pre_logits"] = out.logits.numpy(), out.pre_logits.numpy()
    total = 0.0
    for i, routing in out.routing.items():
        layer = _routing_tensors(routing, model.cfg.moe)
        result |= {f"encoderblock_{i}/{name}": value for name, value in layer.items()}
        total = total + layer["metrics/auxiliary_loss"]
    result["metrics/auxiliary_loss"] = np.asarray(total)
    return result


def _routing_tensors(routing: RouterOutput, moe: MoEConfig) -> dict[str, np.ndarray]:
    """Router logits, dense dispatch / combine, capacity, dropped count and per-group losses of one MoE block."""
    plan, logits_GSE = routing.plan, routing.logits_GSE
    combine_GSEC, dispatch_GSEC = dense_weights(plan)
    gates_GSE = logits_GSE.softmax(dim=-1)
    importance_G = torch.stack([importance_loss(gates_GSE[g : g + 1]) for g in range(len(gates_GSE))])
    gshard_G = torch.stack([gshard_loss(gates_GSE[g : g + 1]) for g in range(len(gates_GSE))])
    K, S = plan.expert_GSK.shape[2], plan.expert_GSK.shape[1]
    return {
        "router_logits": logits_GSE.numpy(),
        "combine_weights": combine_GSEC.numpy(),
        "dispatch_weights": dispatch_GSEC.numpy(),
        "capacity": np.asarray(plan.capacity),
        "num_dropped": (K * S - plan.kept_GSK.sum(dim=(1, 2))).numpy(),
        "metrics/importance_loss": importance_G.numpy(),
        "metrics/gshard_loss": gshard_G.numpy(),
        "metrics/auxiliary_loss": (moe.importance_weight * importance_G + moe.gshard_weight * gshard_G).numpy(),
    }


def compare_outputs(model: VisionTransformer, outputs: str | Path) -> dict[str, dict[str, float]]:
    """Largest |vmoe - official| per setting and tensor (booleans and counts as numbers); routing is restored."""
    try:
        official = np.load(outputs)
    except (OSError, ValueError) as e:
        raise VmoeError(f"{outputs}: cannot read the official outputs ({e})") from None
    if "inputs" not in official.files:
        raise VmoeError(f"{outputs}: no 'inputs' array; expected the official outputs file (inputs + SETTING/...)")
    settings = sorted({name.split("/")[0] for name in official.files if "/" in name})
    bad = [s for s in settings if not SETTING.match(s)]
    if bad or not settings:
        raise VmoeError(f"{outputs}: settings {bad or 'none'} are not named cfCF_bpr-on|off_disp-bf16|f32")
    images_BCHW = torch.from_numpy(official["inputs"]).permute(0, 3, 1, 2).float()  # NHWC -> NCHW
    moe = model.cfg.moe
    before = (moe.capacity_factor, moe.capacity, moe.bpr, moe.bfloat16_dispatch)
    table: dict[str, dict[str, float]] = {}
    try:
        for setting in settings:
            m = SETTING.match(setting)
            model.set_routing(
                capacity_factor=float(m["cf"]),
                bpr=m["bpr"] == "on",
                bfloat16_dispatch=m["disp"] == "bf16",
            )
            ours = run_traced(model.eval(), images_BCHW)
            table[setting] = {}
            for name in sorted(n for n in official.files if n.startswith(setting + "/")):
                tensor = name.removeprefix(setting + "/")
                if tensor not in ours:
                    raise VmoeError(f"{outputs}: {name} has no vmoe counterpart")
                want, got = official[name].astype(np.float64), ours[tensor].astype(np.float64)
                if want.shape != got.shape:
                    hint = " (routing groups or capacity differ: check model.moe.group_size)" if got.ndim == 4 else ""
                    raise VmoeError(f"{outputs}: {name} has shape {want.shape}, vmoe gives {got.shape}{hint}")
                table[setting][tensor] = float(np.abs(want - got).max()) if want.size else 0.0
    finally:
        cf, fixed, bpr, bf16 = before
        model.set_routing(capacity_factor=cf, capacity=fixed, bpr=bpr, bfloat16_dispatch=bf16)
    return table


def within_tolerance(setting: str, differences: dict[str, float]) -> bool:
    """Whether one setting's differences are within the tolerance of its dispatch precision."""
    return max(differences.values()) <= TOLERANCE[SETTING.match(setting)["disp"]]
