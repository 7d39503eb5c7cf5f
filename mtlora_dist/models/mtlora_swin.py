"""MTLoRA Swin backbone on timm's ``SwinTransformer``.

timm builds the Swin (any variant, by name) and owns attention, windows, shifts and masks; we inject
MTLoRA layers by name pattern and run the stages ourselves so that task streams can flow.

Stream layout: inside a task block, the shared stream and the T task streams travel stacked along the
batch axis, stream-major: ``((1+T)*B, H, W, C)``. Attention runs once on the shared stream; the TS
``proj`` emits 1+T streams; LayerNorm, the MLP's frozen path and patch merging then run once on the
stacked tensor (spec Part A 8, B §12).
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mtlora_dist.adapters.inject import AdapterConfig, inject_adapters, mtlora_layers
from mtlora_dist.adapters.mtlora_linear import MTLoRALinear

__all__ = ["MTLoRASwin"]


def _add_over_streams(shortcut: Tensor, update: Tensor) -> Tensor:
    """``shortcut`` (B, ...) + ``update`` (S*B, ...): every stream's residual is the shared input."""
    return (update.unflatten(0, (-1, shortcut.shape[0])) + shortcut).flatten(0, 1)


class MTLoRASwin(nn.Module):
    """A frozen timm Swin with TA-LoRA in every block and TS-LoRA at the end of every stage.

    ``forward`` returns, per stage, the task feature maps as ``(T, B, h, w, C)`` (NHWC). With
    ``pyramid="official"`` stage i's output goes through stage i+1's patch merging, giving strides
    8/16/32/32 as the official code; ``pyramid="timm"`` gives 4/8/16/32.
    """

    def __init__(
        self,
        variant: str,
        tasks: Sequence[str],
        adapter: AdapterConfig | None = None,
        img_size: Sequence[int] = (448, 448),
        pyramid: str = "official",
        drop_path_rate: float = 0.2,
        dynamic_img_size: bool = True,
        grad_checkpointing: bool = False,
        **timm_kwargs,
    ) -> None:
        super().__init__()
        if not variant.startswith("swin"):
            raise ValueError(f"model.backbone '{variant}' is not a timm Swin (e.g. swin_tiny_patch4_window7_224)")
        swin = timm.create_model(
            variant,
            pretrained=False,
            num_classes=0,
            img_size=tuple(img_size),
            drop_path_rate=drop_path_rate,
            dynamic_img_size=dynamic_img_size,
            **timm_kwargs,
        )
        # Keep only what the method uses: no final norm, no classifier (spec B §2.1).
        self.patch_embed = swin.patch_embed
        self.layers = swin.layers
        self.tasks = tuple(tasks)
        self.pyramid = pyramid
        self.grad_checkpointing = grad_checkpointing
        self.block_forward = self._block_forward  # compile_model(mode="blocks") swaps in a compiled one
        self.adapter_config = adapter or AdapterConfig()
        self.adapted_layers = inject_adapters(self, self.adapter_config, self.tasks)
        self.pruned_parameters = self._drop_dead_branches()
        self._mark_task_blocks()

        dims = [stage.blocks[-1].dim for stage in self.layers]
        stride = swin.patch_embed.patch_size[0]
        strides = [stride * 2**i for i in range(len(dims))]
        if pyramid == "official":  # stage i is emitted after stage i+1's merge
            dims = [self.layers[i + 1].downsample.out_dim for i in range(len(dims) - 1)] + dims[-1:]
            strides = strides[1:] + strides[-1:]
        self.feature_dims: list[int] = dims
        self.feature_strides: list[int] = strides

    # ----------------------------------------------------------------------------------------------
    def _drop_dead_branches(self) -> int:
        """The last stage's shared output is never consumed, so in ``matrix``/``addition`` mode the shared
        branch of its last fc2 can never get a gradient (official bug B1). Do not create it; the count
        is kept so parameter reports can still give the paper's numbers."""
        fc2 = self.layers[-1].blocks[-1].mlp.fc2
        if isinstance(fc2, MTLoRALinear) and fc2.tasks and fc2.mode in ("matrix", "addition"):
            return fc2.drop_shared_branch()
        return 0

    def _mark_task_blocks(self) -> None:
        streams = 1 + len(self.tasks)
        for stage in self.layers:
            for block in stage.blocks:
                fc1, fc2 = block.mlp.fc1, block.mlp.fc2
                mlp_tasks = [bool(getattr(m, "tasks", ())) for m in (fc1, fc2)]
                if any(mlp_tasks) and not all(mlp_tasks):
                    raise ValueError(
                        "TS-LoRA must be on both mlp.fc1 and mlp.fc2 of a block or on neither "
                        "(fc2 consumes fc1's task streams); fix adapter.ts_targets"
                    )
                block.mtlora_stack_mlp = all(mlp_tasks)
                block.mtlora_streams = streams

    @staticmethod
    def _block_forward(block: nn.Module, x: Tensor) -> Tensor:
        """timm's block math with task streams: (B, H, W, C) shared -> (B or S*B, H, W, C)."""
        batch, height, width, channels = x.shape
        x = _add_over_streams(x, block.drop_path1(block._attn(block.norm1(x))))
        if block.mtlora_stack_mlp and x.shape[0] == batch:  # proj had no task branches
            x = x.repeat(block.mtlora_streams, 1, 1, 1)
        n = x.shape[0]
        x = x.reshape(n, -1, channels)
        x = x + block.drop_path2(block.mlp(block.norm2(x)))
        return x.reshape(n, height, width, channels)

    def _run_block(self, block: nn.Module, x: Tensor) -> Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self.block_forward, block, x, use_reentrant=False)
        return self.block_forward(block, x)

    def forward(self, images: Tensor, return_shared: bool = False) -> list[Tensor] | tuple[list[Tensor], list[Tensor]]:
        """Task features per stage; with ``return_shared`` also the shared stream per stage."""
        x = self.patch_embed(images)  # (B, H/4, W/4, C) NHWC
        batch, num_tasks = x.shape[0], len(self.tasks)
        features, shared = [], []
        for i, stage in enumerate(self.layers):
            if i == 0 or self.pyramid == "timm":
                x = stage.downsample(x)  # official pyramid: already merged at the end of stage i-1
            for block in stage.blocks:
                x = self._run_block(block, x)
            if self.pyramid == "official" and i + 1 < len(self.layers):
                x = self.layers[i + 1].downsample(x)  # LN + reduction once on all stacked streams
            if x.shape[0] > batch:  # split, not slicing: a cheaper backward (no zero-filled copies)
                x, task_x = x.split([batch, num_tasks * batch])
                features.append(task_x.unflatten(0, (num_tasks, batch)))  # (T, B, h, w, C)
            else:  # a stage without task branches gives every task the shared stream
                features.append(x.unsqueeze(0).expand(num_tasks, *x.shape))
            shared.append(x)
        return (features, shared) if return_shared else features

    # ----------------------------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def merge_adapters(self) -> int:
        """Fold TA-LoRA into the frozen weights wherever the math allows; returns layers merged."""
        layers = [m for m in mtlora_layers(self).values() if m.can_merge]
        for layer in layers:
            layer.merge()
        return len(layers)

    def unmerge_adapters(self) -> None:
        for layer in mtlora_layers(self).values():
            layer.unmerge()
