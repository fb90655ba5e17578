"""Two-process training computes what data-parallel SGD should: each process draws its own half batch
from (seed, step, process), DDP averages the two gradients, and one clipped AdamW step follows.

The reference below rebuilds that from the ingredients (the step generator, the data, the model, the
loss) with its own gradient averaging, clipping, optimiser and EMA, and must land on the weights the
`torchrun` run checkpointed."""

import os

import torch
from models_util import TINY_RUN, run_torchrun, torchrun_train

from attnlab.config import load_config
from attnlab.data import build_dataset
from attnlab.diffusion import alphas_cumprod, diffusion_loss
from attnlab.models import build_model, resolve
from attnlab.train import checkpoint as ckpt
from attnlab.train import latest_checkpoint, train
from attnlab.train.batches import prepare_training_data
from attnlab.train.trainer import fit_to_data, lr_at, step_generator

WORLD = 2
TINY = [
    *TINY_RUN,
    "diffusion.cond_drop=0.5",  # half the labels dropped: the dropout draw matters on every step
    "train.steps=3",
    "train.warmup=1",
    "train.lr_schedule=cosine",  # another lr on every step
    "train.weight_decay=0.01",
    "train.grad_clip=0.5",
    "train.log_every=3",
    "train.ckpt_every=3",
    "train.precision=fp32",  # the reference below is written in fp32
]
ATOL, RTOL = 1e-6, 1e-5


def _torchrun(out, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text("train:\n  progress: false\n")
    cmd = torchrun_train(config, out, TINY, WORLD)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread, as the reference in this process
    proc = run_torchrun(cmd, env, out)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _reference(cfg, data, world, ranks=None):
    """Data-parallel training written out: per process its own draws and half-batch gradient, the
    mean gradient, global-norm clipping, AdamW, EMA. `ranks` overrides whose draws each process
    makes (the negative control). Returns (model, EMA weights, what was recorded per step)."""
    t = cfg.train
    ranks = ranks or list(range(world))
    per_proc = t.batch_size // world
    ab = alphas_cumprod(cfg.diffusion.num_train_timesteps, cfg.diffusion.beta_schedule)
    plan = resolve(cfg.model)
    torch.manual_seed(t.seed)
    model = build_model(cfg.model)
    model.train()
    params = list(model.parameters())
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(params, lr=t.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=t.weight_decay)
    seen = []
    for step in range(t.steps):
        grads, record = [], {"idx": [], "kept": [], "norm": None}
        for rank in ranks:
            # the order the trainer consumes a step's generator in
            g = step_generator(t.seed, step, rank)
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
            idx = torch.randint(0, len(data), (per_proc,), generator=g)
            x0, cond = data.batch(idx)
            cond = plan.training_condition(x0, cond, g)
            keep = torch.rand(len(cond), generator=g) >= cfg.diffusion.cond_drop
            cond = cond.where(keep, cond.null_like())
            loss = diffusion_loss(
                model,
                x0,
                cond,
                ab,
                prediction=cfg.diffusion.prediction,
                generator=g,
                min_snr_gamma=cfg.diffusion.min_snr_gamma,
            )
            grads.append(torch.autograd.grad(loss, params, allow_unused=True))
            record["idx"].append(idx)
            record["kept"].append(keep)
        for p, gs in zip(params, zip(*grads)):
            gs = [torch.zeros_like(p) if x is None else x for x in gs]
            p.grad = torch.stack(gs).sum(0) / len(gs)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        record["norm"] = norm.item()
        if t.grad_clip > 0:
            scale = min(1.0, t.grad_clip / (norm.item() + 1e-6))
            for p in params:
                p.grad.mul_(scale)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        w = 1 - min(t.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k] += w * (v - ema[k])
                else:
                    ema[k] = v.clone()
        seen.append(record)
    return model, ema, seen


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=ATOL, rtol=RTOL) for k in a)


def test_two_processes_match_data_parallel_reference(tmp_path):
    run = tmp_path / "ddp"
    _torchrun(run, tmp_path)
    got_ckpt = latest_checkpoint(run)
    assert ckpt.read_trainer_state(got_ckpt)["processes"] == WORLD
    got = ckpt.read_tensors(got_ckpt / ckpt.MODEL)
    got_ema = ckpt.read_tensors(got_ckpt / ckpt.EMA_WEIGHTS)

    cfg = load_config(None, TINY)
    dataset = build_dataset(cfg.data, "train")
    data = prepare_training_data(dataset, cfg.model.cond)
    cfg = fit_to_data(cfg, data, dataset.num_classes, None)
    assert ckpt.read_config(got_ckpt).to_dict() == cfg.to_dict()  # the run the reference rebuilds

    model, ema, seen = _reference(cfg, data, WORLD)
    # the draws cover what they should: two different half batches, dropped and kept labels, clipping
    assert all(not torch.equal(*r["idx"]) for r in seen)
    kept = torch.cat([k for r in seen for k in r["kept"]])
    assert 0 < int(kept.sum()) < len(kept)
    assert any(r["norm"] > cfg.train.grad_clip for r in seen)

    want = {k: v.detach() for k, v in model.state_dict().items()}
    assert _close(got, want), f"weights differ from the reference by up to {_max_diff(got, want):.3g}"
    assert _close(got_ema, ema), f"EMA differs from the reference by up to {_max_diff(got_ema, ema):.3g}"

    # negative controls: the same check tells apart processes that all draw rank 0's data ...
    same, _, _ = _reference(cfg, data, WORLD, ranks=[0] * WORLD)
    same = {k: v.detach() for k, v in same.state_dict().items()}
    assert not _close(got, same) and _max_diff(got, same) > 100 * ATOL
    # ... and a one-process run of the config (its full batch from rank 0's generator)
    single = train(load_config(None, TINY), tmp_path / "one")
    one = ckpt.read_tensors(single / ckpt.MODEL)
    assert not _close(got, one) and _max_diff(got, one) > 100 * ATOL
    ref_one, _, _ = _reference(cfg, data, 1)  # which the reference also reproduces
    assert _close(one, {k: v.detach() for k, v in ref_one.state_dict().items()})
