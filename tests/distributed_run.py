"""A training run under torchrun for the tests (``torchrun ... tests/distributed_run.py CONFIG OUT``):
like ``transfusion train``, plus

- ``--stop-after N``: end the process at step N, as an interruption would;
- ``--check-restore``: before resuming, check that every rank's weights, EMA and optimizer state right
  after loading equal the checkpoint's whole tensors exactly;
- ``--faults JSON``: what goes wrong, by step (1-based, as metrics.jsonl counts) and rank:
  ``{"text_only": {"3": [0]}, "nan": {"5": [1]}, "kill": [4, 1], "skip": [5]}`` makes rank 0's
  micro-batches of step 3 text-only (``text_only``), rank 1's loss at step 5 NaN, kills rank 1 with
  SIGKILL in the middle of step 4 (after its forward, before its backward) and skips step 5 by
  construction (no forward, no update, on every rank: the reference for a skipped step).
"""

import argparse
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

import torch

from transfusion import checkpoint as ckpt
from transfusion import distributed as D
from transfusion.config import load_config
from transfusion.sequence import IGNORE, MixedBatch
from transfusion.training import loop
from transfusion.training import step as step_module
from transfusion.training.loop import resolve_text_side, start_run, train
from transfusion.training.step import StepResult


def whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()


def text_only(batch: MixedBatch, pad: int) -> MixedBatch:
    """The batch with its images taken out: patch positions become padding without a target, no
    latents. The rows, positions and every text token stay (what a text-only micro-batch is)."""
    patch = batch.image_index > 0
    seeds = batch.noise_seeds[:0] if batch.noise_seeds is not None else None
    return batch.replace(ids=batch.ids.masked_fill(patch, pad), image_index=torch.zeros_like(batch.image_index),
                         text_targets=batch.text_targets.masked_fill(patch, IGNORE), latents=batch.latents[:0],
                         timesteps=batch.timesteps[:0], noise_limited=batch.noise_limited[:0], noise_seeds=seeds)  # fmt: skip


def ranks_at(table: dict, step: int) -> list[int]:
    return [int(r) for r in table.get(str(step), [])]


def install_faults(faults: dict) -> None:
    """Wrap the loop's ``train_step`` so that each step's faults happen on the ranks they name."""
    runs: list = []
    real_start, real_step, real_loss = loop.start_run, loop.train_step, step_module.training_loss

    def start(*args, **kw):
        runs.append(real_start(*args, **kw))
        return runs[-1]

    def faulty_step(model, optimizer, batches, *args, **kw):
        run = runs[-1]
        step, rank = run.step + 1, run.info.rank
        if step in faults.get("skip", []):
            optimizer.zero_grad(set_to_none=True)
            return StepResult(
                float("nan"), float("nan"), float("nan"), False, sum(b.ids.numel() for b in batches)
            )
        if rank in ranks_at(faults.get("text_only", {}), step):
            batches = [text_only(b, run.tokenizer.pad_id) for b in batches]
        nan = rank in ranks_at(faults.get("nan", {}), step)
        kill = faults.get("kill") == [step, rank]

        def loss(*a, **k):
            out = real_loss(*a, **k)
            if kill:
                print(f"rank {rank}: killed with SIGKILL in step {step}", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            if nan:
                out = dataclasses.replace(out, total=out.total * float("nan"), text=out.text * float("nan"))
            return out

        step_module.training_loss = loss
        try:
            return real_step(model, optimizer, batches, *args, **kw)
        finally:
            step_module.training_loss = real_loss

    loop.start_run, loop.train_step = start, faulty_step


def check_restore(config: Path, out: Path) -> None:
    run = start_run(resolve_text_side(load_config(config)), out, None, resume=True)
    latest = ckpt.resolve_checkpoint(out)
    meta, _ = ckpt.read_meta(latest)
    got = {f"model.{k}": v for k, v in D.model_tensors(run.parallel.model).items()}
    got |= {f"ema.{k}": v for k, v in (run.ema or {}).items()}
    got |= {f"optim.{k}": v for k, v in D.optimizer_tensors(run.parallel.model, run.optimizer).items()}
    if ckpt.is_sharded(latest):
        saved = {k: torch.empty(meta["shapes"][k]) for k in got}
        ckpt.load_sharded(latest, saved)  # whole tensors on every rank
    else:  # a one-process checkpoint: its files, the optimizer's state renamed as optimizer_tensors names it
        saved = {f"model.{k}": v for k, v in ckpt.load_tensors(latest / ckpt.MODEL_FILE).items()}
        saved |= {f"ema.{k}": v for k, v in ckpt.load_tensors(latest / ckpt.EMA_FILE).items()}
        state = ckpt.read_training_state(latest)
        named = D.named_optimizer_state(run.parallel.model, run.optimizer, state.optimizer)
        saved |= {f"optim.{k}": v for k, v in named.items()}
    bad = [k for k, v in got.items() if k not in saved or not torch.equal(whole(v).float(), saved[k].float())]
    assert not bad, f"rank {run.info.rank}: differ after loading: {bad[:5]}"
    assert (
        len(got) > 3 * len(dict(run.parallel.model.named_parameters())) - 5
    )  # weights, EMA, two Adam moments
    D.print0(f"restored exactly: {len(got)} tensors on {run.info.world_size} process(es)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("out")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--stop-after", type=int, default=None)
    p.add_argument("--check-restore", action="store_true")
    p.add_argument("--faults", default=None, help="JSON: see the module's docstring")
    args = p.parse_args()
    if args.check_restore:
        check_restore(Path(args.config), Path(args.out))
    if args.faults:
        install_faults(json.loads(args.faults))
    cfg = load_config(args.config)
    train(cfg, args.out, vae="random", resume=args.resume, progress=False, stop_after=args.stop_after)


if __name__ == "__main__":
    sys.exit(main())
