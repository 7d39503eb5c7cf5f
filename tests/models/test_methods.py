"""The ``method=`` config group (docs/methods.md): the official code's parameter counts for Swin-T / 448 px /
the 4 PASCAL tasks, what each method trains on the tiny model, MTLoRA's default left as it was, and the
export of a fully fine-tuned model being the plain Swin."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import timm
import torch

from mtlora_dist.adapters import mtlora_layers
from mtlora_dist.config import ConfigError, load_config
from mtlora_dist.export import ModelSpec, load, save, to_inference
from mtlora_dist.models import build_model
from mtlora_dist.models.params import count_parameters
from mtlora_dist.models.trainable import TrainableConfig, is_backbone

from factories import PAPER_TASKS, randomize_lora

REPO = Path(__file__).resolve().parents[2]
PAPER_T = str(REPO / "configs" / "pascal_swin_t_r64.yaml")
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def _params_script():
    sys.path.insert(0, str(REPO / "launch"))
    spec = importlib.util.spec_from_file_location("params_cli", REPO / "launch" / "params.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_method_counts_as_the_official_code_for_swin_t_pascal():
    """``launch/params.py --all-methods`` on the paper's Swin-T recipe: the official code's counts
    (spec B §4.2; 29,464,442 MTL full FT, 1,946,624 decoders, 112,017,896 for four single-task models)."""
    table = _params_script().method_rows(PAPER_T, [])
    rows = {r["method"]: r for r in table}
    singles = [r for r in table if r["method"] == "single_task"]  # one model per task, then their sum
    assert [r["tasks"] for r in singles] == [[t] for t in PAPER_TASKS]
    assert sum(r["trainable"] for r in singles) == 112_017_896
    assert rows["full_ft"]["trainable"] == rows["full_ft"]["total"] == 29_464_442
    assert rows["decoders_only"]["trainable"] == 1_946_624
    assert rows["single_task (sum of 4)"]["trainable"] == 112_017_896
    assert rows["bitfit"]["trainable"] == 1_946_624 + 51_456  # + every backbone bias
    assert rows["mtlora"]["trainable_as_paper"] == 8_344_634  # the paper's r=64 figure, default unchanged
    assert rows["mtlora"]["trainable"] == 8_344_634 - 245_760  # the dead stage-3 branch is not created
    assert rows["mtlora_plus"]["trainable_as_paper"] == 7_054_394  # spec B §4.2, MTLoRA+ r=64 per task
    assert rows["lora"]["trainable"] == 70_656 * 64 + 1_946_624  # TA-LoRA only, rank 64, no task modules
    lora16 = load_config(PAPER_T, ["method=lora", "adapter=mtlora_r16"])
    counts = count_parameters(lora16.model, lora16.adapter, lora16.trainable, lora16.data.tasks, "pascal_context")
    assert counts["trainable"] == 3_077_120  # the paper's LoRA row, 3.08M


def test_default_method_is_todays_mtlora():
    """No ``method=`` and ``method=mtlora`` compose the same config, with the switches as they were."""
    default, explicit = load_config(QUICKSTART), load_config(QUICKSTART, ["method=mtlora"])
    assert default == explicit and default.method.name == "mtlora"
    assert default.trainable == TrainableConfig() and not default.trainable.backbone and not default.trainable.biases


def _tiny(method: str, *overrides: str):
    cfg = load_config(
        QUICKSTART, [f"method={method}", "model.img_size=[32,32]", "model.backbone_kwargs.window_size=2", *overrides]
    )
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, cfg.adapter, cfg.trainable, cfg.data.tasks, cfg.data.dataset)


@pytest.mark.parametrize("method", ["full_ft", "decoders_only", "bitfit", "lora", "mtlora_plus"])
def test_what_each_method_trains(method):
    cfg, model = _tiny(method)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    names = {n for n, _ in model.named_parameters()}
    decoders = {n for n in names if not is_backbone(n)}
    layers = mtlora_layers(model)
    if method == "full_ft":
        assert trained == names and not layers  # adapters off, everything trains
    elif method == "decoders_only":
        assert trained == decoders and not layers
    elif method == "bitfit":
        assert trained == decoders | {n for n in names - decoders if n.endswith(".bias")} and not layers
        assert any(".attn.qkv.bias" in n for n in trained) and any(".norm1.bias" in n for n in trained)
    elif method == "lora":  # one shared low-rank update per block linear, no task-specific module
        assert layers and all(
            not layer.tasks and layer.shared_rank == cfg.adapter.shared_rank for layer in layers.values()
        )
        assert trained == decoders | {n for n in names if "lora_" in n}
    else:  # MTLoRA+: the reductions carry LoRA, their dense weight frozen
        assert any(n.endswith("downsample.reduction") for n in layers)
        assert not any(n.endswith("downsample.reduction.weight") for n in trained)
    # one step reaches every trained parameter (nothing trained that cannot learn)
    out = model(torch.randn(2, 3, 32, 32))
    sum(o.float().pow(2).mean() for o in out.values()).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_single_task_needs_one_task_and_composes_with_tasks():
    with pytest.raises(ConfigError, match=r"data.tasks=\[semseg\]"):
        load_config(PAPER_T, ["method=single_task"])
    cfg = load_config(PAPER_T, ["method=single_task", "data.tasks=[sal]", "adapter=mtlora_r16"])
    assert cfg.data.tasks == ["sal"] and cfg.trainable.backbone and cfg.adapter.ta_targets == []


def test_command_line_overrides_a_methods_switch():
    cfg = load_config(QUICKSTART, ["method=bitfit", "trainable.norms=true"])
    assert cfg.trainable.norms and cfg.trainable.biases and cfg.method.name == "bitfit"


def test_full_fine_tuning_exports_the_plain_swin(tmp_path):
    """Nothing to fold but the heads' BatchNorm: the export's backbone is timm's own Swin, key for key."""
    cfg, model = _tiny("full_ft")
    randomize_lora(model, batchnorm=True)
    spec = ModelSpec(cfg.model, cfg.adapter, cfg.trainable, list(cfg.data.tasks), cfg.data.dataset)
    summary = to_inference(model)
    assert summary.ta_lora_merged == 0 and summary.adapters_left == []
    save(model, spec, summary, str(tmp_path / "export"), {})
    loaded = load(str(tmp_path / "export"))
    plain = timm.create_model(cfg.model.backbone, num_classes=0, img_size=(32, 32), **cfg.model.backbone_kwargs)
    plain_keys = {k for k in plain.state_dict() if not k.startswith("norm.")}  # the method drops the final norm
    exported = {k.removeprefix("backbone.") for k in loaded.net.state_dict() if k.startswith("backbone.")}
    assert exported == plain_keys
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, got = model(images), loaded.net(images)
    assert all(torch.allclose(expected[t], got[t], atol=1e-5) for t in expected)
