"""``xailab`` command line: a thin face over ``xailab.api``. Options of ``train`` are generated from
``TrainConfig`` so the two never drift apart."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import re
import sys
import typing
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from xailab import api
from xailab.config import folder_name, read_config_file
from xailab.errors import ConfigError, XailabError, XailabWarning

_INT = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: int() also takes "٣" and "1_000"


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[("" if r.get(c) is None else str(r[c])) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)
    ]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _key_values(items: list[str] | None, flag: str) -> dict[str, Any]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)  # so 3 -> int, 0.5 -> float, true -> bool
    return out


def _strict_int(text: str) -> int:
    """An argparse type: a whole number in ASCII digits (``²``, ``٣``, ``1_000``, `` 3`` are refused)."""
    if not _INT.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(text)


def _strict_float(text: str) -> float:
    """An argparse type: a finite number in ASCII (``1e-3``, ``0.5``; not ``nan``, ``inf`` or ``١``)."""
    try:
        value = float(text) if text.isascii() and "_" not in text and text.strip() == text else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _method_options(items: list[str] | None) -> dict[str, str]:
    """``--method-option [METHOD.]KEY=VALUE`` items as ``{"[METHOD.]KEY": "VALUE"}``: the text is converted to
    each parameter's declared type when the methods validate it (``api.method_options``)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--method-option expects [METHOD.]KEY=VALUE, got {item!r}")
        out[key.strip()] = value
    return out


def _add_train_options(p: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(api.TrainConfig)
    for f in dataclasses.fields(api.TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        default = "" if f.default in (dataclasses.MISSING, None) else f" (default: {f.default})"
        by_recipe = api.recipe_defaults(f.name)
        if by_recipe:  # the dataclass default holds only with --recipe none
            each = ", ".join(f"{name} {value}" for name, value in by_recipe.items())
            default = f" (default: by the data's recipe: {each}; without one: {f.default})"
        help_text = f.metadata.get("help", "") + default
        if f.name in ("model_options", "dataset_options"):
            single = f.name.split("_")[0]
            p.add_argument(
                f"--{single}-option",
                dest=f.name,
                action="append",
                metavar="KEY=VALUE",
                help=f"a {single} option, repeatable (e.g. --{single}-option stride=2)",
            )
            continue
        if hint is bool:
            p.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        origin = typing.get_origin(hint)
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if origin is typing.Literal:
            p.add_argument(
                flag, dest=f.name, choices=list(typing.get_args(hint)), default=None, help=help_text
            )
        else:
            typ = args[0] if args else hint
            parse = {int: _strict_int, float: _strict_float}.get(typ, str)
            p.add_argument(flag, dest=f.name, type=parse, default=None, help=help_text)


def _train_config(args: argparse.Namespace) -> tuple[dict[str, Any], Path | None]:
    data: dict[str, Any] = {}
    resume_dir = Path(args.resume) if args.resume else None
    if resume_dir is not None:
        data.update(api.resume_config(resume_dir))
    if args.config:
        data.update(read_config_file(args.config))
    for f in dataclasses.fields(api.TrainConfig):
        value = getattr(args, f.name)
        if f.name in ("model_options", "dataset_options"):
            if value:
                data[f.name] = {
                    **data.get(f.name, {}),
                    **_key_values(value, f"--{f.name.split('_')[0]}-option"),
                }
        elif value is not None:
            data[f.name] = value
    for key in ("model", "dataset"):
        if key not in data:
            raise ConfigError(f"train: --{key} is required (or give it in --config FILE)")
    return data, resume_dir


def cmd_train(args: argparse.Namespace) -> int:
    if args.devices < 1:
        raise ConfigError(f"train --devices: {args.devices} is out of range; valid: >= 1")
    if args.devices != 1 and not api.launched_by_torchrun():
        return api.launch_distributed(args.argv, args.devices)  # each rank runs this same command
    data, resume_dir = _train_config(args)
    config = api.check_train_config(api.TrainConfig.from_dict(data))
    if resume_dir is not None:
        run = api.train(config, out_dir=resume_dir.parent, name=resume_dir.name, resume=True)
    else:
        name = None if args.name is None else folder_name(args.name, "train --name")
        run = api.train(config, out_dir=args.out, name=name)
    if not api.is_main_process():
        return 0  # rank 0 reports
    test = run.metrics.get("test", {})
    print(f"run: {run.path}")
    if test:
        print(
            f"test accuracy {test['accuracy']:.4f}  macro-F1 {test['macro_f1']:.4f}  "
            f"({run.metrics['train_seconds']:.0f} s training)"
        )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    rows = api.model_table()
    for r in rows:
        r["parameters"] = f"{r['params']:,}"
        r["MACs"] = f"{r['macs'] / 1e6:,.1f}M"
        r["input"] = "x".join(map(str, r["input_size"]))
    print(_table(rows, ["name", "input", "parameters", "MACs"]))
    return 0


def cmd_speed(args: argparse.Namespace) -> int:
    tuning = api.speed(args.model, args.image_size, args.device, args.channels, refresh=args.refresh)
    print(tuning.table())
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    rows = []
    for name in api.list_datasets():
        s = api.dataset_status(name, data_dir=args.data_dir)
        rows.append(
            {
                "name": name,
                "found": {True: "yes", False: "no", None: "-"}[s["found"]],
                "verified": {True: "yes", False: "NO", None: "-"}[s["verified"]],
                "where": s["folder"] or s.get("note", ""),
            }
        )
    print(_table(rows, ["name", "found", "verified", "where"]))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    m = api.evaluate(args.run, split=args.split, data_dir=args.data_dir, dataset_root=args.dataset_root)
    print(
        f"{args.split}: n={m['n']}  accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}"
        + "".join(
            f"  {k} {m[k]:.4f}" for k in ("top3_accuracy", "roc_auc", "sensitivity", "specificity") if k in m
        )
    )
    rows = [
        {"class": c, **{k: f"{v:.3f}" if isinstance(v, float) else v for k, v in d.items()}}
        for c, d in m["per_class"].items()
    ]
    print(_table(rows, ["class", "precision", "recall", "f1", "support"]))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    top_k = api.options(api.PredictOptions, "predict", top_k=args.top_k).top_k  # checked before loading
    results = api.predict(args.run, args.images, top_k=top_k)
    for path, top in zip(args.images, results, strict=True):
        print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in top))
    return 0


def _names(text: str | None) -> list[str] | None:
    """A comma-separated list of names, or None when not given."""
    return [m.strip() for m in text.split(",") if m.strip()] if text else None


def _method_params(args: argparse.Namespace, methods: list[str] | None) -> dict[str, dict[str, object]]:
    """The ``--method-option`` values per chosen method (default: every method), validated up front: a bare
    KEY goes to every chosen method that declares it (an error when none does)."""
    values = _method_options(args.method_option)
    if not values:
        return {}
    return api.method_options(api.check_methods(methods or api.list_methods()), values)


def cmd_explain(args: argparse.Namespace) -> int:
    methods = _names(args.methods)
    opts = api.options(
        api.ExplainOptions,
        "explain",
        n=args.n if args.n is not None else (8 if args.untrained else None),
        batch_size=args.batch_size,
        sample=args.sample,
    )
    params = _method_params(args, methods)
    if args.untrained:
        if not args.model:
            raise ConfigError("explain --untrained needs --model NAME (see `xailab models`)")
        out = api.explain_untrained(
            args.model, args.out, methods, n=opts.n, method_params=params, precision=args.precision
        )
    else:
        if not args.run:
            raise ConfigError(
                "explain needs a run folder (e.g. runs/mnist_cnn__mnist), or --model NAME --untrained"
            )
        out = api.explain_run(
            args.run,
            args.out,
            methods,
            split=args.split,
            n=opts.n,
            image_files=args.images,
            data_dir=args.data_dir,
            batch_size=opts.batch_size,
            method_params=params,
            precision=args.precision,
            sample=opts.sample,
        )
    print(f"explanations: {out}/ (index.csv, grid.png, panels/, attributions/)")
    return 0


def _flag_options(cls: type[api.OptionsT], command: str, **values: object) -> api.OptionsT:
    """``api.options`` for a command's flags: a bad value's error names the flag the user typed
    (``assess --metric-precision: 'fast' is not valid; choose one of ...``), not the record's field."""
    try:
        return api.options(cls, command, **values)
    except ConfigError as e:
        message = str(e)
        for name in values:
            field = f"{command}.{name}:"
            if message.startswith(field):
                message = f"{command} --{name.replace('_', '-')}:{message[len(field) :]}"
        raise ConfigError(message) from None


def cmd_assess(args: argparse.Namespace) -> int:
    methods = _names(args.methods)
    opts = _flag_options(
        api.AssessOptions,
        "assess",
        n=args.n,
        batch_size=args.batch_size,
        seed=args.seed,
        metric_precision=args.metric_precision,
        sample=args.sample,
    )
    params = _method_params(args, methods)
    # A killed assessment of this folder: what it finished is read back if the request is the same.
    finished = api.unfinished_assessment(args.out)
    if finished:
        parts = Path(args.out) / api.ASSESS_PARTS_DIR
        print(f"resuming: finished before: {', '.join(finished)} ({parts})", file=sys.stderr)
    report = api.assess_run(
        args.run,
        args.out,
        methods=methods,
        metrics=_names(args.metrics),
        n=opts.n,
        split=args.split,
        data_dir=args.data_dir,
        batch_size=opts.batch_size,
        seed=opts.seed,
        method_params=params,
        metric_precision=opts.metric_precision,
        sample=opts.sample,
    )
    rows = [
        {k: f"{v:.4f}" if isinstance(v, float) else v for k, v in r.items() if k != "model"}
        for r in report["scores"]
    ]
    better = {r["metric"]: r["better"] for r in report["scores"]}
    rows += [  # the level on random maps, which a method must beat
        {"method": api.CHANCE_LABEL, "metric": metric, "better": better.get(metric, ""),
         **{k: f"{v:.4f}" if isinstance(v, float) else v for k, v in stats.items()}}
        for metric, stats in report.get("chance", {}).items()
    ]  # fmt: skip
    print(_table(rows, ["method", "metric", "mean", "ci_low", "ci_high", "n", "better"]))
    print(f"assessment: {args.out}/ (scores.csv, scores.json, per_image.csv, figures)")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    rows = api.list_runs(args.out)
    if not rows:
        print(f"no runs under {args.out}/ (train one with `xailab train --model M --dataset D`)")
        return 0
    for r in rows:
        if r["test_accuracy"] is not None:
            r["test_accuracy"] = f"{r['test_accuracy']:.4f}"
    print(_table(rows, ["run", "model", "dataset", "status", "epochs", "test_accuracy"]))
    for r in rows:
        if r["status"] == "broken":  # listed, never fatal: say why, so the folder can be fixed or removed
            print(f"broken run {r['run']}: {r.get('error')}", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:  # the serve extra: imported only when serving
        import uvicorn

        from xailab.web import create_app
    except ImportError as e:
        raise ConfigError(f"xailab serve needs the serve extra ({e}): pip install 'xailab[serve]'") from None

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"xailab: serving on {args.host}: anyone who can reach this address can use the app",
            file=sys.stderr,
        )
    opts = api.options(api.ServeOptions, "serve", port=args.port, max_upload_mb=args.max_upload_mb)
    app = create_app(
        args.runs,
        data_dir=args.data_dir,
        device=args.device,
        max_upload_bytes=opts.max_upload_mb * 1024 * 1024,
    )
    print(f"xailab: serving the runs under {args.runs}/ at http://{args.host}:{args.port}/ (API docs: /docs)")
    uvicorn.run(app, host=args.host, port=opts.port, workers=1, log_level="warning")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    if args.list:
        for name in api.list_studies():
            print(name)
        return 0
    import shlex

    report = api.run_study(
        args.study,
        out=args.out,
        executor=args.executor,
        address=args.address,
        tracking=args.tracking,
        tracking_uri=args.tracking_uri,
        data_dir=args.data_dir,
        command=shlex.join(["xailab", *args.argv]),
        redo=args.redo,
    )
    print(f"report: {report} (and results.csv, results.md next to it)")
    return 0


def _add_sample_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sample", metavar="{balanced,first}", help=api.SAMPLE_HELP + " (default: balanced)")


def _add_method_option(p: argparse.ArgumentParser) -> None:
    """``--method-option [METHOD.]KEY=VALUE``, shared by ``explain`` and ``assess``."""
    p.add_argument(
        "--method-option",
        action="append",
        metavar="[METHOD.]KEY=VALUE",
        help="a method parameter, repeatable: METHOD.KEY=VALUE for one method (e.g. "
        "integrated_gradients.n_steps=32), KEY=VALUE for every chosen method that takes KEY "
        "(e.g. internal_batch_size=64)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xailab", description="Train, compare and explain image classifiers."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model on a dataset into runs/<name>/")
    _add_train_options(p)
    p.add_argument(
        "--config", help="a YAML or TOML file of training options (command-line flags override it)"
    )
    p.add_argument("--out", default="runs", help="folder holding the runs (default: runs)")
    p.add_argument("--name", help="run name (default: <model>__<dataset>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last checkpoint")
    p.add_argument(
        "--devices",
        type=_strict_int,
        default=1,
        metavar="N",
        help="data-parallel over N processes on this machine (one per GPU, or N CPU processes on gloo): "
        "launches torchrun; --batch-size is the global batch (default: 1)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("models", help="list the models with parameters and multiply-accumulates")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("speed", help="measure the fastest precision, layout and chunk size for a model here")
    p.add_argument("--model", required=True, help="a model name (see `xailab models`)")
    p.add_argument("--image-size", type=_strict_int, help="input height = width (default: the model's own)")
    p.add_argument("--channels", type=_strict_int, default=3, help="input channels (default: 3)")
    p.add_argument("--device", default="auto", help="auto (CUDA where present), cpu, cuda, cuda:1, ...")
    p.add_argument("--refresh", action="store_true", help="measure again instead of reading the cache")
    p.set_defaults(func=cmd_speed)

    p = sub.add_parser("datasets", help="list the datasets, where they were found and whether verified")
    p.add_argument("--data-dir", help="folder of datasets (default: $XAILAB_DATA_DIR or ~/.cache/xailab)")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("evaluate", help="metrics of a trained run on a split")
    p.add_argument("run", help="run folder, e.g. runs/mnist_cnn__mnist")
    p.add_argument("--split", default="test")
    p.add_argument("--data-dir")
    p.add_argument("--dataset-root")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="top classes with confidence for image files")
    p.add_argument("run")
    p.add_argument("images", nargs="+")
    p.add_argument("--top-k", type=_strict_int, default=3, help="how many classes (1 to 1000; default: 3)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "explain", help="explain a run's predictions (or an untrained model's) with every method"
    )
    p.add_argument("run", nargs="?", help="run folder, e.g. runs/mnist_cnn__mnist")
    p.add_argument("--methods", help="comma-separated method names (default: all; see xailab.list_methods())")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=_strict_int, help="number of images (default: 64, or 8 with --untrained)")
    p.add_argument("--images", nargs="+", help="explain these image files instead of a split")
    _add_sample_option(p)
    p.add_argument("--out", default="explanations", help="output folder (default: explanations)")
    p.add_argument("--batch-size", type=_strict_int, default=16, help="images explained per call")
    p.add_argument("--data-dir")
    p.add_argument("--model", help="with --untrained: a model name")
    p.add_argument(
        "--untrained", action="store_true", help="the quick demo: an untrained model on bundled digits"
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "auto"],
        default="fp32",
        help="bf16 runs the model under bfloat16 autocast (fast on GPUs and CPUs with native bf16); auto: "
        "bf16 where the autotuner measured it faster and as accurate (xailab speed)",
    )
    _add_method_option(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("assess", help="score a run's explanations: faithfulness, robustness, sanity checks")
    p.add_argument("run", help="run folder, e.g. runs/mnist_cnn__mnist")
    p.add_argument(
        "--methods",
        help="comma-separated method names (default: all); one of: " + ", ".join(api.list_methods()),
    )
    p.add_argument(
        "--metrics",
        help="comma-separated metric names (default: "
        + ",".join([*api.DEFAULT_METRICS, "model_randomisation"])
        + "); one of: "
        + ", ".join(api.list_metrics()),
    )
    p.add_argument("--n", type=_strict_int, default=256, help="number of test images (default: 256)")
    p.add_argument("--split", default="test")
    _add_sample_option(p)
    p.add_argument("--out", default="assessment", help="output folder (default: assessment)")
    p.add_argument(
        "--batch-size", type=_strict_int, default=64, help="images explained per call (default: 64)"
    )
    p.add_argument("--seed", type=_strict_int, default=0)
    p.add_argument(
        "--metric-precision",
        metavar="{fp32,bf16,auto}",
        help="precision of the metrics' forward passes of perturbed copies (deletion, insertion, pixel "
        "flipping, ...): fp32 exact (default); bf16 under bfloat16 autocast; auto: bf16 only where the "
        "autotuner measured it faster for this model on this machine (xailab speed), else fp32. Targets "
        "are always chosen in fp32",
    )
    _add_method_option(p)
    p.add_argument("--data-dir")
    p.set_defaults(func=cmd_assess)

    p = sub.add_parser(
        "run", help="run a study (default: quick) and write its report to <out>/<study>/report.html"
    )
    p.add_argument(
        "study", nargs="?", default="quick", help="a bundled study name or a .yaml/.toml study file"
    )
    p.add_argument("--out", default="runs", help="folder holding the studies (default: runs)")
    p.add_argument("--executor", default="local", choices=api.list_executors(), help="where cells run")
    p.add_argument("--address", help="with --executor ray: the Ray cluster (default: a local one)")
    p.add_argument(
        "--tracking", choices=api.list_trackers(), help="log params, metrics, models and the report"
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: a file store <out>/mlruns)")
    p.add_argument(
        "--redo",
        action="append",
        default=[],
        metavar="CELL",
        help="delete this cell's folder first, so it is trained and assessed again (repeatable)",
    )
    p.add_argument("--data-dir", help="folder of datasets (default: $XAILAB_DATA_DIR or ~/.cache/xailab)")
    p.add_argument("--list", action="store_true", help="list the bundled studies and exit")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("runs", help="list the runs")
    p.add_argument("--out", default="runs")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("serve", help="the web app and inference API over the runs (http://127.0.0.1:8000/)")
    p.add_argument("--runs", default="runs", help="folder holding the runs and study reports (default: runs)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"
    )
    p.add_argument("--port", type=_strict_int, default=8000)
    p.add_argument("--device", default="auto", help="auto (CUDA where present), cpu, cuda, cuda:1, ...")
    p.add_argument("--data-dir", help="datasets folder for the test-set samples (default: $XAILAB_DATA_DIR)")
    p.add_argument(
        "--max-upload-mb", type=_strict_int, default=10, help="largest accepted upload (default: 10)"
    )
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # `train --devices N` relaunches the same command under torchrun
    with warnings.catch_warnings(), _logged_warnings_as_lines():
        warnings.showwarning = _show_warning  # restored when the command ends
        return _run_command(args)


class _LineFormatter(logging.Formatter):
    """A logged record as one ``xailab: warning: ...`` line, like the CLI's warnings and errors."""

    def format(self, record: logging.LogRecord) -> str:
        return f"xailab: {record.levelname.lower()}: {record.getMessage()}"


@contextlib.contextmanager
def _logged_warnings_as_lines() -> Iterator[None]:
    """For one command, xailab's logged warnings and errors (the autotuner's: an unusable cache file, a failed
    ``torch.compile``) print on stderr as ``xailab: warning: ...`` lines; without a handler Python's last-resort
    one printed the bare message (``autotune: ...``), which did not say where it came from. Info and debug
    records stay silent; the handler is removed when the command ends."""
    handler = logging.StreamHandler(sys.stderr)  # the stderr of this call (pytest swaps it per test)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(_LineFormatter())
    package = logging.getLogger("xailab")
    package.addHandler(handler)
    try:
        yield
    finally:
        package.removeHandler(handler)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: typing.TextIO | None = None,
    line: str | None = None,
) -> None:
    """xailab's own warnings as one ``xailab: warning: ...`` line (like its errors), without Python's source
    location and code line, which say nothing to a user; other libraries' warnings keep Python's format."""
    out = sys.stderr if file is None else file
    if issubclass(category, XailabWarning):
        print(f"xailab: warning: {message}", file=out)
    else:
        out.write(warnings.formatwarning(message, category, filename, lineno, line))


def _run_command(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except XailabError as e:
        print(f"xailab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\nxailab: interrupted. A training run continues with `xailab train --resume runs/<name>`, "
            "a study with the same `xailab run` command.",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
