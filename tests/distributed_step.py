"""One optimizer step on gloo ranks (``torchrun --nproc_per_node=W tests/distributed_step.py OUT.json``),
checked against one process on every rank, for DDP and FSDP2:

- gradient accumulation over 4 micro-batches equals one batch of all ranks' rows (to 1e-6), every
  micro-batch of the same make-up (so the mean of their means is the big batch's mean);
- under FSDP2, one reduce-scatter per FSDP group per step (the calls are counted), not one per
  micro-batch;
- the gradient norm the step returns is the global one (the one-process norm of the big batch);
- a step in bf16 autocast gives the same losses under DDP and FSDP2 (within 1e-3), with RoPE's cos/sin
  tables in fp32 inside every block (FSDP2's mixed-precision policy casts no block input).

Rank 0 writes what it measured to OUT.json; a failed check raises (a non-zero exit). A second argument
``cuda`` runs it on the GPUs with NCCL (``benchmarks/gpu_faults.py``); the default is gloo on the CPU."""

import copy
import json
import sys

import torch
import torch.distributed as dist

from transfusion import distributed as D
from transfusion.config import Config, TrainConfig, tiny
from transfusion.diffusion import make_schedule
from transfusion.losses import training_loss
from transfusion.model import Transfusion
from transfusion.sequence import Image, Sample, Specials, Text, pack
from transfusion.tokenizer import ByteTokenizer
from transfusion.training.parallelize import parallelize
from transfusion.training.step import train_step

ACCUM, ROWS = 4, 2


def micro_batches(cfg: Config, count: int) -> list:
    """``count`` micro-batches of the same make-up: ROWS rows of two samples each (12 text bytes and
    one seeded image), different bytes and latents in each."""
    tok, m = ByteTokenizer(), cfg.model
    out = []
    for i in range(count):
        g = torch.Generator().manual_seed(100 + i)
        samples = []
        for j in range(2 * ROWS):
            text = Text(torch.randint(97, 123, (12,), generator=g).tolist())
            image = Image(
                torch.randn(m.latent_channels, m.latent_size, m.latent_size, generator=g), seed=1000 * i + j
            )
            samples.append(Sample([text, image] if j % 2 else [image, text]))
        out.append(
            pack(
                samples,
                64,
                Specials.of(tok),
                m.patches_per_image,
                rows=[[2 * r, 2 * r + 1] for r in range(ROWS)],
            )
        )
    return out


def concat(batches: list):
    """One batch holding every row of ``batches`` in order (images in the same order)."""
    first = batches[0]
    fields = (
        "ids",
        "image_index",
        "doc_ids",
        "positions",
        "text_targets",
        "latents",
        "timesteps",
        "noise_limited",
        "noise_seeds",
    )
    return first.replace(**{f: torch.cat([getattr(b, f) for b in batches]) for f in fields})


class Capture(torch.optim.Optimizer):
    """An optimizer that keeps the (whole) gradients it is asked to apply and changes nothing."""

    def __init__(self, model: torch.nn.Module):
        self.names = {id(p): n for n, p in model.named_parameters()}
        super().__init__(list(model.parameters()), {"lr": 0.0})
        self.grads: dict[str, torch.Tensor] = {}

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                self.grads[self.names[id(p)]] = g.detach().clone()


def count_reduce_scatters() -> list[int]:
    calls = [0]
    real = dist.reduce_scatter_single

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    dist.reduce_scatter_single = counted
    return calls


def main() -> None:
    out_path, device = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "cpu")
    info = D.init(device)
    if info.device.type == "cuda":  # D.init turns TF32 on; the check compares fp32 sums to 1e-6
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    rank, world = info.rank, info.world_size
    # fp32 for the accumulation check (bf16 gathering would round the gradients); bf16 is checked below
    cfg = Config(
        model=tiny(), train=TrainConfig(steps=1, batch_size=ROWS, seq_len=64, device=device, dtype="fp32")
    )
    schedule = make_schedule(cfg.diffusion)
    batches = [b.to(info.device) for b in micro_batches(cfg, ACCUM * world)]
    torch.manual_seed(0)
    base = Transfusion(cfg.model).to(info.device)
    # the reference: one process, one batch of every rank's rows
    ref = copy.deepcopy(base)
    training_loss(ref, concat(batches), schedule, cfg.diffusion).total.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    ref_norm = float(torch.nn.utils.get_total_norm(list(ref_grads.values())))
    report = {"world": world, "accumulate": ACCUM}
    calls = count_reduce_scatters()
    mine = batches[rank * ACCUM : (rank + 1) * ACCUM]
    for mode in ("ddp", "fsdp"):
        cfg.train.parallel = mode
        par = parallelize(copy.deepcopy(base), cfg, info)
        opt = Capture(par.model)
        calls[0] = 0
        result = train_step(par.step_model, opt, mine, schedule, cfg.diffusion, lr=0.0, grad_clip=1e9)
        worst = max(float((opt.grads[n] - g).abs().max()) for n, g in ref_grads.items())
        assert opt.grads.keys() == ref_grads.keys() and worst < 1e-6, (
            f"{mode}: gradients differ by {worst:.2e}"
        )
        assert abs(result.grad_norm - ref_norm) < 1e-5 * max(1.0, ref_norm), (
            mode,
            result.grad_norm,
            ref_norm,
        )
        report[mode] = {"max_grad_diff": worst, "grad_norm": result.grad_norm, "one_process_norm": ref_norm,
                        "reduce_scatters": calls[0]}  # fmt: skip
        if mode == "fsdp":
            groups = len(par.model.layers) + 1  # every block, then the root
            assert calls[0] == groups, (
                f"{calls[0]} reduce-scatters in a step of {ACCUM} micro-batches, want {groups}"
            )
            report["fsdp_groups"] = groups
    report["bf16"] = bf16_step(cfg, base, info, mine[:1], schedule)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=2)
    D.cleanup()


def bf16_step(cfg: Config, base: Transfusion, info: D.DistInfo, batches: list, schedule) -> dict:
    """The same step in bf16 autocast under DDP and FSDP2: losses, and the dtype of cos/sin inside blocks."""
    cfg.train.dtype = "bf16"
    losses, tables = {}, set()
    for mode in ("ddp", "fsdp"):
        cfg.train.parallel = mode
        par = parallelize(copy.deepcopy(base), cfg, info)
        hooks = [b.register_forward_pre_hook(lambda m, args, mode=mode: tables.add((mode, args[1].dtype, args[2].dtype)))
                 for b in par.model.layers]  # fmt: skip
        opt = Capture(par.model)
        r = train_step(
            par.step_model,
            opt,
            batches,
            schedule,
            cfg.diffusion,
            lr=0.0,
            grad_clip=1e9,
            autocast=par.autocast(),
        )
        losses[mode] = (r.text_loss, r.image_loss)
        for h in hooks:
            h.remove()
    cfg.train.dtype = "fp32"
    gap = max(abs(a - b) for a, b in zip(losses["ddp"], losses["fsdp"]))
    assert gap < 1e-3, f"bf16 losses differ by {gap}: {losses}"
    assert {t[1:] for t in tables} == {(torch.float32, torch.float32)}, (
        f"RoPE tables inside the blocks: {tables}"
    )
    return {"losses": losses, "gap": gap, "rope_dtypes": sorted({str(t[1]) for t in tables})}


if __name__ == "__main__":
    main()
