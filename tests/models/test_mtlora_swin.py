"""MTLoRA Swin: parameter counts, equivalence with timm, gradient coverage, inputs, loading."""

from __future__ import annotations

import pytest
import timm
import torch

from mtlora_dist.adapters import AdapterConfig, MTLoRALinear, mtlora_layers
from mtlora_dist.models import ModelConfig, MTLoRASwin, build_model
from mtlora_dist.models.params import parameter_report
from mtlora_dist.models.pretrained import load_pretrained_swin
from mtlora_dist.models.trainable import TrainableConfig

from factories import PAPER_TASKS, TINY_BACKBONE, randomize_lora, tiny_model_config

TINY = TINY_BACKBONE


@pytest.mark.parametrize("rank,expected", [(16, 4_953_146), (32, 6_083_642), (64, 8_344_634)])
def test_swin_t_trainable_counts_match_paper(rank, expected):
    model = build_model(
        ModelConfig(), AdapterConfig(shared_rank=rank), TrainableConfig(), PAPER_TASKS, "pascal_context"
    )
    report = parameter_report(model)
    assert report["trainable_as_paper"] == expected
    # the never-trained shared fc2 branch of the last block (r * (4C + C), C = 768) is not created
    assert report["trainable_as_paper"] - report["trainable"] == rank * 5 * 768


def _timm_reference(backbone: MTLoRASwin, images: torch.Tensor) -> list[torch.Tensor]:
    """Plain timm Swin with the same frozen weights; official pyramid (stage i after merge i+1)."""
    ref = timm.create_model(
        "swin_tiny_patch4_window7_224",
        num_classes=0,
        img_size=(64, 64),
        drop_path_rate=0.0,
        dynamic_img_size=True,
        **TINY,
    ).eval()
    frozen = {k: v for k, v in backbone.state_dict().items() if "lora_" not in k}
    missing, unexpected = ref.load_state_dict(frozen, strict=False)
    assert not unexpected and all(k.startswith("norm.") or k.startswith("head.") for k in missing)
    x = ref.patch_embed(images)
    outs = []
    for i, stage in enumerate(ref.layers):
        x = stage(x)
        outs.append(ref.layers[i + 1].downsample(x) if i + 1 < len(ref.layers) else x)
    return outs


def test_zero_b_streams_equal_shared_and_shared_equals_timm():
    torch.manual_seed(0)
    backbone = MTLoRASwin(
        "swin_tiny_patch4_window7_224", PAPER_TASKS, img_size=(64, 64), drop_path_rate=0.0, **TINY
    ).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        task_feats, shared = backbone(images, return_shared=True)
        reference = _timm_reference(backbone, images)
    assert [f.shape[-1] for f in task_feats] == backbone.feature_dims
    for stage, (tasks, sh, ref) in enumerate(zip(task_feats, shared, reference)):
        torch.testing.assert_close(sh, ref, rtol=1e-5, atol=1e-5)
        for t in range(len(PAPER_TASKS)):
            assert torch.equal(tasks[t], sh), f"stage {stage} task {t} differs from shared stream"


def test_nonzero_b_streams_differ_per_task():
    backbone = MTLoRASwin(
        "swin_tiny_patch4_window7_224", PAPER_TASKS, img_size=(64, 64), drop_path_rate=0.0, **TINY
    ).eval()
    randomize_lora(backbone)
    with torch.no_grad():
        tasks, shared = backbone(torch.randn(1, 3, 64, 64), return_shared=True)
    assert not torch.allclose(tasks[0][0], tasks[0][1])
    assert not torch.allclose(tasks[0][0], shared[0])


def test_gradients_reach_exactly_the_trainable_parameters():
    model = build_model(
        tiny_model_config(), AdapterConfig(shared_rank=4, task_rank=2), TrainableConfig(), PAPER_TASKS, "pascal_context"
    ).train()
    randomize_lora(model)
    out = model(torch.randn(2, 3, 64, 64))
    sum(v.square().mean() for v in out.values()).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"trainable {name} got no gradient"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    groups = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.endswith("attn.qkv.weight") for n in groups) and any(n.endswith("mlp.fc1.bias") for n in groups)


def test_task_blocks_are_only_the_last_block_of_each_stage():
    backbone = MTLoRASwin("swin_tiny_patch4_window7_224", PAPER_TASKS, img_size=(64, 64), **TINY)
    with_tasks = sorted(n for n, m in mtlora_layers(backbone).items() if m.tasks)
    assert with_tasks == sorted(
        f"layers.{s}.blocks.1.{m}" for s in range(4) for m in ("attn.proj", "mlp.fc1", "mlp.fc2")
    )
    assert len(mtlora_layers(backbone)) == 4 * 2 * 4  # qkv, proj, fc1, fc2 in every block


@pytest.mark.parametrize("size", [(64, 96), (96, 64), (128, 128)])
def test_any_window_compatible_input_size(size):
    model = build_model(
        tiny_model_config(),
        AdapterConfig(shared_rank=2, task_rank=2),
        TrainableConfig(),
        ["semseg", "sal"],
        "pascal_context",
    ).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out["semseg"].shape == (1, 21, *size) and out["sal"].shape == (1, 1, *size)


def test_timm_pyramid_gives_strides_4_to_32():
    official = MTLoRASwin("swin_tiny_patch4_window7_224", ["semseg"], img_size=(64, 64), **TINY)
    timm_pyr = MTLoRASwin("swin_tiny_patch4_window7_224", ["semseg"], img_size=(64, 64), pyramid="timm", **TINY)
    assert official.feature_strides == [8, 16, 32, 32] and official.feature_dims == [32, 64, 128, 128]
    assert timm_pyr.feature_strides == [4, 8, 16, 32] and timm_pyr.feature_dims == [16, 32, 64, 128]
    with torch.no_grad():
        feats = timm_pyr(torch.randn(1, 3, 64, 64))
    assert [f.shape[2] for f in feats] == [16, 8, 4, 2]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_gives_the_same_gradients(dropout):
    """With dropout on, the recomputed forward must redraw the very same LoRA dropout positions."""
    torch.manual_seed(0)
    tasks = ["semseg", "normals"]
    cfgs = [tiny_model_config(grad_checkpointing=flag) for flag in (False, True)]
    models = [
        build_model(
            c, AdapterConfig(shared_rank=2, task_rank=2, dropout=dropout), TrainableConfig(), tasks, "pascal_context"
        )
        for c in cfgs
    ]
    models[1].load_state_dict(models[0].state_dict())
    for m in models:
        randomize_lora(m)
        m.train()
        for t in tasks:
            m.decoders[t].head.fuse[1].eval()  # same BN statistics path in both
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for m in models:
        torch.manual_seed(1)
        out = m(x)
        sum(o.square().mean() for o in out.values()).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)


def test_timm_checkpoint_loads_by_timm_key_names(tmp_path):
    source = timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, img_size=(64, 64), **TINY)
    path = tmp_path / "swin.pth"
    torch.save(source.state_dict(), path)
    model = build_model(
        tiny_model_config(pretrained=str(path)),
        AdapterConfig(shared_rank=2),
        TrainableConfig(),
        ["semseg"],
        "pascal_context",
    )
    src = source.state_dict()
    own = model.backbone.state_dict()
    for key in (
        "layers.2.blocks.1.attn.qkv.weight",
        "layers.3.blocks.0.mlp.fc2.bias",
        "patch_embed.proj.weight",
        "layers.1.downsample.reduction.weight",
        "layers.0.blocks.1.attn.relative_position_bias_table",
    ):
        assert torch.equal(own[key], src[key]), key


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    other = timm.create_model(
        "swin_tiny_patch4_window7_224", num_classes=0, img_size=(64, 64), **{**TINY, "embed_dim": 24}
    )
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    backbone = MTLoRASwin("swin_tiny_patch4_window7_224", ["semseg"], img_size=(64, 64), **TINY)
    with pytest.raises(ValueError, match="does not fit model.backbone"):
        load_pretrained_swin(backbone, str(path))
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        load_pretrained_swin(backbone, str(tmp_path / "missing.pth"))


def test_merged_backbone_matches_unmerged():
    model = build_model(
        tiny_model_config(), AdapterConfig(shared_rank=4, task_rank=2), TrainableConfig(), PAPER_TASKS, "pascal_context"
    ).eval()
    randomize_lora(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        merged = model.backbone.merge_adapters()
        after = model(x)
    assert merged == 4 * 2 * 4 - 4 * 3  # every TA layer except the TS layers (matrix mode)
    for t in PAPER_TASKS:
        torch.testing.assert_close(after[t], before[t], rtol=1e-4, atol=1e-5)


def test_ts_lora_outside_last_block_is_refused():
    bad = AdapterConfig(ts_targets=["layers.*.blocks.0.mlp.fc1", "layers.*.blocks.0.mlp.fc2"])
    with pytest.raises(ValueError, match="not in the last block"):
        MTLoRASwin("swin_tiny_patch4_window7_224", ["semseg"], bad, img_size=(64, 64), **TINY)


def test_mtlora_plus_freezes_reduction_and_adapts_it():
    cfg = AdapterConfig(
        shared_rank=4, task_rank=2, ta_targets=AdapterConfig().ta_targets + ["layers.*.downsample.reduction"]
    )
    model = build_model(tiny_model_config(), cfg, TrainableConfig(), ["semseg"], "pascal_context")
    reduction = model.backbone.layers[1].downsample.reduction
    assert isinstance(reduction, MTLoRALinear) and not reduction.weight.requires_grad
    assert reduction.lora_shared_A.requires_grad
