"""The CUDA paths give the CPU's numbers: attention kernels, both backbones, the controls, training.

Skipped where no GPU is visible. Convolutions may use TF32 on the GPU, so whole models are compared
with a tolerance in units of the output's scale.
"""

import pytest
import torch
from control_toy import WordTokenizer
from models_util import TINY_RUN, inputs, perturbed, tiny_config

from attnlab.attention import Attention, control
from attnlab.config import load_config
from attnlab.control import PAG, HeatMaps, TGate
from attnlab.diffusion import make_scheduler, sample
from attnlab.models import build_model, preset
from attnlab.train import load_model, train
from attnlab.train.log import read_log

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = "cuda"
ENC = WordTokenizer()


def _close(a, b, rel):
    scale = b.abs().max().clamp_min(1e-6)
    assert (a.float().cpu() - b.float().cpu()).abs().max() <= rel * scale, (a - b).abs().max().item()


@pytest.fixture
def no_tf32():
    """Full fp32 convolutions and matmuls, so the GPU must give the CPU's samples."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_paths_agree_on_cuda(dtype):
    torch.manual_seed(0)
    cross = Attention(64, heads=4, context_dim=24)
    x, ctx = torch.randn(3, 50, 64), torch.randn(3, 7, 24)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 3:] = False
    ref = cross(x, ctx, mask)
    gpu = cross.to(CUDA)
    xg, cg, mg = x.to(CUDA), ctx.to(CUDA), mask.to(CUDA)
    with torch.autocast(CUDA, dtype=dtype, enabled=dtype != torch.float32):
        fused, (math, probs) = gpu(xg, cg, mg), gpu.forward_math(xg, cg, mg)
    rel = 1e-4 if dtype == torch.float32 else 3e-2
    _close(fused, ref, rel)
    _close(math, ref, rel)
    assert torch.all(probs[0, :, :, 3:] == 0)  # padding gets no attention on the GPU either


@pytest.mark.parametrize("backbone, dims", [("unet", 2), ("unet", 1), ("dit", 2), ("dit", 1)])
def test_backbone_matches_cpu(backbone, dims, no_tf32):
    cfg = tiny_config(backbone, dims, cond="text")
    model = perturbed(cfg).eval()
    x, t, cond = inputs(cfg)
    with torch.no_grad():
        ref = model(x, t, cond)
        out = model.to(CUDA)(x.to(CUDA), t.to(CUDA), cond.to(CUDA))
    _close(out, ref, 1e-3)


def _text_model():
    cfg = preset("unet-tiny", dims=2, size=16, in_channels=1, cond="text", context_dim=ENC.dim)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _sample(model, guidances=(), device="cpu"):
    cond = ENC.condition(["a red circle", "a blue square"]).to(device)
    return sample(
        model.to(device),
        (2, 1, 16, 16),
        cond,
        scheduler=make_scheduler("ddim"),
        steps=4,
        seeds=[3, 4],
        guidance=2.0,
        guidances=guidances,
    ).cpu()


def test_guided_sampling_and_controls_on_cuda(no_tf32):
    model = _text_model()
    ref_cpu = _sample(model)
    ref = _sample(model, device=CUDA)
    _close(ref, ref_cpu, 1e-3)
    torch.testing.assert_close(_sample(model, [PAG(scale=0.0)], CUDA), ref)  # neutral stays exact
    with_pag = _sample(model, [PAG(scale=1.0)], CUDA)
    _close(with_pag, _sample(model, [PAG(scale=1.0)]), 1e-3)
    assert not torch.allclose(with_pag, ref)
    hm, tg = HeatMaps(), TGate(gate=0.5)
    with control(model, [hm, tg]):
        _sample(model, device=CUDA)
    word = hm.word_map(ENC.word_token_indices("a red circle", "circle"), (16, 16)).cpu()
    assert torch.all(word >= 0) and torch.allclose(word.flatten(1).amax(1), torch.ones(len(word)))
    assert tg.skipped["cross"] > 0  # cross-attention reused after the gate


def test_training_on_cuda_resumes_and_loads_on_cpu(tmp_path):
    over = [
        *TINY_RUN,
        "train.warmup=2",
        "train.log_every=2",
        "train.ckpt_every=4",
    ]
    train(load_config(None, [*over, "train.steps=4"]), tmp_path)
    last = train(load_config(None, [*over, "train.steps=8"]), tmp_path)  # resumes from step 4
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == [2, 4, 6, 8]
    model, _ = load_model(last)
    assert next(model.parameters()).device.type == "cpu"
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_training_on_cuda_resumes_bit_identically(tmp_path, precision):
    """bf16 and fp16 (with its loss scaler, saved with each checkpoint) on the GPU: a resumed run
    ends on the weights of an uninterrupted one, which load in fp32 on the CPU."""
    over = [
        *TINY_RUN,
        "train.warmup=2",
        "train.log_every=2",
        "train.ckpt_every=4",
        f"train.precision={precision}",
    ]
    full = train(load_config(None, [*over, "train.steps=8"]), tmp_path / "full")
    train(load_config(None, [*over, "train.steps=4"]), tmp_path / "cut")
    resumed = train(load_config(None, [*over, "train.steps=8"]), tmp_path / "cut")
    a, b = load_model(full)[0].state_dict(), load_model(resumed)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.isfinite(v).all() for v in a.values())
