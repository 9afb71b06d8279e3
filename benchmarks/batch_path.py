"""The path of one training batch: the vae_scale modules it passes through from one optimizer
step to the next (reading and decoding the shard, batching, the device copy, forward, loss,
backward, the update, the EMA), and the hops between them: each time the innermost running
vae_scale frame moves to another module, on a call or a return. Measured with sys.setprofile
over a tiny Frey run (1 process, no loader workers, so the loader runs in this process), on a
steady-state step (no log row, no checkpoint).

    python benchmarks/batch_path.py --shards shards   # a folder holding frey/
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def module_of(frame) -> str | None:
    """The innermost vae_scale module running in `frame`'s stack."""
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name.startswith("vae_scale."):
            return name
        frame = frame.f_back
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, default=REPO / "shards")
    args = parser.parse_args()

    from vae_scale.config import load_config
    from vae_scale.training import loop

    steps: list[list[str]] = [[]]  # per optimizer step: the sequence of modules entered

    def profile(frame, event, arg):
        if event not in ("call", "return"):
            return
        code = frame.f_code
        if event == "call" and code.co_name == "step":
            if code.co_filename.endswith("accelerate/optimizer.py"):
                steps.append([])  # the (Accelerate-wrapped) optimizer's step
                return
        current = module_of(frame if event == "call" else frame.f_back)
        path = steps[-1]
        if current:
            current = current.removeprefix("vae_scale.")
            if not path or path[-1] != current:
                path.append(current)

    real = loop.train_one_epoch

    def traced(*a, **kw):
        sys.setprofile(profile)
        try:
            return real(*a, **kw)
        finally:
            sys.setprofile(None)

    loop.train_one_epoch = traced
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            REPO / "configs" / "frey_conv.yaml",
            [
                f"data.shards_dir={args.shards}", f"run.dir={tmp}", "train.epochs=1",
                "train.log_every_steps=1000", "train.checkpoint_every_steps=0",
                "eval.picture_epochs=[]", "wandb.mode=disabled",
                "train.ema_decay=0.999",
            ],
        )  # fmt: skip
        loop.train(cfg)
    # step k's segment runs from its predecessor's optimizer.step call to its own
    steady = steps[3:-1]
    hops = [len(s) - 1 for s in steady]
    median = sorted(steady, key=len)[len(steady) // 2]
    modules = sorted(set(median))
    print(f"{len(steady)} steady-state steps: median {statistics.median(hops)} hops "
          f"(min {min(hops)}, max {max(hops)}) between {len(modules)} modules")  # fmt: skip
    print("modules:", ", ".join(modules))
    print("path:", " -> ".join(median))


if __name__ == "__main__":
    main()
