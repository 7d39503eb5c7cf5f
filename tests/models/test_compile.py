"""``model.compile``: the model traces whole (no graph break) in train mode with LoRA dropout, with and
without gradient checkpointing, does not recompile after its first step, and computes eager's
gradients. Backends ``eager``/``aot_eager`` trace as inductor does but skip code generation (CI time);
``benchmarks/compile_speed.py`` runs inductor."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from mtlora_dist.adapters import AdapterConfig
from mtlora_dist.adapters.dropout import hashed_masks
from mtlora_dist.models.compile import compile_model
from tests.factories import randomize_lora, tiny_model, tiny_model_config

TASKS = ["semseg", "normals"]  # two tasks: every code path, half the decoder graph of four
DEPTHS = (1, 1, 2, 1)  # the quickstart's: a shifted block in stage 3, a quarter fewer blocks to trace


def _model(grad_checkpointing: bool, drop_path_rate: float):
    """Train mode, LoRA dropout 0.05 (the paper's). Same-seed comparisons through AOTAutograd leave
    timm's drop-path off: with both, it may order the two kinds of random draws unlike eager (the
    ``eager`` backend keeps the order, and its case covers drop-path)."""
    config = tiny_model_config(
        img_size=32,
        grad_checkpointing=grad_checkpointing,
        drop_path_rate=drop_path_rate,
        backbone_kwargs={"depths": DEPTHS},
    )
    adapter = AdapterConfig(shared_rank=4, task_rank=2, dropout=0.05)
    return randomize_lora(tiny_model(adapter, TASKS, config=config)).train()


def _loss(model, images: torch.Tensor) -> torch.Tensor:
    return sum(out.float().square().mean() for out in model(images).values())


def _grads(model, images: torch.Tensor, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    _loss(model, images).backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("mode", "grad_checkpointing", "backend", "drop_path_rate"),
    [("model", False, "eager", 0.1), ("model", True, "aot_eager", 0.0), ("blocks", True, "aot_eager", 0.0)],
    ids=["model-plain-droppath", "model-checkpointed", "blocks-checkpointed"],
)
def test_compiled_steps_match_eager_and_never_recompile(mode, grad_checkpointing, backend, drop_path_rate):
    """Two steps, each with its own dropout draw: the compiled model's gradients are the eager model's
    (the same masks, via the hashed sampler in both), only the first step compiles, and ``model`` is
    one graph (a graph break would make two frames)."""
    images = torch.randn(2, 3, 32, 32)
    eager, compiled = (_model(grad_checkpointing, drop_path_rate) for _ in range(2))
    counter = CompileCounterWithBackend(backend)
    assert compile_model(compiled, mode, backend=counter) is compiled  # in place: parameter names unchanged
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    frames_after_first = None
    previous = None
    for step, seed in enumerate((11, 12)):
        got = _grads(compiled, images, seed)
        with hashed_masks():
            want = _grads(eager, images, seed)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
        if step == 0:
            frames_after_first = counter.frame_count
        if previous is not None:  # a new seed is a new dropout draw, inside the same graph
            assert any(not torch.equal(g, p) for g, p in zip(got, previous))
        previous = got
    blocks = sum(len(stage.blocks) for stage in compiled.backbone.layers)
    assert frames_after_first == 1 if mode == "model" else 1 < frames_after_first <= blocks
    assert counter.frame_count == frames_after_first, "a step after the first compiled again"


def test_compiled_dropout_drops_at_rate_p_and_masks_the_gradient_alike():
    from mtlora_dist.adapters.dropout import lora_dropout

    p = 0.1
    x = torch.ones(400, 500, requires_grad=True)
    fn = torch.compile(lambda t: lora_dropout(t, p), backend="aot_eager", fullgraph=True)
    torch.manual_seed(0)
    y = fn(x)
    y.backward(torch.ones_like(y))
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - p) < 6 * (p * (1 - p) / x.numel()) ** 0.5
    assert torch.equal(x.grad, y.detach())  # the backward mask is the forward one (ones in, ones out)
    torch.manual_seed(0)
    assert torch.equal(fn(x), y)  # torch.manual_seed replays the draw
    assert not torch.equal(fn(x), y)  # a fresh draw differs


def test_unknown_mode_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"model.compile must be one of \['none', 'model', 'blocks'\]"):
        compile_model(torch.nn.Linear(2, 2), "graph")
    linear = torch.nn.Linear(2, 2)
    assert compile_model(linear, "none") is linear and linear._compiled_call_impl is None  # left eager


def test_compiled_dropout_saves_only_its_seed_for_backward():
    """AOTAutograd's min-cut partitioner (inductor's) recomputes the hashed mask in backward: the
    forward graph hands backward the 2-element seed, not a mask the size of the input."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    from mtlora_dist.adapters.dropout import lora_dropout

    saved = []

    def forward_compiler(gm, _inputs):
        (outputs,) = [n.args[0] for n in gm.graph.nodes if n.op == "output"]
        saved.extend(o.meta["val"] for o in outputs[1:])  # outputs[0] is the result, the rest go to backward
        return make_boxed_func(gm.forward)

    backend = aot_autograd(
        fw_compiler=forward_compiler,
        bw_compiler=lambda gm, _: make_boxed_func(gm.forward),
        partition_fn=min_cut_rematerialization_partition,
    )
    x = torch.randn(64, 32, requires_grad=True)
    fn = torch.compile(lambda t: lora_dropout(t, 0.1) * 2, backend=backend, fullgraph=True)
    fn(x).sum().backward()
    assert [(tuple(t.shape), t.dtype) for t in saved] == [((2,), torch.int64)]
    assert 0 < int((x.grad == 0).sum()) < x.numel()  # and backward applied a mask
