#!/usr/bin/env python3
"""Side-by-side CPU training benchmark of kohya sd-scripts (the peer) and sdtk, per training method.

    flock /tmp/sdtk-heavy.lock .venv/bin/python bench/compare_kohya.py --method lora --family sd1|sdxl
    flock /tmp/sdtk-heavy.lock .venv/bin/python bench/compare_kohya.py --method db
    flock /tmp/sdtk-heavy.lock .venv/bin/python bench/compare_kohya.py --method sdxl_ft --variant fp32|bf16
    flock /tmp/sdtk-heavy.lock .venv/bin/python bench/compare_kohya.py --method ti --family sd1
        [--steps N1,N2] [--rounds N] [--extra "FLAGS"] [--sdtk_extra "FLAGS"] [--json OUT] [--peer DIR] [--sdtk DIR]

A benchmark tool, never part of the test suite and imported by nothing. It generalises
``../shared/peer/compare_perf.py`` (issue 12) to the full-model and textual-inversion methods
(issues 13 item 8, 14 item 6) with the same method: kohya and sdtk run alternately on the same
random-weight full-size models, data and flags (kohya N1, sdtk N1, kohya N2, sdtk N2 per round);
s/step is the slope between the N1- and the N2-step run of each tool, so loading, caching, warm-up
and the final save cancel; fixed cost = wall(N1) - N1 * slope; peak RSS is ``/usr/bin/time -v``'s
maximum resident set. The last line gives the ratios sdtk/kohya (median of the per-round s/step
ratios, peak RSS over all runs, median fixed costs). ``--json`` writes every run's raw figures,
both command lines, and ``date`` / ``uptime`` before and after. Every run loads a full-size model:
hold the heavy lock (the ``flock`` above) so that two 10+ GB processes never meet on a shared
24 GB machine. Outputs (multi-GB checkpoints for full models) are deleted after each run; the logs
of each run are kept in ``--workdir`` (printed at the start).

Settings (both tools get the same command line; base of all: 256 px, batch 1, seed 42, ``--sdpa``,
``--cache_latents``, constant LR, no data-loader workers, the peer's 8-image DreamBooth-style
dataset TOML, random-weight diffusers folders ``$PEER/models/sd1_random`` / ``sdxl_random``):

* ``lora``: exactly compare_perf.py's (LoRA dim 4 / alpha 1, fp32, AdamW lr 1e-4, UNet + TE LoRA on
  sd1; sdxl adds ``--cache_text_encoder_outputs --network_train_unet_only``); steps 3,8 / 2,5.
* ``db``: ``train_db.py`` on the SD1.5 shape, fp32 (``--mixed_precision no``), AdamW lr 1e-6,
  UNet + text encoder trained (kohya's default: no ``--stop_text_encoder_training``), full model
  saved as fp32 safetensors; steps 2,5. The UNet's fp32 weights + gradients + AdamW's two moments
  are ~14 GB (860 M parameters x 16 B), the peak ~15-16 GB: it fits 24 GB RAM with nothing else
  heavy running, so no memory-saving flag is added.
* ``sdxl_ft``: ``sdxl_train.py`` on the SDXL shape, UNet only (the text encoders are frozen, their
  outputs cached: ``--cache_text_encoder_outputs``), Adafactor lr 1e-6 with
  ``--optimizer_args scale_parameter=False relative_step=False warmup_init=False`` and
  ``--fused_backward_pass`` (each gradient is applied and freed in the backward pass);
  ``--variant fp32``: ``--mixed_precision no``; ``--variant bf16``: ``--mixed_precision bf16
  --full_bf16`` (kohya refuses ``--full_bf16`` without ``--mixed_precision bf16``); steps 2,4.
  A plain fp32 AdamW SDXL fine-tune needs ~41 GB (2.57 G parameters x 16 B) and cannot run on a
  24 GB machine, which is why Adafactor + the fused backward pass are the baseline here.
* ``ti``: ``train_textual_inversion.py`` on the SD1.5 shape (``--family sd1``), fp32, AdamW lr 5e-3,
  ``--token_string sdtkobj --init_word object --num_vectors_per_token 4 --use_object_template``,
  ``--save_model_as safetensors`` for both (kohya's default is a pickled .pt); steps 2,5. Runs for
  kohya alone (and reports sdtk as missing) while sdtk has no ``train_textual_inversion.py``.

Steps: a full-model step takes ~50-80 s on 2 shared cores (the first db smoke run, load 2.5-4.5),
so the full-model and TI defaults are smaller than compare_perf's, to keep one round within ~15-20 min.

Differences between the two command lines: none so far. Every flag above exists in kohya
sd-scripts 48d368f (train_util's common arguments, train_db's and sdxl_train's own) and in sdtk.
Where they must differ one day, put the flag in ``ONLY[tool]`` below and write why here.
``--sdtk_extra`` adds flags to sdtk's command line only, for targets stated against kohya's run with
other settings (issue 12: sdtk with ``--fp8_base`` / bf16 against kohya's fp32 peak and step); the
record and the summary say so, and such a ratio is not a like-for-like comparison.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# flags passed to one tool only (kept empty while both accept the same command line)
ONLY: dict[str, list[str]] = {"kohya": [], "sdtk": []}


def base_flags(peer: Path, sdxl: bool) -> list[str]:
    """Flags shared by every method: model, tokenizers, data, resolution, precision-independent basics."""
    model = peer / "models" / ("sdxl_random" if sdxl else "sd1_random")
    return ["--pretrained_model_name_or_path", str(model), "--tokenizer_cache_dir", str(peer / "tokenizers"),
            "--dataset_config", str(peer / "data" / ("dataset_sdxl.toml" if sdxl else "dataset_sd1.toml")),
            "--resolution", "256", "--train_batch_size", "1", "--cache_latents", "--lr_scheduler", "constant",
            "--seed", "42", "--sdpa", "--max_data_loader_n_workers", "0", "--save_model_as", "safetensors"]


def method_plan(a: argparse.Namespace, peer: Path) -> tuple[str, bool, list[str], tuple[int, int], str]:
    """(script, is_sdxl, flags, default steps, label) of the method asked for."""
    if a.method == "lora":
        sdxl = a.family == "sdxl"
        flags = ["--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "1",
                 "--mixed_precision", "no", "--optimizer_type", "AdamW", "--learning_rate", "1e-4"]
        if sdxl:
            flags += ["--cache_text_encoder_outputs", "--network_train_unet_only"]
        return ("sdxl_train_network.py" if sdxl else "train_network.py", sdxl, flags,
                (2, 5) if sdxl else (3, 8), f"lora-{a.family}")
    if a.method == "db":
        if a.family != "sd1":
            sys.exit("--method db runs on the SD1.5 shape only (--family sd1); SDXL full fine-tune: --method sdxl_ft")
        flags = ["--mixed_precision", "no", "--optimizer_type", "AdamW", "--learning_rate", "1e-6"]
        return "train_db.py", False, flags, (2, 5), "db-sd1"
    if a.method == "sdxl_ft":
        flags = ["--optimizer_type", "Adafactor", "--optimizer_args", "scale_parameter=False",
                 "relative_step=False", "warmup_init=False", "--fused_backward_pass", "--learning_rate", "1e-6",
                 "--cache_text_encoder_outputs"]
        flags += ["--mixed_precision", "no"] if a.variant == "fp32" else ["--mixed_precision", "bf16", "--full_bf16"]
        return "sdxl_train.py", True, flags, (2, 4), f"sdxl_ft-{a.variant}"
    if a.method == "ti":
        if a.family != "sd1":
            sys.exit("--method ti compares train_textual_inversion.py on the SD1.5 shape only (--family sd1)")
        flags = ["--token_string", "sdtkobj", "--init_word", "object", "--num_vectors_per_token", "4",
                 "--use_object_template", "--mixed_precision", "no", "--optimizer_type", "AdamW",
                 "--learning_rate", "5e-3"]
        return "train_textual_inversion.py", False, flags, (2, 5), "ti-sd1"
    raise AssertionError(a.method)


def machine_state() -> dict[str, str]:
    """UTC date and the `uptime` line (load averages), for the record."""
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "uptime": up}


def one_line_cause(text: str) -> str:
    """The most telling line of a failed run's output: the last exception / error line, else the last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"(Error|Exception|error:|assert|Killed|Traceback)", ln) and not ln.startswith("File "):
            return ln[:400]
    return lines[-1][:400] if lines else "no output"


def timed(cmd: list[str], env: dict[str, str], log: Path) -> dict[str, object]:
    """Run cmd under /usr/bin/time -v; wall s, peak RSS MB, CPU s, exit status and (on failure) its cause."""
    tfile = log.with_suffix(".time")
    t0 = time.time()
    with log.open("w") as out:
        p = subprocess.run(["/usr/bin/time", "-v", "-o", str(tfile), *cmd], stdout=out, stderr=subprocess.STDOUT,
                           env=env)
    wall = time.time() - t0
    tv = tfile.read_text() if tfile.exists() else ""
    num = lambda pat: float(m.group(1)) if (m := re.search(pat, tv)) else float("nan")  # noqa: E731
    res: dict[str, object] = {
        "wall_s": round(wall, 2), "rc": p.returncode,
        "peak_rss_mb": round(num(r"Maximum resident set size \(kbytes\): (\d+)") / 1024, 1),
        "cpu_s": round(num(r"User time \(seconds\): ([\d.]+)") + num(r"System time \(seconds\): ([\d.]+)"), 2),
        "major_faults": num(r"Major \(requiring I/O\) page faults: (\d+)"), "log": str(log)}
    if p.returncode != 0:
        res["cause"] = one_line_cause(log.read_text(errors="replace"))
    return res


def ratio(x: float | None, y: float | None) -> str:
    return f"{x / y:.2f}" if x is not None and y not in (None, 0) else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--method", choices=["lora", "db", "sdxl_ft", "ti"], default="lora")
    ap.add_argument("--family", choices=["sd1", "sdxl"], default=None, help="lora: sd1|sdxl; db, ti: sd1 (default)")
    ap.add_argument("--variant", choices=["fp32", "bf16"], default="fp32", help="sdxl_ft only (default fp32)")
    ap.add_argument("--peer", default=os.environ.get("PEER", os.path.expanduser("~/peer")),
                    help="the peer built by ../shared/peer/setup_kohya.sh (default $PEER or ~/peer)")
    ap.add_argument("--sdtk", default=str(ROOT), help="sdtk checkout; its .venv/bin/python is used (default: this one)")
    ap.add_argument("--extra", default="", help="flags added to both tools' command lines")
    ap.add_argument("--sdtk_extra", default="", help="flags added to sdtk's command line only (asymmetric: "
                    "for targets stated against kohya's run with other settings)")
    ap.add_argument("--steps", default=None, help="N1,N2 (default: lora 3,8 / 2,5 as compare_perf.py; db, ti 2,5; "
                    "sdxl_ft 2,4)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds; per-round ratios and medians reported")
    ap.add_argument("--no_warmup", action="store_true",
                    help="skip the 1-step run of each tool before round 1 (it puts the model files and both "
                    "tools' code into the page cache, so round 1's first runs are not cold reads)")
    ap.add_argument("--json", default=None, help="write the raw numbers here")
    ap.add_argument("--workdir", default=None, help="logs and (deleted after each run) outputs (default: a temp dir)")
    a = ap.parse_args()
    a.family = a.family or "sd1"
    peer, sdtk = Path(a.peer).expanduser().resolve(), Path(a.sdtk).resolve()
    script, sdxl, flags, default_steps, label = method_plan(a, peer)
    model = peer / "models" / ("sdxl_random" if sdxl else "sd1_random")
    if not model.exists():
        sys.exit(f"{model} missing: run ../shared/peer/setup_kohya.sh" + (" with --sdxl" if sdxl else ""))
    n1, n2 = map(int, a.steps.split(",")) if a.steps else default_steps
    if not 0 < n1 < n2:
        sys.exit("--steps N1,N2 needs 0 < N1 < N2")
    common = [*base_flags(peer, sdxl), *flags, *shlex.split(a.extra)]
    tools = {"kohya": (peer / "venv/bin/python", peer / "sd-scripts"), "sdtk": (sdtk / ".venv/bin/python", sdtk)}
    work = Path(a.workdir or tempfile.mkdtemp(prefix=f"cmpk-{label}-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    only = {t: [*ONLY[t], *(shlex.split(a.sdtk_extra) if t == "sdtk" else [])] for t in tools}
    cmds = {t: [str(py), str(root / script), *common, *only[t]] for t, (py, root) in tools.items()}
    if a.sdtk_extra:
        label += "-sdtk_extra"
        print(f"asymmetric: sdtk alone gets {a.sdtk_extra!r}; the ratios compare different settings")
    missing = {t: f"{root / script} does not exist" for t, (py, root) in tools.items() if not (root / script).exists()}
    record: dict[str, object] = {"method": a.method, "family": a.family, "variant": a.variant if a.method == "sdxl_ft"
                                 else None, "label": label, "steps": [n1, n2], "rounds": a.rounds,
                                 "commands": {t: shlex.join(c) for t, c in cmds.items()}, "before": machine_state(),
                                 "sdtk_commit": subprocess.run(["git", "-C", str(sdtk), "rev-parse", "--short", "HEAD"],
                                                               capture_output=True, text=True).stdout.strip(),
                                 "runs": [], "missing": missing}
    print(f"{label}: steps {n1},{n2}, {a.rounds} round(s); logs in {work}")
    print(f"before: {record['before']['date']} {record['before']['uptime']}", flush=True)
    for t, c in cmds.items():
        print(f"{t}: {shlex.join(c)} --output_dir OUT --output_name p --max_train_steps N")
    for t, why in missing.items():
        print(f"{t}: not run: {why}")
    failed: dict[str, str] = dict(missing)
    slopes: dict[str, list[float]] = {t: [] for t in tools}
    fixed: dict[str, list[float]] = {t: [] for t in tools}
    if not a.no_warmup:  # a cold first read of the model hit whichever tool ran first (docs/benchmarks.md)
        for t in tools:
            if t in failed:
                continue
            out = Path(tempfile.mkdtemp(prefix=f"out-{t}-", dir=work))
            res = timed([*cmds[t], "--output_dir", str(out), "--output_name", "p", "--max_train_steps", "1"],
                        env, work / f"warmup-{t}.log")
            shutil.rmtree(out, ignore_errors=True)
            print(f"warm-up: {t} 1 step: wall {res['wall_s']:.1f} s (not counted)", flush=True)
    for r in range(1, a.rounds + 1):
        walls: dict[str, dict[int, float]] = {t: {} for t in tools}
        for n in (n1, n2):
            for t in tools:
                if t in failed:
                    continue
                out = Path(tempfile.mkdtemp(prefix=f"out-{t}-", dir=work))
                res = timed([*cmds[t], "--output_dir", str(out), "--output_name", "p", "--max_train_steps", str(n)],
                            env, work / f"r{r}-{t}-{n}.log")
                shutil.rmtree(out, ignore_errors=True)
                res.update(round=r, tool=t, steps=n)
                record["runs"].append(res)  # type: ignore[union-attr]
                if res["rc"] != 0:
                    failed[t] = f"exit {res['rc']} at {n} steps: {res['cause']} (log {res['log']})"
                    print(f"round {r}: {t} {n} steps FAILED: {failed[t]}", flush=True)
                    continue
                walls[t][n] = float(res["wall_s"])  # type: ignore[arg-type]
                print(f"round {r}: {t} {n} steps: wall {res['wall_s']:.1f} s, peak RSS {res['peak_rss_mb']:.0f} MB, "
                      f"CPU {res['cpu_s']:.0f} s", flush=True)
        for t in tools:
            if n1 in walls[t] and n2 in walls[t]:
                s = (walls[t][n2] - walls[t][n1]) / (n2 - n1)
                slopes[t].append(s)
                if s > 0:  # from a slope <= 0 (noise) the fixed cost means nothing either
                    fixed[t].append(walls[t][n1] - n1 * s)
        if all(len(slopes[t]) == r for t in tools):
            k, d = slopes["kohya"][-1], slopes["sdtk"][-1]
            why = f"{d / k:.2f}" if k > 0 and d > 0 else "invalid (a slope <= 0: the machine's noise)"
            print(f"round {r}: s/step kohya {k:.2f} sdtk {d:.2f} ratio {why}", flush=True)
    record["after"] = machine_state()
    med = lambda v: sorted(v)[len(v) // 2] if v else None  # noqa: E731
    runs = record["runs"]  # type: ignore[assignment]
    rss = {t: max((x["peak_rss_mb"] for x in runs if x["tool"] == t and x["rc"] == 0), default=None) for t in tools}
    s, f = {t: med(slopes[t]) for t in tools}, {t: med(fixed[t]) for t in tools}
    # the ratio within one round (both tools ran minutes apart) is steadier than a ratio of medians
    # a slope <= 0 (the longer run was faster) is the machine's noise: that round gives no ratio
    per_round = sorted(b / x for x, b in zip(slopes["kohya"], slopes["sdtk"]) if x > 0 and b > 0)
    record.update(slopes=slopes, fixed_cost=fixed, peak_rss_mb=rss, failed=failed, per_round_ratios=per_round,
                  ratios={"s_per_step": med(per_round),
                          "peak_rss": rss["sdtk"] / rss["kohya"] if rss["sdtk"] and rss["kohya"] else None,
                          # a fixed cost <= 0 is noise (a slower N2 run): no ratio from it
                          "fixed_cost": f["sdtk"] / f["kohya"] if (f["sdtk"] or 0) > 0 and (f["kohya"] or 0) > 0
                          else None})
    print(f"after: {record['after']['date']} {record['after']['uptime']}")
    for t, why in failed.items():
        print(f"{t} FAILED: {why}")
    fmt = lambda v, spec: format(v, spec) if v is not None else "n/a"  # noqa: E731
    print(f"s/step kohya {fmt(s['kohya'], '.2f')} sdtk {fmt(s['sdtk'], '.2f')}; fixed cost kohya "
          f"{fmt(f['kohya'], '.0f')} s sdtk {fmt(f['sdtk'], '.0f')} s; peak RSS kohya {fmt(rss['kohya'], '.0f')} MB "
          f"sdtk {fmt(rss['sdtk'], '.0f')} MB")
    if per_round:
        print(f"per-round s/step ratios {', '.join(f'{x:.2f}' for x in per_round)} (spread shows the machine's noise)")
    if a.json:
        Path(a.json).write_text(json.dumps(record, indent=1) + "\n")
    rt = record["ratios"]  # type: ignore[assignment]
    print(f"{label} ratio_s_per_step={fmt(rt['s_per_step'], '.2f')} ratio_peak_rss={fmt(rt['peak_rss'], '.2f')} "
          f"ratio_fixed_cost={fmt(rt['fixed_cost'], '.2f')}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
