"""What every benchmark JSON records about its run: date, machine, torch, threads and the command."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_meta(script: str, argv: Optional[Sequence[str]]) -> Dict[str, Any]:
    """The ``meta`` block: date, machine, torch and threads, and the command (``python benchmarks/<script> ...``)."""
    import torch

    return dict(date=datetime.date.today().isoformat(), machine=f"{platform.machine()}, {os.cpu_count()} cores",
                torch=torch.__version__, threads=torch.get_num_threads(),
                command=f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:]))


def write_json(path: str, script: str, argv: Optional[Sequence[str]], **payload: Any) -> None:
    """Write ``payload`` with a ``meta`` block (the command is ``python benchmarks/<script>`` and its arguments)."""
    with open(path, "w") as f:
        json.dump(dict(meta=run_meta(script, argv), **payload), f, indent=1)


def emit(script: str, argv: Optional[Sequence[str]], data: Dict[str, Any], json_path: Optional[str],
         md_path: Optional[str], markdown: Callable[[Dict[str, Any]], str]) -> None:
    """Write ``data`` as JSON (with its meta block) when asked, then print its Markdown (``markdown(data)``, read
    back as JSON when written, so both say the same) and write it when asked."""
    if json_path:
        write_json(json_path, script, argv, **data)
        with open(json_path) as f:
            data = json.load(f)
    else:
        data = dict(data, meta=run_meta(script, argv))
    md = markdown(data)
    print(md)
    if md_path:
        with open(md_path, "w") as f:
            f.write(md)


def export_code(rev: str) -> Tuple[str, str]:
    """``git archive`` of ``dsrewrite/`` and ``kernels/`` at ``rev`` into a temporary directory laid out as the
    installed package (``kernels/`` as ``dsrewrite/kernels``): children import it through ``PYTHONPATH``, so a run
    measures that commit even while the working tree is being edited. Returns (directory, full commit)."""
    commit = subprocess.run(["git", "rev-parse", rev], capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip()
    d = tempfile.mkdtemp(prefix=f"dsrewrite-{commit[:8]}-")
    tar = subprocess.run(["git", "archive", commit, "dsrewrite", "kernels"], capture_output=True, cwd=ROOT, check=True).stdout
    subprocess.run(["tar", "-x", "-C", d], input=tar, check=True)
    if os.path.isdir(os.path.join(d, "kernels")):
        os.rename(os.path.join(d, "kernels"), os.path.join(d, "dsrewrite", "kernels"))
    return d, commit


def code_env(rev: str) -> Tuple[Dict[str, str], str]:
    """The environment in which a child process imports dsrewrite as committed at ``rev`` (:func:`export_code`
    first on ``PYTHONPATH``), and the full commit."""
    d, commit = export_code(rev)
    return dict(os.environ, PYTHONPATH=d + os.pathsep + os.environ.get("PYTHONPATH", "")), commit
