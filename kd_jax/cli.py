"""`kd-jax`: parse, validate, call the library. A user mistake is one line and exit code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kd_jax import config as config_lib
from kd_jax.config import ConfigError
from kd_jax.parallel.cpu import keep_cpu_step_memory

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse whose refusals are one line, as every other refusal is (its usage block is what
    --help prints)."""

    def error(self, message: str):
        # A missing config is reported with the overrides that may follow it, which may not.
        message = message.replace("config, overrides", "config")
        raise ConfigError(f"{message} ({self.prog} --help shows the usage)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kd-jax", description="Knowledge distillation in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("train", "train a model on hard labels (a teacher, or a baseline)"),
                       ("distill", "distill a frozen teacher into a student")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("config", help="experiment YAML file")
        p.add_argument("overrides", nargs="*", help="section.key=value")
    text = ("tokenize and pack the configured data once into the token store data.store "
            "(resumable; train, distill, eval and precompute then read it), and the rows a "
            "teacher of another tokenizer reads beside it")
    p = sub.add_parser("prepare", help=text, description=text)
    p.add_argument("config", help="experiment YAML file (data.store and the data section)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    text = "run the teacher once and cache its targets in cache.dir (topk, sample or full)"
    p = sub.add_parser("precompute", help=text, description=text)
    p.add_argument("config", help="experiment YAML file (teacher.path, cache.dir, cache.mode)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p = sub.add_parser("cache", help="check or import a teacher-logit cache")
    cache_sub = p.add_subparsers(dest="cache_command", required=True)
    p = cache_sub.add_parser("verify", help="check every shard's checksum and the alignment "
                                            "with the data")
    p.add_argument("dir", help="cache directory")
    p.add_argument("--config", help="the experiment YAML the cache is for: also check that its "
                                    "rows are the cached ones")
    p.add_argument("overrides", nargs="*", help="section.key=value (with --config)")
    p = cache_sub.add_parser(
        "import", help="a top-k cache from API logprobs (OpenAI chat-completions JSONL)")
    p.add_argument("jsonl", help="one response per line: prompt and logprobs.content")
    p.add_argument("dir", help="cache directory to create")
    p.add_argument("--config", help="experiment YAML (data.tokenizer, data.seq_len, "
                                    "data.heldout_fraction, cache.value_dtype)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p = sub.add_parser("eval", help="evaluate a run on held-out data (and task files)",
                       description="evaluate a run's latest checkpoint on held-out data, and "
                                   "with --tasks, it and its teachers on multiple-choice task "
                                   "files; or a Hugging Face checkpoint directory on task files")
    p.add_argument("target", help="a run directory, an experiment YAML (its train.run_dir), or "
                                  "a Hugging Face checkpoint directory (an export)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--tasks", action="append", default=[], metavar="FILE.jsonl",
                   help="a task file, one JSON object a line: context, choices, answer "
                        "(docs/tasks.md); repeat for several")
    p.add_argument("--tokenizer", help="a checkpoint directory's tokenizer: byte, or a "
                                       "tokenizer.json (default: its own tokenizer.json)")
    text = ("compile the configured step ahead of time from shapes alone, on N placeholder "
            "devices, and print per device what it needs and whether it fits")
    p = sub.add_parser("plan", help=text, description=text)
    p.add_argument("config", help="experiment YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--devices", type=int, default=1, help="devices of the mesh (default 1)")
    p.add_argument("--device-memory", type=float, default=None, metavar="GB",
                   help="memory of one device, GiB: say whether the step fits")
    text = "write a run's student as a Hugging Face checkpoint directory, with a model card"
    p = sub.add_parser("export", help=text, description=text)
    p.add_argument("run_dir", help="a run directory (its latest checkpoint is exported)")
    p.add_argument("out_dir", help="the directory to create")
    p.add_argument("--dtype", help="weights dtype: float32, bfloat16 or float16 (default: the "
                                   "run's model.param_dtype); with gguf, of the weights left "
                                   "in float")
    p.add_argument("--format", choices=("safetensors", "gguf"), default="safetensors",
                   help="safetensors: a Hugging Face checkpoint directory (default); gguf: "
                        "model.gguf for llama.cpp, q8_0/q4_0 weights as the run trained them "
                        "(docs/quantization.md)")
    text = ("compare finished runs (a teacher, distilled students, hard-label baselines): "
            "report.png with their curves, report.md with the retention table")
    p = sub.add_parser("report", help=text, description=text)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    p.add_argument("--out", help="where to write report.png and report.md (default: the run "
                                 "directory; for several, the first one's parent)")
    text = ("generate responses to a set of prompts with a run's student or its teacher, "
            "as JSONL (generate.out)")
    p = sub.add_parser("generate", help=text, description=text)
    p.add_argument("config", help="experiment YAML file (the generate section)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p = sub.add_parser("demo", help="teacher, distilled and hard-label students on the "
                                    "Python standard library; no download")
    p.add_argument("--out", default="kd_jax_demo", help="run directory (default ./kd_jax_demo)")
    p.add_argument("--quick", action="store_true",
                   help="a much smaller budget, to check the pipeline (numbers not meaningful)")
    parser.commands = tuple(sub.choices)  # type: ignore[attr-defined]
    return parser


def _cache_summary(summary: dict) -> str:
    parts = [f"{summary['cache_dir']}: {summary['mode']} cache, {summary['shards']} shards "
             f"({summary['shards_written']} written now), {summary['rows']} rows"]
    if summary.get("bytes_per_token") is not None:
        parts.append(f"{summary['bytes_per_token']:.2f} bytes/token on disk")
    if summary.get("tokens_per_second"):
        parts.append(f"{summary['tokens_per_second']:,.0f} tokens/s")
    return ", ".join(parts)


def _cache_command(args) -> None:
    from kd_jax.cache import shards

    if args.cache_command == "verify":
        expected = None
        if args.config:
            cfg = config_lib.load(args.config, args.overrides)
            from kd_jax.cache.fingerprints import fingerprints
            from kd_jax.cache.manifest import check_fingerprints, read_manifest
            from kd_jax.train.run_data import load_data

            data = load_data(cfg)
            # What differs, named (the tokenizer, the data, the packing) before any shard is read.
            check_fingerprints(read_manifest(args.dir), {
                "fingerprints": fingerprints(cfg, data.tokenizer, data.train, None),
                "seq_len": cfg.data.seq_len, "n_rows": data.train.n_rows}, args.dir)
            expected = data.train.row_hashes()
        elif args.overrides:
            raise ConfigError("overrides need --config")
        result = shards.verify(args.dir, expected)
        aligned = ", rows match the data" if expected is not None else ""
        print(f"{args.dir}: {result['shards']} shards, {result['rows']} rows, "
              f"{result['bytes_per_token']:.2f} bytes/token: checksums pass{aligned}")
    elif args.cache_command == "import":
        cfg = config_lib.load(args.config, args.overrides)
        from kd_jax.cache.api_import import import_openai_jsonl
        from kd_jax.data.tokenizers import load_tokenizer
        from kd_jax.train.resolve import tokenizer_spec

        summary = import_openai_jsonl(
            args.jsonl, load_tokenizer(tokenizer_spec(cfg)), args.dir,
            seq_len=cfg.data.seq_len, heldout_fraction=cfg.data.heldout_fraction,
            seed=cfg.data.seed, value_dtype=cfg.cache.value_dtype,
            rows_per_shard=cfg.cache.rows_per_shard)
        print(f"{args.dir}: {summary}")


def _eval_command(args) -> None:
    from kd_jax.eval.report import eval_table, tasks_table

    target = Path(args.target)
    overrides = list(args.overrides)
    if target.is_dir() and (target / "config.json").is_file() and not (
            target / "config.yaml").is_file():  # a Hugging Face checkpoint directory
        if not args.tasks:
            raise ConfigError(f"{target} is a checkpoint directory, not a run: kd-jax eval "
                              "scores it on task files (--tasks FILE.jsonl)")
        if overrides:
            raise ConfigError(f"overrides apply to a run, not to the checkpoint directory "
                              f"{target}")
        from kd_jax.train.tasks import evaluate_checkpoint_tasks

        result = evaluate_checkpoint_tasks(target, args.tasks, args.tokenizer)
        print(tasks_table(result["tasks"]))
        return
    if args.tokenizer:
        raise ConfigError("--tokenizer applies to a checkpoint directory; a run reads with its "
                          "own tokenizer")
    if target.is_file():
        cfg = config_lib.load(target, overrides)
        target = Path(cfg.train.run_dir)
    elif not target.is_dir():
        raise ConfigError(f"{target} is neither a run directory nor a config file")
    from kd_jax.train.loop import evaluate_checkpoint

    result = evaluate_checkpoint(target, overrides, args.tasks)
    print(eval_table(result))
    if result.get("tasks"):
        print(tasks_table(result["tasks"]))
    print(f"wrote {target / 'report.json'}")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = list(parser.commands)
    if argv and not argv[0].startswith("-") and argv[0] not in commands:
        # argparse's own wording of this differs between Python versions
        raise ConfigError(f"unknown command '{argv[0]}'; the commands are "
                          f"{', '.join(commands)} (kd-jax --help shows the usage)")
    # Overrides may follow options too (`plan CONFIG --devices 8 mesh.fsdp=8`): argparse leaves
    # positionals after an option unparsed; they join the overrides.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(
                item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = _arguments(argv)
    except ConfigError as err:
        print(f"kd-jax: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    # Before JAX starts its CPU client: each step's temporaries stay mapped between steps.
    keep_cpu_step_memory()
    preemption = None
    if args.command in ("train", "distill", "precompute"):
        from kd_jax.train.preemption import Preemption

        # Before JAX is imported: a SIGTERM or Ctrl-C from now on stops the run cleanly.
        preemption = Preemption()
    try:
        if args.command in ("train", "distill"):
            cfg = config_lib.load(args.config, args.overrides)
            from kd_jax.eval.report import eval_table
            from kd_jax.train.loop import run

            result = run(cfg, args.command, preemption)
            if "student" in result:
                print(eval_table(result))
        elif args.command == "eval":
            _eval_command(args)
        elif args.command == "prepare":
            cfg = config_lib.load(args.config, args.overrides)
            from kd_jax.train.run_data import prepare_data, prepare_teacher_data

            for summary in prepare_data(cfg):
                done = (f"prepared in {summary['seconds']:.1f} s" if summary["prepared"]
                        else f"already prepared, nothing tokenized; every row read back and "
                             f"matching its recorded hash ({summary['verified']:,} rows, "
                             f"{summary['seconds']:.1f} s)")
                print(f"{summary['store']}: {done}; {summary['documents']:,} documents, "
                      f"{summary['tokens']:,} tokens, {summary['train_rows']:,} training and "
                      f"{summary['heldout_rows']:,} held-out rows of {summary['seq_len']} "
                      "tokens")
            for line in prepare_teacher_data(cfg):
                print(line)
        elif args.command == "precompute":
            cfg = config_lib.load(args.config, args.overrides)
            from kd_jax.train.precompute import precompute

            summary = precompute(cfg, preemption)
            print(_cache_summary(summary))
        elif args.command == "cache":
            _cache_command(args)
        elif args.command == "plan":
            if args.devices < 1:
                raise ConfigError(f"--devices must be >= 1, got {args.devices}")
            from kd_jax.train.plan import plan, plan_table, use_placeholder_devices

            use_placeholder_devices(args.devices)  # before anything starts JAX's backends
            cfg = config_lib.load(args.config, args.overrides)
            print(plan_table(plan(cfg, args.device_memory)))
        elif args.command == "export":
            if args.format == "gguf":
                from kd_jax.export_gguf import export_gguf as export
            else:
                from kd_jax.export import export

            result = export(args.run_dir, args.out_dir, args.dtype)
            print(f"wrote {result['out_dir']}: step {result['step']}, {result['dtype']}, "
                  f"{', '.join(result['files'])}")
        elif args.command == "report":
            from kd_jax.compare import compare_runs

            png, md = compare_runs(args.run_dirs, args.out)
            print(f"wrote {png} and {md}")
        elif args.command == "generate":
            cfg = config_lib.load(args.config, args.overrides)
            from kd_jax.train.generate import generate

            summary = generate(cfg)
            print(f"wrote {summary['out']}: {summary['rows']} responses, "
                  f"{summary['tokens']:,} new tokens, {summary['tokens_per_second']:,.0f} "
                  "tokens/s")
        elif args.command == "demo":
            from kd_jax import demo

            demo.run(Path(args.out), quick=args.quick)
    except ConfigError as err:
        print(f"kd-jax: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("kd-jax: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the loop's own endings: a non-finite loss, a preemption
        from kd_jax.train.loop import NonFiniteError
        from kd_jax.train.preemption import Preempted

        if isinstance(err, Preempted):
            print(f"kd-jax: {err}", file=sys.stderr)
            return err.exit_code
        if isinstance(err, NonFiniteError):
            print(f"kd-jax: error: {err}", file=sys.stderr)
            return 1
        raise
    finally:
        if preemption is not None:
            preemption.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
