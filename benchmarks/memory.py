"""Peak memory and wall time of the pass against one plain forward (issue 21, item 5).

Models (random weights, eval mode, float32, CPU):

* ``sd_vae_decoder``: Stable Diffusion v1's VAE decoder, ``diffusers.AutoencoderKL`` with SD-v1's config
  (block_out_channels (128, 256, 512, 512), layers_per_block 2, latent_channels 4, norm_num_groups 32) and
  ``vae.decoder`` alone on a latent of 1x4x32x32 (256x256 output) or 1x4x64x64 (512x512 output);
* ``esrgan``: spandrel's ``RRDBNet``, the standard ESRGAN x4 (23 RRDB blocks, 64 features) on 1x3x128x128.

Each case runs in a fresh process: build the model and its input, then reset the kernel's RSS high-water mark
(``/proc/self/clear_refs`` = 5; ``ru_maxrss`` and ``VmHWM`` restart from the current RSS) and run either

* ``forward``: one ``torch.no_grad()`` forward (its time and peak), then a second one (warm time only), or
* ``rewrite``: ``dsrewrite.rewrite(model, x, rank=..., measure_time=False)`` with the default rank ("auto") or
  ``rank="full"``, on the model's own route or with the module-swap route forced (``dsrewrite.api.trace``
  made to raise, as ``benchmarks/real_models.py`` does: ``rewrite`` has no public option for it).

Peak = the process's RSS high-water after the step, in GiB (it includes the built model and the input); "extra" is
peak minus the RSS just before the step. The ratios are peak(pass) / peak(forward) and time(pass) /
time(first forward), both measured in fresh processes on the same inputs. A memory guard caps each case's
address space (``RLIMIT_AS``) at its virtual size before the step plus ``--limit-gb`` GiB (default 20) minus its
RSS then, so no case can take the machine down; a case that hits it is recorded as "exceeded N GiB" -- also when
the pass catches the allocation failure itself (its self-check then leaves the layer dense with "can't allocate
memory": the high-water is then a lower bound). Cases run
one at a time, the 512x512 ones last. Where a model's own route already is the module-swap route (it does not
trace whole), the forced-swap case would run the same code again and is recorded as such, not rerun
(``--no-dedupe-swap`` runs it anyway).

Usage:
  python benchmarks/memory.py --code-at 360a6a8        # the numbers of that commit (git archive), not the tree
  python benchmarks/memory.py                          # the importable (working-tree) dsrewrite
  python benchmarks/memory.py --cases sd_vae_decoder@256 --ranks full --routes own
  python benchmarks/memory.py --cases sd_vae_decoder@512 --update   # rerun some cases, keep the other rows
  python benchmarks/memory.py --table benchmarks/memory.json        # print the Markdown of a run
Writes benchmarks/memory.json and benchmarks/memory.md (``--out``, ``--md``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from _meta import code_env  # benchmarks/_meta.py: this script's folder is sys.path[0]
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GB = 1024 ** 3

# model@size -> input shape; 512 last (it is the one that may exceed the guard)
CASES = {
    "esrgan@32": (1, 3, 32, 32),  # a smoke test of the script (not run by default)
    "esrgan@128": (1, 3, 128, 128),
    "sd_vae_decoder@256": (1, 4, 32, 32),
    "sd_vae_decoder@512": (1, 4, 64, 64),
}
DEFAULT = ["esrgan@128", "sd_vae_decoder@256", "sd_vae_decoder@512"]


def build(name: str):
    import torch
    torch.manual_seed(0)
    if name == "sd_vae_decoder":
        from diffusers import AutoencoderKL
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512)
        m = vae.decoder
        del vae
        return m.eval()
    if name == "esrgan":
        from spandrel.architectures.ESRGAN.__arch.RRDB import RRDBNet
        return RRDBNet(in_nc=3, out_nc=3, num_filters=64, num_blocks=23, scale=4).eval()
    raise ValueError(name)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak() -> int:
    return max(_status("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def child(spec: dict) -> dict:
    """One case in this (fresh) process; returns its row."""
    import gc
    import warnings

    import torch
    warnings.filterwarnings("ignore")
    torch.set_num_threads(spec["threads"])
    name, size = spec["case"].split("@")
    model = build(name)
    x = torch.randn(*CASES[spec["case"]], generator=torch.Generator().manual_seed(1))
    row = dict(spec, model=name, size=int(size), input=list(x.shape), params=sum(p.numel() for p in model.parameters()))
    if spec["kind"] == "rewrite":
        import dsrewrite
        import dsrewrite.api as api
        row["dsrewrite_at"] = os.path.dirname(dsrewrite.__file__)
    gc.collect()
    rss0, vm0 = _status("VmRSS"), _status("VmSize")
    row["rss_before"] = rss0
    limit = vm0 + int(spec["limit_gb"] * GB) - rss0
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    row["peak_reset"] = _reset_peak()
    t0 = time.perf_counter()
    try:
        if spec["kind"] == "forward":
            with torch.no_grad():
                y = model(x)
            row["time_s"] = time.perf_counter() - t0
            row["peak"] = _peak()
            del y
            t1 = time.perf_counter()
            with torch.no_grad():
                model(x)
            row["warm_time_s"] = time.perf_counter() - t1
        else:
            real = api.trace
            if spec["route"] == "swap":
                def untraceable(*a, **k):
                    raise RuntimeError("whole-model tracing disabled by benchmarks/memory.py (swap route forced)")
                api.trace = untraceable
            try:
                kw = {} if spec["rank"] == "auto" else {"rank": spec["rank"]}
                res = dsrewrite.rewrite(model, x, measure_time=False, **kw)
            finally:
                api.trace = real
            row["time_s"] = time.perf_counter() - t0
            row["peak"] = _peak()
            rep = res.report
            row.update(route_taken=rep.route, convs=len(rep.layers), rewritten=len(rep.rewritten))
            reasons: Dict[str, int] = {}
            for L in rep.skipped:
                key = (L.reason or "").split(" (")[0]
                reasons[key] = reasons.get(key, 0) + 1
            row["skip_reasons"] = reasons
            row["skipped_layers"] = {L.name: L.reason for L in rep.skipped}
            row["notes"] = [n for n in rep.notes if n]
    except MemoryError as e:
        row.update(error=f"exceeded {spec['limit_gb']:g} GB (MemoryError: {str(e)[:120]})", time_s=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()
        line = f"{type(e).__name__}: {msg[0] if msg else ''}"[:400]
        oom = "can't allocate memory" in line or "not enough memory" in line or "std::bad_alloc" in line
        row.update(error=(f"exceeded {spec['limit_gb']:g} GB ({line[:160]})" if oom else line),
                   time_s=time.perf_counter() - t0)
    row["peak"] = row.get("peak") or _peak()
    return row


# ------------------------------------------------------------------------------------------ parent
def run_case(spec: dict, env: Optional[dict], timeout: float) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec), "--child-out", out]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tempfile.gettempdir())
        rc, tail = p.returncode, [x for x in (p.stderr or "").splitlines() if x.strip()][-1:]
    except subprocess.TimeoutExpired:
        rc, tail = "timeout", []
    try:
        with open(out) as f:
            row = json.load(f)
    except (OSError, ValueError):
        row = dict(spec, error=(f"timeout after {timeout:.0f} s" if rc == "timeout" else
                                f"process died (rc {rc}{', killed: out of memory?' if rc in (-9, 137) else ''}): "
                                f"{tail[0][:200] if tail else ''}"))
    os.unlink(out)
    row["process_s"] = round(time.perf_counter() - t0, 1)
    return row


def _gb(b: Optional[float]) -> str:
    return "-" if b is None else f"{b / GB:.2f}"  # GiB


def markdown(rows: List[dict], meta: Optional[dict] = None) -> str:
    fwd = {r["case"]: r for r in rows if r["kind"] == "forward"}
    out = []
    if meta:
        out.append(f"Run {meta.get('date')} on dsrewrite {meta.get('code')}, torch {meta.get('torch')}, "
                   f"{meta.get('threads')} threads, {meta.get('machine')}; memory guard {meta.get('limit_gb')} GiB; "
                   f"`{meta.get('command')}`.\n")
    out.append("Peaks are RSS high-water marks of a fresh process per case (GiB), the model and input included. Times "
               "are wall times on a 2-core machine shared with other jobs: they varied up to ~3x between cases run at "
               "different moments (ESRGAN's rank=auto own-route case ran under the heaviest load); peaks do not depend "
               "on load.\n")
    if meta and meta.get("updated"):
        out.append("Rows of " + "; ".join(", ".join(u["cases_kept"]) + f" from the run of {u.get('date')} (`{u.get('command')}`)"
                                          for u in meta["updated"]) + ".\n")
    out.append("| case | input | step | route asked -> taken | rewritten / convs (skipped: reasons) | peak RSS GiB (extra over model) | "
               "peak / forward's | time s | time / forward's |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = fwd.get(r["case"])
        inp = "x".join(str(v) for v in r.get("input", CASES[r["case"]]))
        if r["kind"] == "forward":
            step, route, conv = "plain forward (no_grad)", "-", "-"
        else:
            step = f"rewrite, rank={r['rank']}" + (" (default)" if r["rank"] == "auto" else "")
            route = f"{r['route']} -> {r.get('route_taken', '-')}"
            conv = f"{r['rewritten']} / {r['convs']}" if "convs" in r else "-"
            if r.get("skip_reasons"):
                conv += " (" + ", ".join(f"{k}: {v}" for k, v in r["skip_reasons"].items()) + ")"
        if r.get("same_as_own"):
            out.append(f"| {r['case']} | {inp} | {step} | {route} | = own route | (the own route is the module-swap "
                       f"route: not run twice) | | | |")
            continue
        if "error" in r:
            peak = f"**{r['error'][:160]}**" + (f" (high-water {_gb(r.get('peak'))})" if r.get("peak") else "")
            out.append(f"| {r['case']} | {inp} | {step} | {route} | {conv} | {peak} | - | {r.get('time_s', 0):.1f} | - |")
            continue
        extra = r["peak"] - r["rss_before"]
        hit = sum("can't allocate memory" in (why or "") for why in (r.get("skipped_layers") or {}).values())
        if hit:  # the pass caught the guard's allocation failure (self-check) and went on: the peak is a lower bound
            out.append(f"| {r['case']} | {inp} | {step} | {route} | {conv} | **exceeded {r['limit_gb']:g} GiB**: the "
                       f"guard stopped {hit} layer(s)' self-check (\"can't allocate memory\", left dense); high-water "
                       f"{_gb(r['peak'])} ({_gb(extra)}) | > {r['peak'] / f['peak']:.1f}x | {r['time_s']:.1f} | "
                       f"({r['time_s'] / f['time_s']:.1f}x) |")
            continue
        pr = f"{r['peak'] / f['peak']:.2f}x" if f and "peak" in f and "error" not in f and r is not f else "1x"
        tr = f"{r['time_s'] / f['time_s']:.1f}x" if f and "time_s" in f and "error" not in f and r is not f else "1x"
        t = f"{r['time_s']:.1f}" + (f" (warm {r['warm_time_s']:.1f})" if r.get("warm_time_s") else "")
        out.append(f"| {r['case']} | {inp} | {step} | {route} | {conv} | {_gb(r['peak'])} ({_gb(extra)}) | {pr} | "
                   f"{t} | {tr} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(DEFAULT), help=f"comma-separated, of {list(CASES)}")
    ap.add_argument("--ranks", default="auto,full")
    ap.add_argument("--routes", default="own,swap")
    ap.add_argument("--limit-gb", type=float, default=20.0, help="memory guard per case (address space over its RSS)")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per case")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-dedupe-swap", action="store_true",
                    help="also force the swap route where the model's own route already was the module-swap route")
    ap.add_argument("--code-at", metavar="REV", help="run on dsrewrite as committed at REV, exported with git archive")
    ap.add_argument("--out", default=os.path.join(HERE, "memory.json"))
    ap.add_argument("--md", default=os.path.join(HERE, "memory.md"))
    ap.add_argument("--table", metavar="JSON", help="only print the Markdown table of an earlier run")
    ap.add_argument("--update", action="store_true", help="replace only the rows of the cases run now in --out's "
                    "JSON (the other cases' rows kept), and rewrite --md from the whole")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        row = child(json.loads(a.child))
        with open(a.child_out, "w") as f:
            json.dump(row, f)
        return
    if a.table:
        with open(a.table) as f:
            d = json.load(f)
        print(markdown(d["rows"], d.get("meta")))
        return
    env, code = None, None
    if a.code_at:
        env, commit = code_env(a.code_at)
        code = f"git archive of {a.code_at} ({commit[:7]})"
    else:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "dsrewrite", "kernels"], capture_output=True,
                               text=True, cwd=ROOT).stdout.strip()
        code = f"working tree at {head}" + (" (modified)" if dirty else "")
    cases = a.cases.split(",")
    specs: List[dict] = []
    for c in sorted(cases, key=lambda c: list(CASES).index(c)):
        base = dict(case=c, threads=a.threads, limit_gb=a.limit_gb)
        specs.append(dict(base, kind="forward"))
        for rank in a.ranks.split(","):
            for route in a.routes.split(","):
                specs.append(dict(base, kind="rewrite", rank=rank, route=route))
    rows: List[dict] = []
    t0 = time.perf_counter()
    for s in specs:
        own = next((r for r in rows if r["case"] == s["case"] and r["kind"] == "rewrite" and r.get("rank") == s.get("rank")
                    and r.get("route") == "own"), None)
        if (s.get("route") == "swap" and not a.no_dedupe_swap and own is not None
                and own.get("route_taken") == "fx-submodules+module-swap"):
            # the model's own route already was the module-swap route: forcing it runs the same code again
            rows.append(dict(s, same_as_own=True, route_taken=own["route_taken"]))
            print(f"{s['case']:20s} rewrite  {s['rank']:5s} swap  = own route (module swap), not run again", flush=True)
            continue
        r = run_case(s, env, a.timeout)
        rows.append(r)
        print(f"{r['case']:20s} {r['kind']:8s} {r.get('rank', ''):5s} {r.get('route', ''):5s} "
              f"{r.get('route_taken', ''):26s} peak {_gb(r.get('peak'))} GiB (before {_gb(r.get('rss_before'))}) "
              f"time {r.get('time_s', 0):.1f} s {r.get('error', '')}", flush=True)
    import torch

    meta = dict(date=time.strftime("%Y-%m-%d"), code=code, torch=torch.__version__, threads=a.threads,
                machine=f"{os.uname().machine}, {os.cpu_count()} cores", limit_gb=a.limit_gb,
                command="python benchmarks/memory.py " + " ".join(sys.argv[1:]), total_s=round(time.perf_counter() - t0, 1))
    if a.update and os.path.exists(a.out):
        with open(a.out) as f:
            old = json.load(f)
        kept = [r for r in old["rows"] if r["case"] not in cases]
        rows = sorted(kept + rows, key=lambda r: list(CASES).index(r["case"]))
        if kept:
            meta["updated"] = [dict({k: v for k, v in old["meta"].items() if k != "updated"},
                                    cases_kept=sorted({r["case"] for r in kept}))]
    with open(a.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    md = markdown(rows, meta)
    with open(a.md, "w") as f:
        f.write("# Peak memory and time of the pass vs one forward (issue 21, item 5)\n\n" + md)
    print("\n" + md)


if __name__ == "__main__":
    # a kernels.py in benchmarks/ (there was one) would, as sys.path[0], shadow the `kernels` distribution diffusers/transformers probe for
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") not in (HERE, ROOT)]
    main()
