"""A straightforward per-task-loop implementation of the MTLoRA model math (spec B §1-3), kept as
the benchmark's reference: ``nn.Dropout`` on LoRA inputs, one thin matmul pair per task per TS layer,
LayerNorm and patch merging run once per stream, per-task window reverse and roll, and the HRNet
head as the official code writes it (resize, concatenate, 1x1 conv). It runs on the weights of our
:class:`~mtlora_dist.models.MultiTaskSwin`, so outputs can be compared one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import window_partition, window_reverse
from torch import Tensor

from mtlora_dist.adapters import MTLoRALinear


def ref_linear(layer, x: Tensor, x_tasks: dict[str, Tensor] | None = None):
    """Official ``MTLoRALinear.forward`` (matrix mode): returns (shared, {task: out} or None)."""
    p = F.linear(x, layer.weight, layer.bias)
    if not isinstance(layer, MTLoRALinear):
        return p, None
    x_drop = F.dropout(x, layer.lora_dropout.p, layer.training)  # nn.Dropout, as the official code
    shared = p
    if layer.shared_rank:
        shared = p + layer.lora_shared_scale.to(p.dtype) * (x_drop @ layer.lora_shared_A.T @ layer.lora_shared_B.T)
    if not layer.tasks:
        return shared, None
    scales = layer._task_scales().to(p.dtype)  # scales may stay fp32 under bf16 weights: keep the activation dtype
    outs = {}
    for i, t in enumerate(layer.tasks):
        z = x_drop if x_tasks is None else x_tasks[t]
        outs[t] = p + scales[i] * (z @ layer.lora_tasks_A[t].T @ layer.lora_tasks_B[t].T)
    return shared, outs


def _attention(block, x: Tensor):
    """Window attention up to (not including) the output projection; returns windows and layout."""
    batch, height, width, channels = x.shape
    shift = block.shift_size
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    ws = block.window_size
    pad_h, pad_w = (ws[0] - height % ws[0]) % ws[0], (ws[1] - width % ws[1]) % ws[1]
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = x.shape[1], x.shape[2]
    windows = window_partition(x, ws).view(-1, block.window_area, channels)
    mask = block.get_attn_mask(x) if block.dynamic_mask else block.attn_mask
    attn = block.attn
    qkv, _ = ref_linear(attn.qkv, windows)
    b_, n, _ = windows.shape
    q, k, v = qkv.reshape(b_, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    bias = attn._get_rel_pos_bias()
    if mask is not None:
        nw = mask.shape[0]
        bias = bias + mask.view(1, nw, 1, n, n).expand(b_ // nw, -1, attn.num_heads, -1, -1).reshape(
            -1, attn.num_heads, n, n
        )
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b_, n, -1)
    return o, (height, width, hp, wp)


def _unwindow(block, windows: Tensor, layout) -> Tensor:
    height, width, hp, wp = layout
    channels = windows.shape[-1]
    x = window_reverse(windows.view(-1, *block.window_size, channels), block.window_size, hp, wp)[:, :height, :width]
    if any(block.shift_size):
        x = torch.roll(x, shifts=block.shift_size, dims=(1, 2))
    return x


def ref_block(block, x: Tensor):
    """One block, official style: (shared out, {task: out} or None)."""
    o, layout = _attention(block, block.norm1(x))
    a_sh, a_tasks = ref_linear(block.attn.proj, o)
    x1 = x + block.drop_path1(_unwindow(block, a_sh, layout))
    mlp = block.mlp
    if a_tasks is None:
        h = x1.flatten(1, 2)
        f, _ = ref_linear(mlp.fc1, block.norm2(h))
        g, _ = ref_linear(mlp.fc2, mlp.act(f))
        return (h + block.drop_path2(g)).view_as(x1), None
    z = {t: x + block.drop_path1(_unwindow(block, a, layout)) for t, a in a_tasks.items()}
    ln_sh = block.norm2(x1)
    f_sh, f_t = ref_linear(mlp.fc1, ln_sh, {t: block.norm2(v) for t, v in z.items()})
    g_sh, g_t = ref_linear(mlp.fc2, mlp.act(f_sh), {t: mlp.act(v) for t, v in f_t.items()})
    out = x1 + block.drop_path2(g_sh)
    return out, {t: z[t] + block.drop_path2(g_t[t]) for t in z}


def ref_backbone(backbone, images: Tensor) -> list[Tensor]:
    """Task features per stage as (T, B, h, w, C), official pyramid, one stream at a time."""
    x = backbone.patch_embed(images)
    features = []
    for i, stage in enumerate(backbone.layers):
        if i == 0:
            x = stage.downsample(x)
        tasks = None
        for block in stage.blocks:
            x, tasks = ref_block(block, x)
        if i + 1 < len(backbone.layers):
            merge = backbone.layers[i + 1].downsample
            x = merge(x)
            tasks = {t: merge(v) for t, v in tasks.items()}
        features.append(torch.stack([tasks[t] for t in backbone.tasks]))
    return features


def ref_decoder(decoder, features: list[Tensor]) -> Tensor:
    """Spec B §3: NHWC tokens -> NCHW maps, 1x1 reducers, resize to the finest scale, concatenate,
    1x1 conv -> BN -> ReLU -> 1x1 conv, on the weights of a :class:`~mtlora_dist.models.decoders.TaskDecoder`."""
    maps = [F.conv2d(f.permute(0, 3, 1, 2), r.weight) for f, r in zip(features, decoder.reducers)]
    size = maps[0].shape[-2:]
    maps = [maps[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]]
    return decoder.head.classifier(decoder.head.fuse(torch.cat(maps, dim=1)))


def ref_model(model, images: Tensor) -> dict[str, Tensor]:
    """The whole multi-task model: reference backbone and reference decoders, one task at a time."""
    features = ref_backbone(model.backbone, images)
    out = {}
    for k, task in enumerate(model.tasks):
        logits = ref_decoder(model.decoders[task], [f[k] for f in features])
        out[task] = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return out


# Largest |ours - reference| allowed, relative to the largest |reference| output (at least 1): the two
# compute the same math in a different order, so they differ by rounding of the activation dtype.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def max_difference(ours: dict[str, Tensor], ref: dict[str, Tensor]) -> tuple[float, float]:
    """(max |ours - ref| over every task's output, the scale it is judged against), in fp32."""
    diff = max((ours[t].float() - ref[t].float()).abs().max().item() for t in ref)
    scale = max(max(ref[t].float().abs().max().item() for t in ref), 1.0)
    return diff, scale


def check_agreement(ours: dict[str, Tensor], ref: dict[str, Tensor]) -> float:
    """The max difference, after refusing outputs that differ by more than their dtype's rounding."""
    diff, scale = max_difference(ours, ref)
    dtype = next(iter(ref.values())).dtype
    if not diff <= TOLERANCE[dtype] * scale:  # also refuses NaN
        raise SystemExit(
            f"outputs differ: max |ours - reference| = {diff:.3e} > {TOLERANCE[dtype]:g} x {scale:.3g} ({dtype})"
        )
    return diff
