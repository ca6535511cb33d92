"""The `scratchlab` command. Every verb is a thin call into a public library function.

Bad input raises `UserError`: printed as one line, exit code 2, no traceback unless
``--debug`` is given. A file the OS refuses to write (disk full, read-only, no permission) is
one line too, exit code 2. Output can fail quietly: when stdout or stderr is closed early
(``scratchlab runs --json | head -1``) a verb ends without a traceback and exits 141
(128 + SIGPIPE, what the shell shows for a command such as ``yes`` cut off by ``head``).
`train` is the exception: its console degrades silently and it exits with the run's own code
(0 when the run finished), since the run and its record are complete.
Unreadable lines of a run's record are one ``warning:`` line each on stderr (RecordWarning).
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import warnings
from collections.abc import Sequence

from scratchlab.errors import EXIT_USER_ERROR, UserError

EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # 141: the shell's code for a writer whose reader went away
EXIT_OS_ERROR = EXIT_USER_ERROR  # a refused write is fixed by the user too (space, permissions)
# OSErrors that are the machine's state, not a bug in scratchlab: one line, no traceback.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENAMETOOLONG,
                      errno.EIO, errno.EMFILE, errno.ENFILE}


def _cmd_train(args: argparse.Namespace) -> int:
    from scratchlab.config import load_config
    from scratchlab.train import train

    preset, overrides = args.preset, list(args.overrides)
    if preset and "=" in preset:  # `scratchlab train optim.lr=1e-3`: no preset named, only overrides
        preset, overrides = None, [preset, *overrides]
    if args.resume:
        if preset:
            raise UserError("--resume takes the run's own config; give only overrides (e.g. train.max_steps=2000)")
        result = train(resume=args.resume, overrides=overrides, allow_data_change=args.allow_data_change)
    else:
        result = train(load_config(preset or "tiny-lm", overrides))
    return 0 if result.status in ("finished", "stopped") else 1


def _cmd_sample(args: argparse.Namespace) -> int:
    from scratchlab.families.base import SampleRequest
    from scratchlab.sample import sample_run

    prompts = args.prompt or []
    request = SampleRequest(
        prompt=args.text or (prompts[0] if prompts else ""), prompts=prompts, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, seconds=args.seconds,
        cfg_scale=args.cfg_scale, n=args.n, out=args.out, audio=args.audio, warn=lambda line: print(line, file=sys.stderr),
    )
    for line in sample_run(args.run_dir, request, checkpoint=args.checkpoint):
        print(line)
    return 0


def _cmd_data_text(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from scratchlab.data.console import summary_lines, text_progress
    from scratchlab.data.text import prepare_text

    try:
        with text_progress(Console(stderr=True)) as progress:
            out = prepare_text(args.src, args.out, vocab_size=args.vocab_size, tokenizer_path=args.tokenizer,
                               val_fraction=args.val_fraction, text_field=args.text_field,
                               tokenizer_sample_mb=args.tokenizer_sample_mb, commit_mb=args.commit_mb,
                               progress=progress)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue from the last commit", file=sys.stderr)
        return 130
    meta = json.loads((out / "meta.json").read_text())
    print("\n".join([f"wrote {out}", *summary_lines(meta), f"use it with: scratchlab train data.path={out}"]))
    return 0


def _cmd_data_codes(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from scratchlab.data.console import count_progress
    from scratchlab.families.codec.data import pack_codes_dir, render_summary, validate_codes_dir

    on_bad = "refuse" if args.refuse_bad else "skip"
    with count_progress(Console(stderr=True)) as progress:
        check = pack_codes_dir if args.pack else validate_codes_dir
        extra = {"out": args.pack} if args.pack else {}
        summary = check(args.dir, codebook_size=args.codebook_size, n_codebooks=args.n_codebooks, on_bad=on_bad,
                        write_summary=True, progress=progress, **extra)
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        render_summary(summary, Console())
    if args.pack:
        print(f"packed {summary.clips:,} clips into {args.pack}; train on it with data.path={args.pack}",
              file=sys.stderr if args.json else sys.stdout)
    return 0


def _cmd_data_frames(args: argparse.Namespace) -> int:
    from rich.console import Console

    from scratchlab.data.console import count_progress
    from scratchlab.families.cascade.data import load_signals, pack_frames_dir

    if args.pack:
        with count_progress(Console(stderr=True)) as progress:
            pack_frames_dir(args.dir, args.pack, progress=progress)
    data = load_signals(args.pack or args.dir)
    s = data.summary()
    print(f"{s['train']['clips'] + s['val']['clips']:,} clips, {s['n_features']} features, "
          f"{s['train']['frames'] + s['val']['frames']:,} frames, frame rate {s['frame_rate'] or '-'}"
          + (f"\npacked into {args.pack}; train on it with data.path={args.pack}" if args.pack else ""))
    return 0


def _cmd_data_synth_codes(args: argparse.Namespace) -> int:
    from scratchlab.families.codec.data import write_synthetic_codes

    out = write_synthetic_codes(args.out, n_clips=args.clips, T=args.frames, K=args.codebooks,
                                codebook_size=args.codebook_size, seed=args.seed, min_T=args.min_frames)
    print(f"wrote {args.clips} synthetic clips to {out}\ncheck it with: scratchlab data codes {out}")
    return 0


def _cmd_data_encode(args: argparse.Namespace) -> int:
    from rich.console import Console

    from scratchlab.families.codec.data import render_summary
    from scratchlab.families.codec.encode import encode_audio_dir

    result = encode_audio_dir(args.audio_dir, args.out, args.codec, random_weights=args.random_weights,
                              model=args.model, bandwidth=args.bandwidth, device=args.device, progress=print)
    for bad in result.skipped:
        print(f"skipped {bad.file}: {bad.reason}", file=sys.stderr)
    render_summary(result.summary, Console())
    if result.codec.random_weights:
        print("note: codes from an UNTRAINED codec (--random-weights): for testing the pipeline only", file=sys.stderr)
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    from scratchlab.config import load_config, to_yaml
    from scratchlab.families.registry import get_family

    cfg = load_config(args.preset, args.overrides)
    get_family(cfg.model.family)  # the family names live in the registry, not in config.py
    print(to_yaml(cfg), end="")
    return 0


def _cmd_config_list(args: argparse.Namespace) -> int:
    from scratchlab.config import preset_names

    print("\n".join(preset_names()))
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from scratchlab.doctor.diagnose import diagnose, diagnosis_json, render_diagnosis

    diagnosis = diagnose(args.run_dir)
    if args.json:
        print(json.dumps(diagnosis_json(diagnosis), indent=2))
    else:
        render_diagnosis(diagnosis, Console())
    return 0 if diagnosis.ok else 1


def _cmd_export(args: argparse.Namespace) -> int:
    from scratchlab.export import export_run

    print(export_run(args.run_dir, args.out, args.format, checkpoint=args.checkpoint))
    return 0


def _tokens(text: str) -> float:
    """'1.4e12', '300B', '2T', '50M' -> a token or FLOP count."""
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(text[-1:].upper(), 1.0)
    try:
        return float(text[:-1] if scale != 1.0 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number (e.g. 1e21, 300B, 2T)") from None


def _flops_list(text: str) -> list[float]:
    return [_tokens(part) for part in text.split(",") if part.strip()]


def _cmd_scaling_plan(args: argparse.Namespace) -> int:
    from rich.console import Console

    from scratchlab.config import load_config
    from scratchlab.scaling.plan import plan, render_plan

    base = load_config(args.base).model if args.base else None
    p = plan(args.flops, gpu_hours=args.gpu_hours, gpu=args.gpu, mfu=args.mfu, tokens_available=args.tokens_available,
             law=args.law, vocab_size=args.vocab_size, seq_len=args.seq_len, base=base)
    render_plan(p, Console())
    return 0


def _cmd_scaling_fit(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from scratchlab.scaling.report import fit_runs, render_fit_report

    report = fit_runs(args.runs, root=args.root, bootstrap=args.bootstrap, plot=None if args.no_plot else args.plot)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        render_fit_report(report, Console())
    return 0


def _cmd_scaling_sweep(args: argparse.Namespace) -> int:
    from scratchlab.scaling.isoflop import isoflop_sweep
    from scratchlab.scaling.plan import human

    written = isoflop_sweep(args.flops, args.out, base=args.base, overrides=args.overrides, sizes=args.sizes,
                            spread=args.spread, law=args.law)
    for r in written:
        s = r.shape
        print(f"{r.path}  C={r.compute:.3g}  N={human(s.non_embedding_params)} ({s.n_layers}x{s.d_model}, "
              f"{s.n_heads} heads)  D={human(r.tokens)}  max_steps={r.max_steps}")
    print(f"{len(written)} configs; run them all with: scratchlab sweep {args.out}\n"
          f"then fit: scratchlab scaling fit --root <the sweep's folder under train.out_dir>")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from rich.console import Console

    from scratchlab.sweep import dry_run, parse_grid, render_sweep, run_sweep

    grid = parse_grid(args.grid or [])
    budget = int(args.budget_tokens) if args.budget_tokens is not None else None
    if args.dry_run:
        print(dry_run(args.config, grid, launcher=args.launcher, nproc=args.nproc, budget_tokens=budget,
                      overrides=args.set or []))
        return 0
    console = Console()
    sweep = run_sweep(args.config, grid, budget_tokens=budget, overrides=args.set or [], console=console)
    render_sweep(sweep, console)
    return 0 if sweep.ok else 1


def _cmd_runs(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from scratchlab.runs.index import render_runs, scan_runs

    summaries = scan_runs(args.root)
    if args.json:
        print(json.dumps([s.to_json() for s in summaries], indent=2))
    else:
        render_runs(summaries, Console())
    return 0


def _cmd_runs_note(args: argparse.Namespace) -> int:
    from scratchlab.runs.index import add_note

    print(f"noted in {add_note(args.run_dir, args.text)}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from scratchlab.runs.compare import compare_runs, write_comparison

    comparison = compare_runs(args.run_dirs, metric=args.metric)
    print(comparison.markdown())
    if args.out:
        out = write_comparison(comparison, args.out)
        print(f"wrote {out / 'compare.md'}, {out / 'compare.html'} and the plots (PNG) to {out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from scratchlab.runs.report import write_report

    print(f"wrote {write_report(args.run_dir, args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scratchlab", description="Train autoregressive transformers from scratch.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (default: the tiny-lm preset on the stdlib corpus)")
    p.add_argument("preset", nargs="?", help="preset name or YAML path (default tiny-lm)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 train.max_steps=200")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    p.add_argument("--allow-data-change", action="store_true",
                   help="with --resume and data.path=...: continue on other data (data.json records both)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sample", help="sample from a trained run: text (lm), codes (codec_lm) or frames (cascade)")
    p.add_argument("run_dir")
    p.add_argument("--prompt", action="append", default=None,
                   help="lm: the text to continue; repeat for several prompts (generated together, one batch)")
    p.add_argument("--text", default="", help="codec_lm: the condition (text and tags); empty = unconditional")
    p.add_argument("--seconds", type=float, default=5.0, help="codec_lm / cascade: length to generate")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="codec_lm: classifier-free guidance (1 = off)")
    p.add_argument("--n", type=int, default=1, help="codec_lm: clips to sample")
    p.add_argument("--out", default=None, help="codec_lm / cascade: output dir (default RUN/samples)")
    p.add_argument("--audio", action="store_true",
                   help="codec_lm: also decode to .wav with the codec that made the codes (audio extra)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--checkpoint", default=None, help="checkpoint name under RUN/checkpoints (default best, else latest)")
    p.set_defaults(func=_cmd_sample)

    data = sub.add_parser("data", help="prepare datasets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("text", help="tokenize text into a data dir (BPE + token shards; streams, resumable)")
    p.add_argument("src", help="a folder of text files, a text file, .jsonl[.gz|.zst], parquet file(s) or a "
                               "dataset saved with datasets.save_to_disk (parquet/zst/HF: pip install 'scratchlab[data]')")
    p.add_argument("--out", required=True, help="output data dir (run again after an interruption to resume)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--tokenizer", default=None, help="use this tokenizer.json instead of training one")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--text-field", default="text", help="the text column of jsonl / parquet / HF records")
    p.add_argument("--tokenizer-sample-mb", type=float, default=100.0,
                   help="train the tokenizer on the first N MB of training documents (default 100)")
    p.add_argument("--commit-mb", type=float, default=64.0,
                   help="text between resume points (default 64): at most this much is redone after a kill")
    p.set_defaults(func=_cmd_data_text)
    p = data.add_parser("codes", help="validate and summarize a codes dataset (.npy [T, K] + manifest.jsonl)")
    p.add_argument("dir", help="folder holding manifest.jsonl and the .npy files; summary.json is written there")
    p.add_argument("--codebook-size", type=int, default=None,
                   help="the codec's codebook size (default: codec.json, else inferred)")
    p.add_argument("--n-codebooks", type=int, default=None, help="K (default: the most common K)")
    p.add_argument("--refuse-bad", action="store_true", help="exit 2 if any file is bad (default: skip bad files)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--pack", metavar="OUT", default=None,
                   help="also write the good clips as one memory-mapped dataset in OUT (train with data.path=OUT)")
    p.set_defaults(func=_cmd_data_codes)
    p = data.add_parser("frames", help="validate a cascade feature folder (.npy [T, F] + manifest.jsonl); --pack it")
    p.add_argument("dir", help="folder holding manifest.jsonl and the .npy frames")
    p.add_argument("--pack", metavar="OUT", default=None,
                   help="write the clips as one memory-mapped dataset in OUT (train with data.path=OUT)")
    p.set_defaults(func=_cmd_data_frames)
    p = data.add_parser("synth-codes", help="write a learnable synthetic codes dataset (tests, tiny presets)")
    p.add_argument("out")
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--frames", type=int, default=200, help="frames per clip (the longest)")
    p.add_argument("--min-frames", type=int, default=None, help="shortest clip (default: all --frames long)")
    p.add_argument("--codebooks", type=int, default=4, help="K")
    p.add_argument("--codebook-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_data_synth_codes)
    p = data.add_parser("encode", help="encode audio into a codes dataset with DAC or EnCodec (needs .[audio])")
    p.add_argument("audio_dir", help="folder of audio; NAME.txt = text, NAME.tags or the sub-folder = tags")
    p.add_argument("--codec", choices=["dac", "encodec"], default="dac")
    p.add_argument("--out", required=True, help="output codes dataset folder")
    p.add_argument("--model", default=None, help="Hub id or local folder of the codec weights (default per codec)")
    p.add_argument("--bandwidth", type=float, default=6.0, help="EnCodec kbps (1.5, 3, 6, 12, 24): sets K")
    p.add_argument("--device", default="cpu")
    p.add_argument("--random-weights", action="store_true",
                   help="untrained codec of the same architecture (offline pipeline test; codes are meaningless)")
    p.set_defaults(func=_cmd_data_encode)

    p = sub.add_parser("doctor", help="diagnose a run from its run dir (exit 1 when it has error findings)")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print the diagnosis as JSON")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("export", help="write a run's model in another format (hf: a transformers Llama directory)")
    p.add_argument("run_dir")
    p.add_argument("--format", default="hf", help="hf: Hugging Face transformers (Llama; lm runs)")
    p.add_argument("--out", required=True, help="output folder (new or empty)")
    p.add_argument("--checkpoint", default=None, help="checkpoint name under RUN/checkpoints (default best, else latest)")
    p.set_defaults(func=_cmd_export)

    config = sub.add_parser("config", help="inspect configs").add_subparsers(dest="config_command", required=True)
    p = config.add_parser("show", help="print the resolved config")
    p.add_argument("preset", help="preset name or YAML path")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_cmd_config_show)
    p = config.add_parser("list", help="list the shipped presets")
    p.set_defaults(func=_cmd_config_list)

    scaling = sub.add_parser("scaling", help="scaling laws: plan a budget, fit your runs, IsoFLOP sweeps").add_subparsers(
        dest="scaling_command", required=True)
    p = scaling.add_parser("plan", help="compute-optimal model size and tokens for a budget (published fits, cited)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--flops", type=_tokens, help="training compute C in FLOPs (e.g. 5.76e23)")
    budget.add_argument("--gpu-hours", type=float, help="GPU-hours (with --gpu and --mfu)")
    p.add_argument("--gpu", default="h100", help="accelerator for --gpu-hours (h100, a100, h200, ...; see docs/scaling.md)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for --gpu-hours (default 0.4)")
    p.add_argument("--tokens-available", type=_tokens, help="unique tokens in your dataset (e.g. 300B): epochs and advice")
    p.add_argument("--law", default="besiroglu2024", help="besiroglu2024 (default), hoffmann2022 or muennighoff2023")
    p.add_argument("--vocab-size", type=int, default=32000, help="vocabulary for the shapes' total params (default 32000)")
    p.add_argument("--seq-len", type=int, default=2048, help="sequence length for FLOPs/token (default 2048)")
    p.add_argument("--base", default=None, help="preset or YAML whose model section the shapes follow (ffn, GQA, tying)")
    p.set_defaults(func=_cmd_scaling_plan)
    p = scaling.add_parser("fit", help="fit L(N, D) = E + A/N^alpha + B/D^beta (and IsoFLOP parabolas) to finished runs")
    p.add_argument("runs", nargs="*", help="run dirs")
    p.add_argument("--root", default=None, help="use every run dir under this folder (e.g. runs/ or a sweep's folder)")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for the uncertainty (0 = none)")
    p.add_argument("--plot", default="scaling_fit.png", help="PNG to write (default scaling_fit.png)")
    p.add_argument("--no-plot", action="store_true", help="write no plot")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cmd_scaling_fit)
    p = scaling.add_parser("sweep", help="write IsoFLOP sweep configs: several model sizes per budget, 6ND = C")
    p.add_argument("--flops", type=_flops_list, required=True, help="budgets, comma-separated (e.g. 1e15,3e15,1e16)")
    p.add_argument("--base", default="tiny-lm", help="preset or YAML the configs start from (default tiny-lm)")
    p.add_argument("--out", default="isoflop-sweep", help="folder for the YAML files (default isoflop-sweep)")
    p.add_argument("--sizes", type=int, default=5, help="model sizes per budget (default 5)")
    p.add_argument("--spread", type=float, default=4.0, help="sizes span N_opt/spread .. N_opt*spread (default 4)")
    p.add_argument("--law", default="besiroglu2024", help="law that centres the sizes on N_opt (default besiroglu2024)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for the base, e.g. train.batch_size=8")
    p.set_defaults(func=_cmd_scaling_sweep)

    p = sub.add_parser("sweep", help="run a grid of configs in turn (failures recorded), then compare them")
    p.add_argument("config", help="preset, YAML file, or a folder of YAML configs (e.g. from `scaling sweep`)")
    p.add_argument("--grid", nargs="+", metavar="KEY=V1,V2", help="e.g. optim.lr=1e-4,3e-4,1e-3 model.n_layers=4,8")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a fixed override for every run (repeatable)")
    p.add_argument("--budget-tokens", type=_tokens, help="train each run on this many tokens (sets train.max_steps)")
    p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    p.add_argument("--launcher", default="python", choices=["python", "torchrun", "slurm"],
                   help="--dry-run output: plain commands, torchrun commands or a Slurm array script")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run for torchrun / Slurm")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("runs", help="list runs (status, steps, val loss, findings, commit); `runs note` adds a note")
    p.add_argument("--root", default="runs", help="folder holding the run dirs (default runs)")
    p.add_argument("--json", action="store_true", help="print the summaries as JSON")
    p.set_defaults(func=_cmd_runs)
    note = p.add_subparsers(dest="runs_command").add_parser("note", help="append a timestamped note to RUN/notes.md")
    note.add_argument("run_dir")
    note.add_argument("text", help='hypothesis or result, in quotes')
    note.set_defaults(func=_cmd_runs_note)

    p = sub.add_parser("compare", help="compare runs: config diff, strict A/B check, matched metrics, plots")
    p.add_argument("run_dirs", nargs="+", metavar="RUN")
    p.add_argument("--metric", default="val_loss", help="metrics.jsonl key to compare on (default val_loss)")
    p.add_argument("--out", default=None, metavar="DIR", help="also write compare.md, compare.html and PNG plots here")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("report", help="write a research-log page for a run (self-contained HTML or Markdown)")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, metavar="FILE", help="FILE.html or FILE.md (default RUN/report.html)")
    p.set_defaults(func=_cmd_report)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    from scratchlab.fileio import RecordWarning

    if issubclass(category, RecordWarning):  # a bad line in a run's record: one plain line
        text = f"warning: {message}\n"
    else:
        text = warnings.formatwarning(message, category, filename, lineno, line)
    try:
        (file or sys.stderr).write(text)
    except (OSError, ValueError, AttributeError):
        pass  # stderr is gone: a warning must not stop anything


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's exit flush cannot fail again (Python docs, 'SIGPIPE')."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _say(text: str) -> None:
    try:
        print(text, file=sys.stderr)
    except (OSError, ValueError, AttributeError):
        pass  # stderr closed too: the exit code says it


def _run(args: argparse.Namespace, debug: bool) -> int:
    try:
        code = args.func(args)
        sys.stdout.flush()  # inside the guard: a closed pipe shows up here, not at interpreter exit
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except UserError as exc:
        if debug:
            raise
        _say(f"error: {exc}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except OSError as exc:
        if debug or exc.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        _say(f"error: {where}{exc.strerror or exc}")
        return EXIT_OS_ERROR


def _raise_broken_pipe(console: object) -> None:
    raise BrokenPipeError(errno.EPIPE, "Broken pipe")  # rich would exit 1; main answers it like any verb


def main(argv: Sequence[str] | None = None) -> int:
    from rich.console import Console

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    args = build_parser().parse_args(argv)
    previous = warnings.showwarning, Console.on_broken_pipe
    warnings.showwarning = _show_warning
    Console.on_broken_pipe = _raise_broken_pipe  # type: ignore[method-assign]
    try:
        return _run(args, debug)
    finally:
        warnings.showwarning, Console.on_broken_pipe = previous  # type: ignore[method-assign]


if __name__ == "__main__":
    raise SystemExit(main())
