"""A training run under torchrun for the tests (``torchrun ... tests/distributed_run.py CONFIG OUT``):
like ``transfusion train``, plus ``--stop-after N`` (end the process at step N, as an interruption
would) and ``--check-restore`` (before resuming, check that every rank's weights, EMA and optimizer
state right after loading equal the checkpoint's whole tensors exactly)."""

import argparse
import sys
from pathlib import Path

import torch

from transfusion import checkpoint as ckpt
from transfusion import distributed as D
from transfusion.config import load_config
from transfusion.training.loop import resolve_text_side, start_run, train


def whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()


def check_restore(config: Path, out: Path) -> None:
    run = start_run(resolve_text_side(load_config(config)), out, None, resume=True)
    latest = ckpt.resolve_checkpoint(out)
    meta, _ = ckpt.read_meta(latest)
    got = {f"model.{k}": v for k, v in D.model_tensors(run.parallel.model).items()}
    got |= {f"ema.{k}": v for k, v in (run.ema or {}).items()}
    got |= {f"optim.{k}": v for k, v in D.optimizer_tensors(run.parallel.model, run.optimizer).items()}
    saved = {k: torch.empty(meta["shapes"][k]) for k in got}
    ckpt.load_sharded(latest, saved)  # whole tensors on every rank
    bad = [k for k, v in got.items() if not torch.equal(whole(v).float(), saved[k].float())]
    assert not bad, f"rank {run.info.rank}: differ after loading: {bad[:5]}"
    assert len(got) > 3 * len(meta["tensors"]["model"]) - 5  # weights, EMA and two Adam moments each
    D.print0(f"restored exactly: {len(got)} tensors on {run.info.world_size} process(es)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("out")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--stop-after", type=int, default=None)
    p.add_argument("--check-restore", action="store_true")
    args = p.parse_args()
    if args.check_restore:
        check_restore(Path(args.config), Path(args.out))
    cfg = load_config(args.config)
    train(cfg, args.out, vae="random", resume=args.resume, progress=False, stop_after=args.stop_after)


if __name__ == "__main__":
    sys.exit(main())
