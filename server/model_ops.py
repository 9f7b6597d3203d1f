"""Model registration and builds as API operations: the catalog behind ``/v1/models``.

A CI pipeline registers a model (the file and its data sets, base64 in a JSON body), builds it for
profiles, then starts a rollout with ``POST /v1/deployments``, all with one token. The answers have
the shapes of ``edgefleet model add|list|show --json`` and ``edgefleet build --json``, so the CLI
prints the same thing whether it worked locally or through a server.

``server.api`` imports this module on first use, so the compression pipeline loads only when a
model route is called.

Uploads are decoded into a private temporary directory under the home and handed to
``Catalog.add_model``, which checks and copies them (the temporary files are removed either way).
Sizes are capped before decoding (the HTTP body cap applies first). A build runs in the request's
thread and answers when every profile is done: building is CPU work of seconds (small models) to
minutes; the client waits with a long timeout.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from server import build_ops
from server.compression.gate import OPTIMIZE_CHOICES, GateSpec
from server.compression.pipeline import BuildOptions
from server.compression.recipes import CALIBRATION_METHODS
from server.config import private_home
from server.errors import InvalidRequestError, ServerError
from server.measured import aggregate, profile_budgets
from server.probe import start_probe, wait_probe
from server.profiles import load_profiles
from server.registry.catalog import Catalog
from server.registry.measurements import MeasurementRegistry

#: Largest decoded upload per file (the HTTP body cap, ``api.max_body_bytes``, applies before this).
MAX_UPLOAD_BYTES = 1 << 30
UPLOAD_SUFFIXES = (".onnx", ".tflite")


def _decode(field: str, text: str, limit: int = MAX_UPLOAD_BYTES) -> bytes:
    if len(text) > (limit + 2) // 3 * 4:
        raise InvalidRequestError(f"body.{field} is over {limit} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequestError(f"body.{field} is not valid base64: {exc}") from exc


@contextlib.contextmanager
def _catalog(home: Path) -> Iterator[Catalog]:
    catalog = Catalog.open(home)
    try:
        yield catalog
    finally:
        catalog.close()


def version_row(catalog: Any, v: Any) -> dict[str, Any]:
    """One line of ``model list --json``."""
    return {"model": v.model, "version": v.version, "format": v.format, "sha256": v.sha256,
            "size_bytes": v.size_bytes, "builds": [b.profile for b in catalog.builds(v.model, v.version)]}


def version_detail(catalog: Any, mv: Any) -> dict[str, Any]:
    """``model show --json``: inputs, outputs, gate, and every build with its provenance."""
    return {
        "model": mv.model, "version": mv.version, "format": mv.format, "sha256": mv.sha256,
        "size_bytes": mv.size_bytes, "inputs": [t.to_dict() for t in mv.inputs],
        "outputs": [t.to_dict() for t in mv.outputs], "gate": mv.gate.to_dict(),
        "calibration": mv.calibration is not None, "evaluation": mv.evaluation is not None,
        "builds": [{"profile": b.profile, "variant": b.variant, "size_bytes": b.size_bytes,
                    "ota_size_bytes": b.ota_size_bytes, "compression": b.compression,
                    "provenance": b.provenance} for b in catalog.builds(mv.model, mv.version)],
        "measured": measured_figures(catalog, mv.model, mv.version),
    }


def measured_figures(catalog: Any, model: str, version: int) -> list[dict[str, Any]]:
    """What the devices measured of this version, per profile and variant (``server.measured.aggregate``)."""
    rows = MeasurementRegistry(catalog.db).measurements(model, version)
    if not rows:
        return []
    return [f.to_dict() for f in aggregate(rows, profile_budgets())]


def add_model(home: Path, body: Mapping[str, Any]) -> dict[str, Any]:
    """Register the next version of ``body["name"]`` from an upload; the answer of ``model add --json``."""
    filename = Path(str(body.get("filename") or "model.onnx")).name
    if not filename.endswith(UPLOAD_SUFFIXES):
        raise InvalidRequestError(f"body.filename must end with {' or '.join(UPLOAD_SUFFIXES)} (got {filename!r})")
    gate_raw = body.get("gate")
    gate = None
    if gate_raw:
        unknown = sorted(set(gate_raw) - set(GateSpec.__dataclass_fields__))
        if unknown:
            raise InvalidRequestError(f"body.gate: unknown field(s) {', '.join(unknown)}")
        gate = GateSpec.from_dict(gate_raw)
    uploads = {"model": _decode("model", body["model"])}
    for key in ("calibration", "evaluation"):
        if body.get(key):
            uploads[key] = _decode(key, body[key])
    if not uploads["model"]:
        raise InvalidRequestError("body.model is empty")
    private_home(home)
    work = Path(tempfile.mkdtemp(prefix=".upload-", dir=home))
    try:
        paths: dict[str, Path] = {}
        for key, data in uploads.items():
            path = work / (filename if key == "model" else f"{key}.npz")
            path.write_bytes(data)
            paths[key] = path
        with _catalog(home) as catalog:
            mv = catalog.add_model(paths["model"], str(body["name"]), calibration=paths.get("calibration"),
                                   evaluation=paths.get("evaluation"), gate=gate)
            return {"model": mv.model, "version": mv.version, "sha256": mv.sha256, "format": mv.format,
                    "size_bytes": mv.size_bytes, "gate": mv.gate.to_dict(),
                    "calibration": mv.calibration is not None, "evaluation": mv.evaluation is not None}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def list_models(home: Path, model: str | None = None) -> list[dict[str, Any]]:
    with _catalog(home) as catalog:
        return [version_row(catalog, v) for v in catalog.versions(model)]


def show_model(home: Path, ref: str) -> dict[str, Any]:
    with _catalog(home) as catalog:
        return version_detail(catalog, catalog.resolve(ref))


def build_model(home: Path, ref: str, body: Mapping[str, Any], *, profiles_dir: Path | None = None,
                service: Any = None, actor: str = "local") -> dict[str, Any]:
    """Build ``ref`` for ``body["profile"]`` (``ID[,ID...]`` or ``all``), as ``edgefleet build --json`` does.

    Answers ``{"model", "version", "results": [row per profile], "failures": n}``; a profile that
    cannot be built is a row with ``error`` and ``code``, not a failed call, like the CLI. With
    ``body["probe"]`` (a target) and one profile, every passing candidate is timed on the target's
    devices of that profile (``server.probe``) and the variant chosen again with what they measured.
    """
    options = build_options(body)
    profiles = load_profiles(profiles_dir)
    probe = body.get("probe")
    if probe and service is None:
        raise InvalidRequestError("a probe build needs the fleet (the server's API, or this home's registry)")
    with _catalog(home) as catalog:
        mv = catalog.resolve(ref)
        wanted = wanted_profiles(str(body.get("profile") or ""), profiles, mv.format)
        if probe and len(wanted) != 1:
            raise InvalidRequestError(f"a probe build names exactly one profile, not {', '.join(wanted)}")
        with build_ops.build_share(catalog.paths) as share:
            if probe:
                timeout = float(body.get("probe_timeout_s") or 120.0)
                rows = [_probe_row(catalog, mv, profiles[wanted[0]], options, share, service=service,
                                   target=str(probe), actor=actor, timeout_s=timeout)]
            else:
                rows = [_build_row(catalog, mv, profiles[pid], options, share) for pid in wanted]
        return {"model": mv.model, "version": mv.version, "results": rows,
                "failures": sum(1 for r in rows if "error" in r)}


def build_options(body: Mapping[str, Any]) -> BuildOptions:
    """The pipeline's options from a build request (the API's body; the CLI builds the same body)."""
    methods = tuple(body.get("calibration_methods") or CALIBRATION_METHODS)
    bad = [m for m in methods if m not in CALIBRATION_METHODS]
    if bad:
        raise InvalidRequestError(f"body.calibration_methods: unknown {', '.join(bad)} "
                                  f"(one of {', '.join(CALIBRATION_METHODS)})")
    optimize = str(body.get("optimize") or "balanced")
    if optimize not in OPTIMIZE_CHOICES:
        raise InvalidRequestError(f"body.optimize: one of {', '.join(OPTIMIZE_CHOICES)} (got {optimize!r})")
    return BuildOptions(methods=methods, pruning=bool(body.get("pruning", True)), optimize=optimize,
                        fallback=bool(body.get("fallback", True)), evaluation_limit=body.get("eval_limit"),
                        latency_runs=int(body.get("latency_runs", BuildOptions.latency_runs)),
                        only=tuple(body.get("recipes") or ()))


def _build_row(catalog: Any, mv: Any, profile: Any, options: Any, share: Any) -> dict[str, Any]:
    """One profile's line of the answer; a profile that cannot be built is a row with ``error`` and ``code``."""
    try:
        stored, result = build_ops.build_variant(catalog, mv, profile, options=options, share=share)
    except ServerError as exc:
        return error_row(profile.id, exc)
    return result_row(mv, profile.id, stored, result)


def _probe_row(catalog: Any, mv: Any, profile: Any, options: BuildOptions, share: Any, *, service: Any,
               target: str, actor: str, timeout_s: float) -> dict[str, Any]:
    """Build blind, probe every passing candidate on ``target``, build again with the measurements."""
    try:
        _, blind = build_ops.build_variant(catalog, mv, profile, options=options, share=share)
        plan = start_probe(service, blind, model=mv.model, version=mv.version, profile=profile, target=target,
                           actor=actor)
        outcome = wait_probe(service.registry, plan, timeout_s=timeout_s)
        evidence = {**outcome.evidence(), "blind_variant": blind.chosen.recipe.name}
        measured = BuildOptions(**{**options.__dict__, "measured": outcome.measured, "probe": evidence})
        stored, result = build_ops.build_variant(catalog, mv, profile, options=measured, share=share)
    except ServerError as exc:
        return error_row(profile.id, exc)
    return {**result_row(mv, profile.id, stored, result), "blind_variant": blind.chosen.recipe.name,
            "probe": evidence}


def error_row(profile_id: str, exc: ServerError) -> dict[str, Any]:
    return {"profile": profile_id, "error": exc.message, "code": exc.code}


def result_row(mv: Any, profile_id: str, stored: Any, result: Any) -> dict[str, Any]:
    """A built profile's line of ``build --json`` (and of the API's answer)."""
    return {
        "profile": profile_id, "variant": stored.variant, "fell_back_to_fp32": result.fell_back,
        "size_bytes": stored.size_bytes, "ota_size_bytes": stored.ota_size_bytes,
        "compression": stored.compression, "latency_ms": result.chosen.latency_ms,
        "fp32_latency_ms": result.provenance.get("fp32_latency_ms"),
        "fidelity": result.chosen.fidelity.to_dict() if result.chosen.fidelity else None,
        "source_size_bytes": mv.size_bytes,
    }


def wanted_profiles(spec: str, profiles: Mapping[str, Any], fmt: str) -> Sequence[str]:
    if not spec:
        raise InvalidRequestError("body.profile is required: ID[,ID...] or all")
    if spec == "all":
        return [p for p in profiles if fmt in profiles[p].format_preference]
    wanted = [p.strip() for p in spec.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in profiles]
    if unknown:
        raise InvalidRequestError(f"unknown profile(s) {', '.join(unknown)} (known: {', '.join(profiles)}, all)")
    return wanted
