"""Run `vae-scale ARGS...` and record what this process wrote (for tests/test_ddp.py).

    accelerate launch --config_file launch/cpu_2proc.yaml tests/helpers/launch_audit.py AUDIT_DIR \\
        train CONFIG OVERRIDES...

Each process writes AUDIT_DIR/audit_rank<RANK>.json: the rank and world size its Accelerator
saw, the files it wrote and the folders it created (an audit hook on `open`, `os.mkdir`,
`os.rename`, `os.replace`, plus spies on torch.save and safetensors, which write in native
code), the programs it started, how often it called `wandb.init`, and the CLI's exit status.
Programs it started (wandb-core) write on their own; they are listed in `programs`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def main() -> int:
    audit_dir, cli_args = Path(sys.argv[1]), sys.argv[2:]
    record: dict[str, Any] = {"writes": [], "mkdirs": [], "renames": [], "programs": []}

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if isinstance(path, (str, bytes, os.PathLike)) and (
                (isinstance(mode, str) and any(c in mode for c in "wax+")) or flags & WRITE_FLAGS
            ):
                record["writes"].append(os.path.abspath(os.fsdecode(path)))
        elif event == "os.mkdir" and not os.path.isdir(args[0]):  # created, not just tried
            record["mkdirs"].append(os.path.abspath(os.fsdecode(args[0])))
        elif event in ("os.rename", "os.replace"):
            record["renames"].append(os.path.abspath(os.fsdecode(args[1])))
        elif event == "subprocess.Popen":
            record["programs"].append(os.fsdecode(args[0]))

    import vae_scale.training.setup as setup_module
    from vae_scale import cli

    make_accelerator = setup_module.make_accelerator

    def spy(*args: Any, **kwargs: Any) -> Any:
        accelerator = make_accelerator(*args, **kwargs)
        record["rank"] = accelerator.process_index
        record["num_processes"] = accelerator.num_processes
        return accelerator

    setup_module.make_accelerator = spy

    # torch.save and safetensors write in native code, out of the audit hook's sight.
    import accelerate.utils.other as accelerate_other
    import torch

    def native_spy(save: Any) -> Any:
        def spied(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(f, (str, os.PathLike)):
                record["writes"].append(os.path.abspath(os.fsdecode(f)))
            return save(obj, f, *args, **kwargs)

        return spied

    torch.save = native_spy(torch.save)
    accelerate_other.safe_save_file = native_spy(accelerate_other.safe_save_file)
    import wandb

    wandb_init = wandb.init
    record["wandb_init_calls"] = 0

    def init_spy(*args: Any, **kwargs: Any) -> Any:
        record["wandb_init_calls"] += 1
        return wandb_init(*args, **kwargs)

    wandb.init = init_spy
    sys.addaudithook(hook)
    status = cli.main(cli_args)
    record["exit_status"] = status
    rank = record.get("rank", os.environ.get("RANK", "0"))
    (audit_dir / f"audit_rank{rank}.json").write_text(json.dumps(record))
    return status


if __name__ == "__main__":
    sys.exit(main())
