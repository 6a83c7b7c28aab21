"""The ``eac`` command line.

Imports of torch/transformers happen inside the subcommands, so ``eac --help`` and cache hits stay fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="data directory (default: $EAC_DATA_DIR or <cache>/data)")
    parser.add_argument("--cache-dir", help="cache directory (default: $EAC_CACHE_DIR or ~/.cache/eac)")


def _apply_dirs(args) -> None:
    # Subcommands and the workers they start read the settings from the environment.
    if getattr(args, "data_dir", None):
        os.environ["EAC_DATA_DIR"] = os.path.abspath(args.data_dir)
    if getattr(args, "cache_dir", None):
        os.environ["EAC_CACHE_DIR"] = os.path.abspath(args.cache_dir)


def cmd_model_pull(args) -> int:
    from workers.models import pull_model

    start = time.perf_counter()
    path = pull_model(args.name)
    print(f"{args.name}: {path} ({time.perf_counter() - start:.1f} s)")
    return 0


def cmd_data_check(args) -> int:
    """Load every data set of ``workers.data.DATASETS`` from the data directory and print the counts."""
    from workers import data, settings

    print(f"data directory: {settings.data_dir()}")
    failed = 0
    for name, dataset in data.DATASETS.items():
        try:
            if dataset.kind == "text":
                print(f"  {name:20s} {len(dataset.load(None)):,} characters")
                continue
            report = data.LoadReport(name)
            # Invalid records are skipped only in the edit data sets; a task file is read whole.
            dataset.load(None, report=report, **({"skip_invalid": args.skip_invalid} if dataset.kind == "edit" else {}))
            print(f"  {name:20s} {report.summary()}")
        except (data.DataError, FileNotFoundError) as exc:
            failed += 1
            print(f"  {name:20s} ERROR {exc}")
    return 1 if failed else 0


def cmd_answers(args) -> int:
    """Greedy answers of the model to the first CounterFact edit prompts, next to the targets."""
    from workers.data import load_edit_dataset
    from workers.generation import begins_with, greedy_continuations
    from workers.models import load_model

    model, tokenizer = load_model(args.model)
    requests = load_edit_dataset(args.dataset)[: args.n]
    answers = greedy_continuations(model, tokenizer, [r.prompt for r in requests], max_new_tokens=args.max_new_tokens)
    known = 0
    print(f"{'case':>5}  {'prompt':55s} {'greedy answer':32s} {'ground_truth':16s} {'target_new':16s} knows")
    for request, answer in zip(requests, answers):
        knows = bool(request.target_true) and begins_with(answer, request.target_true)
        known += knows
        print(f"{request.case_id!s:>5}  {request.prompt[:55]:55s} {answer.strip()[:32]!r:32s} "
              f"{str(request.target_true)[:16]:16s} {request.target_new[:16]:16s} {'yes' if knows else 'no'}")
    print(f"the model already knows {known} of {len(requests)} facts (greedy answer begins with ground_truth)")
    return 0


class Stop:
    """SIGTERM (``ray job stop``, a batch scheduler, ``kill``) handled as SIGINT: a ``KeyboardInterrupt``
    in the main thread, so the same clean teardown runs (trajectories ``interrupted``, Ray shut down).
    Which signal it was is kept here, not in the exception: Ray re-raises interrupts as its own."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = None

    def on_sigterm(self) -> "Stop":
        import signal

        def terminate(signum, frame):
            self.signal = signum
            raise KeyboardInterrupt("SIGTERM")

        previous = signal.signal(signal.SIGTERM, terminate)
        self._previous = self._previous or (previous,)
        return self

    def restore(self) -> None:
        """The SIGTERM handler from before (``main`` called in a longer-lived process, a test)."""
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous[0])

    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process stopped by it (SIGINT: 130)."""
        return 128 + (self.signal or 2)


def cmd_run(args) -> int:
    """Run an experiment spec on Ray: trajectories, evaluations, the store, a summary and the report."""
    from orchestrator.cluster import ClusterError, join_address
    from orchestrator.driver import Driver, format_summary
    from orchestrator.progress import Progress, resolve_mode
    from orchestrator.spec import SpecError, load_spec
    from orchestrator.status import status_text
    from orchestrator.store import Store, StoreError
    from workers.data import DataError

    stop = args.stop.on_sigterm()
    try:
        if args.address and not args.dry_run:  # a cluster that cannot be joined, found before the plan
            join_address(args.address, args.connect_timeout)
        spec = load_spec(args.spec)
        store = Store(args.store or spec.store)
        progress = Progress(resolve_mode("none" if args.no_progress else args.progress),
                            every_edits=args.progress_every, every_seconds=args.progress_seconds)
        driver = Driver(spec, store, address=args.address, progress=progress, connect_timeout=args.connect_timeout)
        plan = driver.plan()  # every check that needs no actor, before any starts
        if not args.dry_run and any(not t.finished for t in plan):
            store.check_writable()
        elif not args.dry_run and not args.no_report and store.exists():  # the report goes to STORE/report
            try:
                store.check_writable()
            except StoreError as exc:
                raise StoreError(f"{exc}; its work is complete: add --no-report, or draw the report elsewhere "
                                 f"with `eac report {store.uri} --out DIR`") from None
    except (SpecError, DataError, OSError, StoreError, ValueError, ClusterError) as exc:
        print(f"eac run: {one_line(exc)}", file=sys.stderr)
        return 2
    if args.dry_run:
        from orchestrator.dry_run import format_dry_run

        print(f"{spec.experiment} ({args.spec}):\n{format_dry_run(store, plan, spec.resources)}")
        return 0
    todo = sum(not t.finished for t in plan)
    print(f"{spec.experiment}: {len(plan)} trajectories ({len(plan) - todo} already complete) -> {store.uri}",
          flush=True)
    start = time.perf_counter()
    try:
        result = driver.run()
    except KeyboardInterrupt:
        print(f"\ninterrupted; `eac run {args.spec}` again resumes from the store", file=sys.stderr)
        return stop.exit_code()
    except (StoreError, ClusterError) as exc:  # another run holds the experiment's lock; no cluster there
        print(f"eac run: {one_line(exc)}", file=sys.stderr)
        return 2
    print(f"\n{format_summary(result.summary)}\n({time.perf_counter() - start:.0f} s)")
    for trajectory in result.failed:
        print(f"FAILED {trajectory.spec.label}: {status_text(trajectory.status, trajectory.reason)}",
              file=sys.stderr)
    if not args.no_report:
        from experiments.figures import build_report

        print(f"report: {build_report(store.location, experiments=[spec.experiment])}")
    return result.exit_code


def cmd_tune(args) -> int:
    """Ray Tune search over EAC's hyper-parameters; trials in the store, the best as a hparams YAML."""
    import dataclasses

    from orchestrator.cluster import ClusterError
    from orchestrator.driver import plan_trajectories
    from orchestrator.spec import SpecError
    from orchestrator.store import Store, StoreError
    from orchestrator.tune_spec import load_tune_spec
    from orchestrator.tuning import format_trials, run_tune
    from workers.data import DataError

    try:
        spec = load_tune_spec(args.spec)
        if args.num_samples is not None:
            spec = dataclasses.replace(spec, search=dataclasses.replace(spec.search, num_samples=args.num_samples))
        store = Store(args.store or spec.experiment.store)
        store.root  # Ray Tune's trial files and the best-config YAMLs need a POSIX path: fail before any trial
        plan_trajectories(spec.experiment, store)  # data and hparams checked before any trial
    except (SpecError, DataError, OSError, StoreError, ValueError) as exc:
        print(f"eac tune: {one_line(exc)}", file=sys.stderr)
        return 2
    args.stop.on_sigterm()
    print(f"{spec.experiment.experiment}: {len(spec.searches())} search(es) × {spec.search.num_samples} trials "
          f"-> {store.uri}")
    start = time.perf_counter()
    try:
        outcome = run_tune(spec, store, address=args.address, out_dir=args.out, verbose=0 if args.quiet else 1)
    except KeyboardInterrupt:
        print(f"\ninterrupted; `eac tune {args.spec}` again reuses the trials already in the store", file=sys.stderr)
        return args.stop.exit_code()
    except (StoreError, ClusterError) as exc:
        print(f"eac tune: {one_line(exc)}", file=sys.stderr)
        return 2
    for search in outcome.searches:
        print(f"\n{search.model} / {search.variant}:\n{format_trials(search)}")
        if search.ok:
            print(f"best: objective {search.best_objective:.4g} -> {search.best_path}")
        else:
            print(f"no trial of {search.model} / {search.variant} reached the last checkpoint", file=sys.stderr)
    print(f"({time.perf_counter() - start:.0f} s)")
    return outcome.exit_code


def cmd_report(args) -> int:
    """Figures and a Markdown summary from the Parquet store alone."""
    from experiments.figures import build_report
    from orchestrator.store import Store, StoreError

    try:
        store = Store(args.store)
        if args.out is None and store.exists():  # the report goes to STORE/report: fail before drawing
            try:
                store.check_writable()
            except StoreError as exc:
                raise StoreError(f"{exc}; draw the report elsewhere with --out DIR") from exc
        path = build_report(args.store, args.out, args.experiment or None)
    except (OSError, ValueError, StoreError) as exc:  # OSError: also an unreachable object store
        print(f"eac report: {one_line(exc)}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


def cmd_compare(args) -> int:
    """Paired comparison of arms against a base arm, from the store's examples table."""
    from pathlib import Path

    from orchestrator.compare import CompareError, compare_arms, format_table, write_csv
    from orchestrator.store import Store, StoreError

    try:
        store = Store(args.store)
        if not store.exists():
            raise StoreError(f"{store.uri}: no such store")
        if args.experiment not in store.experiments():
            raise CompareError(f"{store.uri}: no experiment {args.experiment!r}; the store holds {store.experiments()}")
        frame = compare_arms(store, args.experiment, args.base, args.arm or None, args.at,
                             complete_only=args.complete_only)
    except (OSError, StoreError, CompareError) as exc:
        print(f"eac compare: {one_line(exc)}", file=sys.stderr)
        return 1
    print(format_table(frame))
    out = Path(args.out) if args.out else (store.root / "report" / args.experiment if store.is_local else None)
    if out is not None:
        print(f"compare.csv: {write_csv(frame, out / 'compare.csv')}")
    return 0


def one_line(exc: BaseException) -> str:
    """An error as the one line a user reads (messages quoting YAML or JSON may span several)."""
    return " ".join(str(exc).split())


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of at least 1")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number of seconds")
    return value


def parse_layers(text: str) -> list[int]:
    """``"5"``, ``"4-8"`` or ``"4,6,8"`` (ranges and lists may mix: ``"1-3,7"``) -> sorted layers."""
    layers: set[int] = set()
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            layers.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers {text!r}: expected e.g. 5, 4-8 or 4,6,8") from None
    if not layers:
        raise argparse.ArgumentTypeError(f"--layers {text!r} names no layer")
    return sorted(layers)


def cmd_stats(args) -> int:
    """Precompute (or find in the cache) second moments of MLP keys for the given layers."""
    from workers.models import load_model
    from workers.stats import SecondMomentCache, StatsConfig, second_moments

    given = {"corpus": args.corpus, "token_budget": args.token_budget, "max_length": args.max_length,
             "batch_size": args.batch_size}
    try:
        config = StatsConfig(**{field: value for field, value in given.items() if value is not None})
        model, tokenizer = load_model(args.model)
        cache = SecondMomentCache()
        print(f"second moments of {args.model}, layers {args.layers}, {config.corpus}, "
              f"{config.token_budget:,} tokens (max_length {config.max_length}) -> {cache.directory}")
        start = time.perf_counter()
        results = second_moments(model, tokenizer, args.layers, config=config, cache=cache, progress=True)
    except (ValueError, FileNotFoundError) as exc:
        print(f"eac stats: {exc}", file=sys.stderr)
        return 1
    for layer, second_moment in results.items():
        print(f"  layer {layer}: {tuple(second_moment.shape)}, trace {second_moment.trace().item():.4g}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_eval(args) -> int:
    """Evaluate a model (optionally + an edit log): editing metrics and general-ability tasks."""
    import json

    import torch

    from workers.data import DataError, load_edit_dataset
    from workers.editing.delta import EditLog, check_binding, check_requests
    from workers.evaluation import EvalConfig, ReferenceCache, evaluate_checkpoint
    from workers.models import load_model, weights_fingerprint

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.json:  # found now, not after all the scoring
            check_output_file(args.json, "--json")
        config = EvalConfig.from_yaml(args.config) if args.config else EvalConfig()
        overrides = {"seed": args.seed, "batch_size": args.batch_size, "prompt_format": args.prompt_format}
        fields = {**vars(config), **{k: v for k, v in overrides.items() if v is not None}}
        if args.tasks:
            fields["tasks"] = {name: int(count) for name, count in
                               (item.split("=", 1) for item in args.tasks.split(","))}
        config = EvalConfig.from_dict(fields, source="eac eval")
        log = EditLog.load(args.edit_log) if args.edit_log else None  # bad input fails before the model loads
        requests = load_edit_dataset(args.dataset)
        if log is not None:
            edited = {str(case) for delta in log for case in delta.case_ids}
            requests = [r for r in requests if str(r.case_id) in edited]
            missing = edited - {str(r.case_id) for r in requests}
            if missing:
                raise ValueError(f"edit log {args.edit_log} was made from other requests: case id "
                                 f"{sorted(missing)[0]!r} is not in {args.dataset}")
            check_requests(log.metadata, requests, args.edit_log)  # the same records it edited?
        else:
            requests = requests[:args.n]
        model, tokenizer = load_model(args.model)
        if log is not None:  # made on these base weights?
            check_binding(log.metadata, {"base_fingerprint": weights_fingerprint(model)}, args.edit_log)
        start = time.perf_counter()
        rows = evaluate_checkpoint(model, tokenizer, log, requests, config,
                                   reference=ReferenceCache(args.reference_cache) if args.reference_cache else None)
    except (ValueError, OSError, DataError) as exc:  # OSError: a directory or unreadable file given as a path
        print(f"eac eval: {one_line(exc)}", file=sys.stderr)
        return 2
    print(f"{args.model}{' + ' + args.edit_log if args.edit_log else ''}: {len(requests)} edit requests, "
          f"tasks {config.tasks}, seed {config.seed}, prompt format {config.prompt_format} "
          f"({time.perf_counter() - start:.0f} s, {torch.get_num_threads()} threads)")
    for row in rows:
        print(f"  {row}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump([row.as_dict() for row in rows], handle, indent=1)
    return 0


def check_output_file(path: str, option: str) -> None:
    """Refuse an output path that cannot be written as a file (a directory, a missing or read-only
    parent) before the work whose result it would hold."""
    target = os.path.abspath(path)
    if os.path.isdir(target):
        raise ValueError(f"{option} {path}: is a directory, not a file")
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise ValueError(f"{option} {path}: no such directory {parent}")
    if not os.access(parent, os.W_OK) or (os.path.exists(target) and not os.access(target, os.W_OK)):
        raise ValueError(f"{option} {path}: not writable")


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line naming the option (argparse prints the whole usage first), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="eac", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    model = sub.add_parser("model", help="model provisioning").add_subparsers(dest="model_command", required=True)
    pull = model.add_parser("pull", help="download/convert a model into the cache (NAME, GGUF file or hub id)")
    pull.add_argument("name")
    _common(pull)
    pull.set_defaults(func=cmd_model_pull)

    data = sub.add_parser("data", help="data sets").add_subparsers(dest="data_command", required=True)
    check = data.add_parser("check", help="load every data set and print record counts")
    check.add_argument("--skip-invalid", action="store_true", help="skip bad records and report them")
    _common(check)
    check.set_defaults(func=cmd_data_check)

    answers = sub.add_parser("answers", help="greedy answers to the first edit prompts")
    answers.add_argument("--model", default="smollm2-135m")
    answers.add_argument("--dataset", default="counterfact")
    answers.add_argument("-n", type=int, default=10)
    answers.add_argument("--max-new-tokens", type=int, default=8)
    _common(answers)
    answers.set_defaults(func=cmd_answers)

    stats = sub.add_parser("stats", help="precompute second moments of MLP keys into the cache")
    stats.add_argument("--model", default="smollm2-135m")
    stats.add_argument("--layers", type=parse_layers, required=True, help="e.g. 5, 4-8 or 4,6,8")
    stats.add_argument("--token-budget", type=int, help="tokens counted (default: StatsConfig's)")
    stats.add_argument("--corpus", help="corpus name (wikitext-test, wikitext-valid) or a text file")
    stats.add_argument("--max-length", type=int, help="tokens per sequence")
    stats.add_argument("--batch-size", type=int, help="sequences per forward pass")
    _common(stats)
    stats.set_defaults(func=cmd_stats)

    run = sub.add_parser("run", help="run an experiment spec (YAML) on Ray into the Parquet store")
    run.add_argument("spec", help="experiment spec, e.g. experiments/configs/demo.yaml")
    run.add_argument("--store", help="result store: a directory or a URI such as s3://bucket/prefix "
                                     "(default: the spec's `store`, else ./results)")
    run.add_argument("--address", help="join this Ray cluster (HOST:PORT or auto) instead of starting a local one")
    run.add_argument("--connect-timeout", type=_positive_float, default=30.0, metavar="SECONDS",
                     help="give up joining the cluster at --address after SECONDS (default 30)")
    run.add_argument("--dry-run", action="store_true",
                     help="check the spec, list the trajectories, what the store holds and the cost; start nothing")
    run.add_argument("--no-report", action="store_true", help="do not draw the report at the end")
    run.add_argument("--progress", choices=["auto", "bars", "lines", "none"], default="auto",
                     help="auto (default): bars on a terminal, plain lines when stdout is a file or pipe")
    run.add_argument("--progress-every", type=_positive_int, default=10, metavar="EDITS",
                     help="plain lines: one per trajectory every EDITS edit steps (default 10) ...")
    run.add_argument("--progress-seconds", type=float, default=30.0, metavar="SECONDS",
                     help="... or every SECONDS seconds, whichever comes first (default 30)")
    run.add_argument("--no-progress", action="store_true", help="no progress report (= --progress none)")
    _common(run)
    run.set_defaults(func=cmd_run)

    tune = sub.add_parser("tune", help="Ray Tune search over EAC's gamma, lambda, mu (a tune spec, YAML)")
    tune.add_argument("spec", help="tune spec, e.g. experiments/configs/tune-rome-eac-smollm2.yaml")
    tune.add_argument("--store", help="result store directory (default: the spec's `store`, else ./results)")
    tune.add_argument("--address", help="join this Ray cluster (e.g. auto) instead of starting a local one")
    tune.add_argument("--out", help="where the best-config YAMLs go (default: STORE/tune)")
    tune.add_argument("--num-samples", type=int, help="trials per search (default: the spec's search.num_samples)")
    tune.add_argument("--quiet", action="store_true", help="no Tune progress table")
    _common(tune)
    tune.set_defaults(func=cmd_tune)

    report = sub.add_parser("report", help="the paper's figures and a Markdown summary from a result store")
    report.add_argument("store", help="the store (what `eac run` wrote): a directory or a URI (s3://...)")
    report.add_argument("--out", help="output directory (default: STORE/report)")
    report.add_argument("--experiment", action="append", help="only this experiment (repeatable)")
    report.set_defaults(func=cmd_report)

    compare = sub.add_parser("compare", help="paired comparison of arms against a base arm (examples table)")
    compare.add_argument("store", help="the store (what `eac run` wrote)")
    compare.add_argument("--experiment", required=True, help="the experiment whose arms are compared")
    compare.add_argument("--base", required=True, help="the base arm (a variant, e.g. rome)")
    compare.add_argument("--arm", action="append", help="an arm to compare with the base (repeatable; default: all)")
    compare.add_argument("--at", type=int, help="only this checkpoint (number of edits)")
    compare.add_argument("--complete-only", action="store_true",
                         help="pair only finished trajectories (while a study runs: keeps the later checkpoints)")
    compare.add_argument("--out", help="directory for compare.csv (default: STORE/report/EXPERIMENT)")
    compare.set_defaults(func=cmd_compare)

    evaluate = sub.add_parser("eval", help="evaluate a model (+ an edit log): editing metrics, general tasks")
    evaluate.add_argument("--model", default="smollm2-135m")
    evaluate.add_argument("--config", help="EvalConfig YAML (default: EvalConfig's defaults)")
    evaluate.add_argument("--edit-log", help="an edit log (safetensors) to apply; its case ids pick the requests")
    evaluate.add_argument("--dataset", default="counterfact", help="edit data set for the editing metrics")
    evaluate.add_argument("-n", type=_positive_int, default=100, help="edit requests evaluated without --edit-log")
    evaluate.add_argument("--tasks", help="task sample counts, e.g. nli=100,sst2=100,wikitext=20")
    evaluate.add_argument("--seed", type=int)
    evaluate.add_argument("--batch-size", type=int)
    evaluate.add_argument("--prompt-format", choices=["raw", "chat"])
    evaluate.add_argument("--reference-cache", help="directory caching the unedited model's predictions")
    evaluate.add_argument("--threads", type=_positive_int, help="torch threads (default: torch's)")
    evaluate.add_argument("--json", help="also write the rows to this JSON file")
    _common(evaluate)
    evaluate.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _apply_dirs(args)
    args.stop = Stop()
    try:
        return args.func(args)
    except KeyboardInterrupt:  # before the subcommand's own handling (while it plans, say)
        print("\ninterrupted", file=sys.stderr)
        return args.stop.exit_code()
    finally:
        args.stop.restore()


if __name__ == "__main__":
    sys.exit(main())
