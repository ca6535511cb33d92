"""The `scratchlab` command. Every verb is a thin call into a public library function.

Bad input raises `UserError`: printed as one line, exit code 2, no traceback unless
``--debug`` is given.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from scratchlab.errors import EXIT_USER_ERROR, UserError


def _cmd_train(args: argparse.Namespace) -> int:
    from scratchlab.config import load_config
    from scratchlab.train import train

    preset, overrides = args.preset, list(args.overrides)
    if preset and "=" in preset:  # `scratchlab train optim.lr=1e-3`: no preset named, only overrides
        preset, overrides = None, [preset, *overrides]
    if args.resume:
        if preset:
            raise UserError("--resume takes the run's own config; give only overrides (e.g. train.max_steps=2000)")
        result = train(resume=args.resume, overrides=overrides)
    else:
        result = train(load_config(preset or "tiny-lm", overrides))
    return 0 if result.status in ("finished", "stopped") else 1


def _cmd_sample(args: argparse.Namespace) -> int:
    from scratchlab.sample import sample_run

    text = sample_run(
        args.run_dir,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        checkpoint=args.checkpoint,
    )
    print(text)
    return 0


def _cmd_data_text(args: argparse.Namespace) -> int:
    import json

    from scratchlab.data.text import prepare_text

    out = prepare_text(args.src, args.out, vocab_size=args.vocab_size, tokenizer_path=args.tokenizer,
                       val_fraction=args.val_fraction)
    meta = json.loads((out / "meta.json").read_text())
    s = meta["splits"]
    print(
        f"wrote {out}: vocab {meta['vocab_size']}, train {s['train']['tokens']:,} tokens / {s['train']['documents']} docs, "
        f"val {s['val']['tokens']:,} tokens / {s['val']['documents']} docs\nuse it with: scratchlab train data.path={out}"
    )
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    from scratchlab.config import load_config, to_yaml

    print(to_yaml(load_config(args.preset, args.overrides)), end="")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scratchlab", description="Train autoregressive transformers from scratch.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (default: the tiny-lm preset on the stdlib corpus)")
    p.add_argument("preset", nargs="?", help="preset name or YAML path (default tiny-lm)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 train.max_steps=200")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sample", help="generate text from a trained run")
    p.add_argument("run_dir")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--checkpoint", default=None, help="checkpoint name under RUN/checkpoints (default best, else latest)")
    p.set_defaults(func=_cmd_sample)

    data = sub.add_parser("data", help="prepare datasets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("text", help="tokenize text into a data dir (BPE + token shards)")
    p.add_argument("src", help="a folder of text files, a text file, or a .jsonl with a 'text' field")
    p.add_argument("--out", required=True, help="output data dir")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--tokenizer", default=None, help="use this tokenizer.json instead of training one")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.set_defaults(func=_cmd_data_text)

    p = sub.add_parser("doctor", help="diagnose a run from its run dir (exit 1 when it has error findings)")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print the diagnosis as JSON")
    p.set_defaults(func=_cmd_doctor)

    config = sub.add_parser("config", help="inspect configs").add_subparsers(dest="config_command", required=True)
    p = config.add_parser("show", help="print the resolved config")
    p.add_argument("preset", help="preset name or YAML path")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_cmd_config_show)
    p = config.add_parser("list", help="list the shipped presets")
    p.set_defaults(func=_cmd_config_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
