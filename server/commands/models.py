"""Model commands: ``model add``, ``model list``, ``model show`` and ``build``.

These work on the local registry of the server home (``--home``): building is CPU-heavy work that
belongs on the server machine. With a server configured (``--server URL``, ``$EDGEFLEET_SERVER`` or
``[client] server``, and a token) they go through its HTTP API instead (``/v1/models``), so a CI
pipeline can register and build from anywhere; the output has the same shape either way.

    edgefleet model add model.onnx --name digits --calibration calib.npz --evaluation eval.npz
    edgefleet build digits:1 --profile all
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from server import model_ops
from server.build_ops import build_share, build_variant
from server.commands.common import api_client, guarded
from server.commands.term import make_console
from server.compression.gate import METRICS, OPTIMIZE_CHOICES, GateSpec
from server.compression.pipeline import BuildOptions, ProfileResult
from server.compression.recipes import CALIBRATION_METHODS, plan
from server.errors import InvalidRequestError, ServerError
from server.profiles import load_profiles
from server.refs import parse_ref
from server.registry.catalog import Catalog
from server.textsafe import safe

console = make_console()
err_console = Console(stderr=True, soft_wrap=True)

def _catalog(args: argparse.Namespace) -> Any:
    return Catalog.open(args.home)


#: the gate flags' defaults are GateSpec's, written once in server.compression.gate
_GATE = GateSpec()


def _remote(args: argparse.Namespace) -> Any:
    """The server's API client when one is configured explicitly, else None (work locally)."""
    # startup cost: the API client stack loads only when a server is configured
    from server.client import remote_client  # noqa: PLC0415

    return remote_client(args.home, server=getattr(args, "server", None))


def _b64(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError as exc:
        raise InvalidRequestError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _remote_ref(client: Any, ref: str) -> tuple[str, int]:
    """NAME:VERSION, or NAME alone for its latest version on the server."""
    name, version = parse_ref(ref)
    if version is None:
        versions = [r["version"] for r in client.call("list_models", query={"model": name})]
        if not versions:
            raise InvalidRequestError(f"no model named {name!r} on {client.description}")
        version = max(versions)
    return name, version


def _mb(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}" if v < 1 else f"{v:.2f}"


# -- model add / list / show ---------------------------------------------------------------------------


def cmd_model_add(args: argparse.Namespace) -> int:
    gate_args: dict[str, Any] = {
        k: v
        for k, v in {
            "max_relative_drop": args.max_drop,
            "min_cosine": args.min_cosine,
            "min_top1": args.min_top1,
            "min_iou": args.min_iou,
            "max_abs_error": args.max_abs_error,
        }.items()
        if v is not None
    }
    gate = GateSpec(metric=args.metric, **gate_args) if args.metric else None
    if gate is None and gate_args:
        raise InvalidRequestError("gate thresholds need --metric")
    remote = _remote(args)
    if remote is not None:
        body = {"name": args.name, "filename": args.path.name, "model": _b64(args.path),
                "calibration": _b64(args.calibration), "evaluation": _b64(args.evaluation),
                "gate": gate.to_dict() if gate else None}
        out = remote.call("register_model", body={k: v for k, v in body.items() if v is not None}, timeout=600.0)
        if args.json:
            print(json.dumps({k: out[k] for k in ("model", "version", "sha256", "format")}))
            return 0
        console.print(f"registered [bold]{out['model']}:{out['version']}[/] on {remote.description} ({out['format']}, "
                      f"{_mb(out['size_bytes'])}, gate: {out['gate']['metric']}); next: edgefleet build "
                      f"{out['model']}:{out['version']} --profile all", highlight=False)
        return 0
    catalog = _catalog(args)
    mv = catalog.add_model(args.path, args.name, calibration=args.calibration, evaluation=args.evaluation, gate=gate)
    if args.json:
        print(json.dumps({"model": mv.model, "version": mv.version, "sha256": mv.sha256, "format": mv.format}))
        return 0
    console.print(
        f"registered [bold]{mv.ref}[/] ({mv.format}, {_mb(mv.size_bytes)}, gate: {mv.gate.metric}); "
        f"next: edgefleet build {mv.ref} --profile all",
        highlight=False,
    )
    return 0


def cmd_model_list(args: argparse.Namespace) -> int:
    remote = _remote(args)
    if remote is not None:
        rows = remote.call("list_models")
        if args.json:
            print(json.dumps(rows))
            return 0
        table = Table(box=box.SIMPLE_HEAD, title=remote.description)
        for col in ("model", "version", "format", "size", "built for"):
            table.add_column(col)
        for r in rows:
            built = ", ".join(r["builds"]) or "-"
            table.add_row(r["model"], str(r["version"]), r["format"], _mb(r["size_bytes"]), built)
        console.print(table if rows else f"no models registered on {remote.description}")
        return 0
    catalog = _catalog(args)
    versions = catalog.versions()
    if args.json:  # the API's rows (model_ops), so both paths print the same
        print(json.dumps([model_ops.version_row(catalog, v) for v in versions]))
        return 0
    table = Table(box=box.SIMPLE_HEAD)
    for col in ("model", "version", "format", "size", "gate", "calibration", "evaluation", "built for"):
        table.add_column(col)
    for v in versions:
        builds = catalog.builds(v.model, v.version)
        table.add_row(v.model, str(v.version), v.format, _mb(v.size_bytes), v.gate.metric,
                      "yes" if v.calibration else "-", "yes" if v.evaluation else "-",
                      ", ".join(b.profile for b in builds) or "-")
    console.print(table if versions else "no models registered (edgefleet model add PATH --name NAME)")
    return 0


def cmd_model_show(args: argparse.Namespace) -> int:
    remote = _remote(args)
    if remote is not None:
        name, version = _remote_ref(remote, args.ref)
        out = remote.call("get_model", path={"model": name, "version": str(version)})
        if args.json:
            print(json.dumps(out, default=str))
            return 0
        console.print(f"[bold]{name}:{version}[/]  {out['format']}  {_mb(out['size_bytes'])}  sha256 "
                      f"{out['sha256'][:16]}…  ({remote.description})", highlight=False)
        for kind in ("inputs", "outputs"):
            for t in out[kind]:
                console.print(safe(f"  {kind[:-1]:6} {t['name']}: {t['dtype']} {t['shape']}"), highlight=False)
        console.print(safe(f"  gate: {json.dumps(out['gate'])}"), highlight=False)
        for b in out["builds"]:
            measured = " (measured)" if ((b.get("provenance") or {}).get("selection") or {}).get("measured") else ""
            console.print(f"  build {b['profile']}: {b['variant']}{measured} {_mb(b['size_bytes'])} "
                          f"(OTA {_mb(b['ota_size_bytes'])} {b['compression']})", highlight=False)
        _print_measured(out.get("measured") or [])
        return 0
    catalog = _catalog(args)
    mv = catalog.resolve(args.ref)
    builds = catalog.builds(mv.model, mv.version)
    if args.json:  # the API's answer (model_ops), so both paths print the same
        print(json.dumps(model_ops.version_detail(catalog, mv), default=str))
        return 0
    console.print(f"[bold]{mv.ref}[/]  {mv.format}  {_mb(mv.size_bytes)}  sha256 {mv.sha256[:16]}…", highlight=False)
    for t in mv.inputs:
        console.print(safe(f"  input  {t.name}: {t.dtype} {list(t.shape)}"), highlight=False)
    for t in mv.outputs:
        console.print(safe(f"  output {t.name}: {t.dtype} {list(t.shape)}"), highlight=False)
    console.print(f"  gate: {json.dumps(mv.gate.to_dict())}", highlight=False)
    table = Table(title="builds", box=box.SIMPLE_HEAD)
    for col in ("profile", "variant", "size", "OTA", "codec", "fidelity", "latency ms", "fp32 ms", "min runtime"):
        table.add_column(col)
    for b in builds:
        p = b.provenance
        fid = p.get("fidelity") or {}
        measured = " (measured)" if (p.get("selection") or {}).get("measured") else ""
        table.add_row(b.profile, b.variant + (" (fallback)" if p.get("fell_back_to_fp32") else "") + measured,
                      _mb(b.size_bytes), _mb(b.ota_size_bytes), b.compression,
                      f"{fid.get('metric', '')} {fid.get('value', 0):.4f}" if fid else "-",
                      _ms(p.get("latency_ms")), _ms(p.get("fp32_latency_ms")), b.runtime.min_version)
    console.print(table if builds else "  no builds yet")
    _print_measured(model_ops.measured_figures(catalog, mv.model, mv.version), builds)
    return 0


def _print_measured(figures: list[dict[str, Any]], builds: Any = ()) -> None:
    """The devices' own figures per profile, beside the build machine's estimate where it made one."""
    if not figures:
        console.print("  measured on devices: none yet")
        return
    estimate = {(b.profile, b.variant): b.provenance.get("latency_ms") for b in builds}
    table = Table(title="measured on devices", box=box.SIMPLE_HEAD)
    for col in ("profile", "variant", "kind", "devices", "p50 ms", "p95 ms", "spread", "estimate ms", "budget"):
        table.add_column(col)
    for f in figures:
        budget = "-" if f["budget_ms"] is None else f"{f['budget_ms']:g} ms" + (" OVER" if f["over_budget"] else "")
        table.add_row(f["profile"], f["variant"] or "-", f["kind"], str(f["devices"]), _ms(f["p50_ms"]),
                      _ms(f["p95_ms"]), f"{f['spread']:.0%}", _ms(estimate.get((f["profile"], f["variant"]))),
                      budget)
    console.print(table)


# -- build ---------------------------------------------------------------------------------------------


def _result_table(result: ProfileResult) -> Table:
    table = Table(title=f"{result.profile}", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("", "recipe", "status", "size", "est. compressed", "latency ms", "fidelity", "why"):
        table.add_column(col, overflow="fold")
    for c in result.candidates:
        mark = "→" if c is result.chosen else ""
        style = {"passed": "green", "failed": "yellow", "error": "red", "skipped": "dim"}[c.status]
        fid = f"{c.fidelity.metric} {c.fidelity.value:.4f}" if c.fidelity else "-"
        table.add_row(mark, c.recipe.name, f"[{style}]{c.status}[/]", _mb(c.size_bytes or None),
                      _mb(c.compressed_estimate or None), _ms(c.latency_ms), fid, c.reason or "")
    return table


def _build_body(args: argparse.Namespace) -> dict[str, Any]:
    """The API's build request from the command line (the local build reads it the same way)."""
    body: dict[str, Any] = {"profile": args.profile, "pruning": not args.no_pruning, "fallback": not args.no_fallback,
                            "latency_runs": args.latency_runs, "optimize": args.optimize}
    if args.recipe:
        body["recipes"] = list(args.recipe)
    if args.calibration_method:
        body["calibration_methods"] = list(args.calibration_method)
    if args.eval_limit:
        body["eval_limit"] = args.eval_limit
    if args.probe:
        body["probe"] = args.probe
        body["probe_timeout_s"] = args.probe_timeout
    return body


def _summary(title: str, rows: list[dict[str, Any]], failures: int, *, as_json: bool) -> int:
    if as_json:
        print(json.dumps(rows, default=str))
        return 1 if failures else 0
    summary = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("profile", "variant", "size", "OTA (codec)", "vs fp32 size", "latency ms", "fp32 ms", "fidelity"):
        summary.add_column(col)
    for r in rows:
        if "error" in r:
            summary.add_row(safe(r["profile"]), "[red]not built[/]", "", "", "", "", "", safe(r["error"][:80]))
            continue
        fid = r["fidelity"] or {}
        variant = r["variant"] + (" [yellow](nothing smaller passed the gate)[/]" if r["fell_back_to_fp32"] else "")
        summary.add_row(r["profile"], variant, _mb(r["size_bytes"]), f"{_mb(r['ota_size_bytes'])} ({r['compression']})",
                        f"{r['size_bytes'] / r['source_size_bytes']:.3f}x", _ms(r["latency_ms"]),
                        _ms(r["fp32_latency_ms"]), f"{fid.get('metric', '')} {fid.get('value', 0):.4f}")
    console.print(summary)
    return 1 if failures else 0


def _remote_build(args: argparse.Namespace, remote: Any) -> int:
    if args.profiles is not None:
        raise InvalidRequestError("--profiles applies to local builds; a server builds with its own profiles")
    name, version = _remote_ref(remote, args.ref)
    waiting = (contextlib.nullcontext() if args.json else
               err_console.status(f"building {name}:{version} on {remote.description} ...", spinner="dots"))
    with waiting:
        out = remote.call("build_model", path={"model": name, "version": str(version)}, body=_build_body(args),
                          timeout=6 * 3600.0)
    code = _summary(f"{name}:{version}: shipped variants ({remote.description})", out["results"], out["failures"],
                    as_json=args.json)
    for r in out["results"] if not args.json else ():
        probe = r.get("probe")
        if probe:
            figures = sorted(probe["measured_p50_ms"].items(), key=lambda x: x[1])
            measured = ", ".join(f"{k} {v:.2f} ms" for k, v in figures) or "none"
            console.print(safe(f"  probe {probe['probe_id']} of {r['profile']}: blind {r['blind_variant']} -> "
                               f"{r['variant']}; measured p50 on {len(probe['answered'])} device(s): {measured} "
                               f"({probe['seconds']:.1f} s)"), highlight=False)
            if probe["missing"]:
                console.print(safe(f"  [yellow]no answer from {', '.join(probe['missing'])}[/]"))
    return code


def cmd_build(args: argparse.Namespace) -> int:
    """Builds run here (with a progress bar per profile) unless a server is configured; either way the
    options, the profile list and the answer rows come from ``server.model_ops``, as the API's."""
    if args.probe:  # needs the fleet: the running server's API, else this home's registry in-process
        return _remote_build(args, api_client(args))
    remote = _remote(args)
    if remote is not None:
        return _remote_build(args, remote)
    catalog = _catalog(args)
    mv = catalog.resolve(args.ref)
    profiles = load_profiles(args.profiles)
    wanted = model_ops.wanted_profiles(args.profile, profiles, mv.format)
    options = model_ops.build_options(_build_body(args))
    rows: list[dict[str, Any]] = []
    failures = 0
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err_console, transient=True, disable=args.json) as bar, \
            build_share(catalog.paths) as share:
        for pid in wanted:
            profile = profiles[pid]
            steps = len(plan(profile, mv.format, ops=frozenset({"MatMul", "Conv"}), has_calibration=True,
                             methods=options.methods, pruning=options.pruning)) + 2
            task = bar.add_task(f"{mv.ref} → {pid}", total=steps)

            def step(message: str, task: Any = task, pid: str = pid) -> None:
                bar.update(task, advance=1, description=f"{mv.ref} → {pid}: {message}")

            try:
                stored, result = build_variant(catalog, mv, profile, options=options, progress=step, share=share)
            except ServerError as exc:
                failures += 1
                bar.remove_task(task)
                rows.append(model_ops.error_row(pid, exc))
                if not args.json:
                    err_console.print(f"[bold red]{safe(pid)}[/]: {safe(exc.message)}", highlight=False)
                continue
            bar.remove_task(task)
            rows.append(model_ops.result_row(mv, pid, stored, result) | {"path": str(stored.path)})
            if not args.json:
                console.print(_result_table(result))
    return _summary(f"{mv.ref}: shipped variants", rows, failures, as_json=args.json)


# -- registration --------------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    model = subparsers.add_parser("model", help="register models and inspect them",
                                  description="Register models (ONNX or .tflite) with their data sets.")
    ms = model.add_subparsers(dest="model_command", metavar="COMMAND")

    p = ms.add_parser("add", help="register a new version of a model",
                      description="Check a model and its data sets and register them as the next version of NAME. "
                      "Data sets are .npz files with one array per model input (samples on the first axis) and "
                      "optionally 'labels' (one integer per sample). Evaluation data must differ from calibration "
                      "data; without it only fp32 is built.")
    p.add_argument("path", type=Path, help="model file (.onnx or .tflite)")
    p.add_argument("--name", required=True, help="model name (letters, digits, '.', '_', '-')")
    p.add_argument("--calibration", type=Path, metavar="NPZ", help="calibration data (static int8 recipes)")
    p.add_argument("--evaluation", type=Path, metavar="NPZ", help="evaluation data for the gate")
    p.add_argument("--metric", choices=METRICS,
                   help="gate metric (default: accuracy when the evaluation data has labels, else cosine)")
    p.add_argument("--max-drop", type=float, metavar="FRACTION",
                   help=f"accuracy: largest relative drop vs fp32 (default {_GATE.max_relative_drop:g})")
    p.add_argument("--min-cosine", type=float,
                   help=f"cosine: smallest per-sample cosine (default {_GATE.min_cosine:g})")
    p.add_argument("--min-top1", type=float,
                   help=f"top1: smallest top-1 agreement with fp32 (default {_GATE.min_top1:g})")
    p.add_argument("--min-iou", type=float,
                   help=f"iou: smallest mean IoU of thresholded maps (default {_GATE.min_iou:g})")
    p.add_argument("--max-abs-error", type=float, help="also cap the max absolute output error (any metric)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--server", metavar="URL", default=None,
                   help="server API URL (default $EDGEFLEET_SERVER or [client] server; none = the local catalog)")
    p.set_defaults(handler=guarded(cmd_model_add, show_code=True, errors=err_console))

    p = ms.add_parser("list", help="registered models and versions", description="Registered models.")
    p.add_argument("--json", action="store_true")
    p.add_argument("--server", metavar="URL", default=None,
                   help="server API URL (default $EDGEFLEET_SERVER or [client] server; none = the local catalog)")
    p.set_defaults(handler=guarded(cmd_model_list, show_code=True, errors=err_console))

    p = ms.add_parser("show", help="one version: inputs, gate, builds with provenance",
                      description="Show NAME:VERSION (or NAME for the latest): inputs, gate and builds.")
    p.add_argument("ref", metavar="NAME[:VERSION]")
    p.add_argument("--json", action="store_true", help="everything, including full provenance, as JSON")
    p.add_argument("--server", metavar="URL", default=None,
                   help="server API URL (default $EDGEFLEET_SERVER or [client] server; none = the local catalog)")
    p.set_defaults(handler=guarded(cmd_model_show, show_code=True, errors=err_console))

    p = subparsers.add_parser(
        "build", help="build compressed per-profile variants behind the accuracy gate",
        description="For each profile: try every recipe the profile allows (fp32, fp16 on GPUs, int8 dynamic/static, "
        "pruning, LiteRT recipes), gate each against fp32 on the evaluation data, and store the best variant that "
        "passes (else fp32).",
    )
    p.add_argument("ref", metavar="NAME:VERSION", help="model version (NAME alone = the latest)")
    p.add_argument("--profile", required=True, metavar="ID[,ID...]|all",
                   help="profile id(s), or all (every profile that runs the model's format)")
    p.add_argument("--profiles", type=Path, metavar="DIR", default=None,
                   help="profiles directory (default $EDGEFLEET_PROFILES or firmware_profiles/)")
    p.add_argument("--recipe", action="append", metavar="NAME",
                   help="only these recipes (repeatable; fp32 always runs): e.g. int8-dynamic, int8-static-minmax")
    p.add_argument("--calibration-method", action="append", choices=CALIBRATION_METHODS,
                   help="static calibration methods to try (repeatable; default all)")
    p.add_argument("--no-pruning", action="store_true", help="skip the magnitude-pruning candidate")
    p.add_argument("--no-fallback", action="store_true", help="skip the int8 fallback (some nodes kept in float)")
    p.add_argument("--eval-limit", type=int, metavar="N", help="evaluate on the first N samples only")
    p.add_argument("--latency-runs", type=int, default=BuildOptions.latency_runs, metavar="N",
                   help=f"timed runs per variant (default {BuildOptions.latency_runs})")
    p.add_argument("--optimize", choices=OPTIMIZE_CHOICES, default="balanced",
                   help="latency: the fastest passing variant; size: the smallest; balanced (default): the smallest "
                   "of those within 10%% of the fastest where the profile's devices measured them, else size first")
    p.add_argument("--probe", metavar="TARGET",
                   help="time every passing candidate on TARGET's devices of the profile (group:NAME, device:ID; "
                   "off their serving path), then choose again with what they measured")
    p.add_argument("--probe-timeout", type=float, default=120.0, metavar="S",
                   help="how long to wait for the probed devices (default 120); who did not answer is named")
    p.add_argument("--json", action="store_true", help="print one JSON row per profile instead of tables")
    p.add_argument("--server", metavar="URL", default=None,
                   help="server API URL (default $EDGEFLEET_SERVER or [client] server; none = the local catalog)")
    p.set_defaults(handler=guarded(cmd_build, show_code=True, errors=err_console))
