"""What every benchmark JSON records about its run: date, machine, torch, threads and the command."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from typing import Any, Optional, Sequence


def write_json(path: str, script: str, argv: Optional[Sequence[str]], **payload: Any) -> None:
    """Write ``payload`` with a ``meta`` block (the command is ``python benchmarks/<script>`` and its arguments)."""
    import torch

    meta = dict(date=datetime.date.today().isoformat(), machine=f"{platform.machine()}, {os.cpu_count()} cores",
                torch=torch.__version__, threads=torch.get_num_threads(),
                command=f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:]))
    with open(path, "w") as f:
        json.dump(dict(meta=meta, **payload), f, indent=1)
