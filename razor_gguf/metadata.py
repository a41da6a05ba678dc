"""The razor.* GGUF keys (SPEC section 2): read them, and write a copy of a GGUF with them.

Writing copies every existing key/value and every tensor byte for byte, adds the razor keys, writes
into a temporary file in the output's directory and renames it into place (atomic: no partial output).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Callable

import numpy as np

RAZOR_VERSION = 1
PREFIX = "razor."
DEFAULT_N_SINK = 4
DEFAULT_WINDOW = 512


class MetadataError(Exception):
    """A GGUF that cannot be read or written as asked."""


def check_gguf_file(path: str) -> None:
    """A readable file that starts with the GGUF magic, else a one-line MetadataError."""
    if not os.path.exists(path):
        raise MetadataError(f"{path}: no such file")
    if os.path.isdir(path):
        raise MetadataError(f"{path}: is a directory")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise MetadataError(f"{path}: {e.strerror}") from None
    if magic != b"GGUF":
        raise MetadataError(f"{path}: not a GGUF file")


def open_gguf(path: str):
    """GGUFReader over path, with any failure turned into a one-line MetadataError."""
    from gguf import GGUFReader

    check_gguf_file(path)
    try:
        reader = GGUFReader(path, "r")
        # Touch the tensor data so a truncated file fails here, not mid-write.
        size = os.path.getsize(path)
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise ValueError("tensor data past the end of the file")
    except Exception as e:  # gguf-py raises assorted errors on damaged files
        raise MetadataError(f"{path}: truncated or damaged GGUF ({type(e).__name__}: {e})".splitlines()[0]) from None
    return reader


def razor_keys(reader) -> list[str]:
    return [k for k in reader.fields if k.startswith(PREFIX)]


def sha256_file(path: str, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 22)
            if not b:
                break
            h.update(b)
            if progress:
                progress(len(b))
    return h.hexdigest()


def layer_windows_kv(lw, adopt: bool | None = None) -> dict:
    """The keys of a razor_gguf.layer_windows.LayerWindowMeasurement: its provenance, and its allocation as
    razor.layer_window_scale when adopted (adopt: override the measurement's own verdict)."""
    from gguf import GGUFValueType as V

    kv = {
        "razor.calibration.layer_windows_window": (V.UINT32, int(lw.window), None),
        "razor.calibration.layer_windows_scale": (V.ARRAY, [float(x) for x in lw.scales], V.FLOAT32),
        "razor.calibration.layer_windows_kld": (V.ARRAY, [float(lw.kld_uniform), float(lw.kld_per_layer)], V.FLOAT32),
        "razor.calibration.layer_windows_top1": (V.ARRAY, [float(lw.top1_uniform), float(lw.top1_per_layer)], V.FLOAT32),
        "razor.calibration.layer_windows_ratio": (V.ARRAY, [float(lw.ratio), *map(float, lw.ratio_95)], V.FLOAT32),
        "razor.calibration.layer_windows_tokens": (V.UINT32, int(lw.n_positions), None),
        "razor.calibration.layer_windows_adopted": (V.BOOL, bool(lw.adopted), None),
        "razor.calibration.layer_windows_probe": (V.ARRAY, [int(lw.probe_uniform), int(lw.probe_per_layer), int(lw.n_probes)],
                                                  V.UINT32),
    }
    if lw.adopted if adopt is None else adopt:
        kv["razor.layer_window_scale"] = (V.ARRAY, [float(x) for x in lw.scales], V.FLOAT32)
    return kv


def _field_kv(f) -> tuple:
    """A GGUF reader field as (GGUFValueType, value, array sub-type or None), the form GGUFWriter.add_key_value takes."""
    import gguf

    vt = f.types[0]
    return vt, f.contents(), f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None


def razor_kv_of(reader) -> dict:
    """The razor.* keys a GGUF holds, in build_razor_kv's form (to rewrite some of them with write_with_razor)."""
    return {f.name: _field_kv(f) for f in reader.fields.values() if f.name.startswith(PREFIX)}


def ratios_kv(m) -> dict:
    """The keys of a razor_gguf.ratios.RatioMeasurement: its provenance, and its pins as razor.n_pin where adopted
    (the adopted ratio is the head map itself)."""
    from gguf import GGUFValueType as V

    f32 = lambda xs: (V.ARRAY, [float(x) for x in xs], V.FLOAT32)  # noqa: E731
    u32 = lambda xs: (V.ARRAY, [int(x) for x in xs], V.UINT32)  # noqa: E731
    out = {
        "razor.calibration.ratios": f32(m.ratios),
        "razor.calibration.ratio_heads": u32(m.retrieval_heads),
        "razor.calibration.ratio_windows": u32(m.windows),
        "razor.calibration.ratio_kld": f32(m.kld),
        "razor.calibration.ratio_kld_lo": f32(lo for lo, _ in m.kld_ratio_95),
        "razor.calibration.ratio_kld_hi": f32(hi for _, hi in m.kld_ratio_95),
        "razor.calibration.ratio_top1": f32(m.top1),
        "razor.calibration.ratio_probe": u32(m.probe),
        "razor.calibration.ratio_probes": (V.UINT32, int(m.n_probes), None),
        "razor.calibration.ratio_probe_no_pins": (V.UINT32, int(m.probe_no_pins), None),
        "razor.calibration.ratio_probe_full": (V.UINT32, int(m.probe_full), None),
        "razor.calibration.ratio_budget": (V.FLOAT32, float(m.budget), None),
        "razor.calibration.ratio_context": (V.UINT32, int(m.context), None),
        "razor.calibration.ratio_tokens": (V.UINT32, int(m.n_positions), None),
        "razor.calibration.ratio_n_pin": (V.UINT32, int(m.n_pin), None),
        "razor.calibration.ratio_adopted": (V.BOOL, bool(m.adopted), None),
        "razor.calibration.ratio_pins_adopted": (V.BOOL, bool(m.pins_adopted), None),
        "razor.calibration.ratio_against_full": (V.BOOL, bool(m.against_full), None),
    }
    if m.pins_adopted:
        out["razor.n_pin"] = (V.UINT32, int(m.n_pin), None)
    return out


def build_razor_kv(scores, *, n_sink: int, window: int, source_name: str, source_sha256: str, tool_version: str,
                   calibration=None, budgets=None, layer_windows=None, ratios=None, head_order=None) -> dict:
    """The razor.* keys as {key: (GGUFValueType, value, sub_type)}. calibration: a
    razor_gguf.calibration.CompensationMeasurement (the measured compensation default), or None; budgets: a
    razor_gguf.calibration.BudgetMeasurement (the recommended KV budget becomes razor.kv_budget), or None;
    layer_windows: a razor_gguf.layer_windows.LayerWindowMeasurement (its allocation becomes
    razor.layer_window_scale only where it was adopted), or None; ratios: a razor_gguf.ratios.RatioMeasurement
    (provenance, and razor.n_pin where its pins were adopted; scores carry the adopted map), or None; head_order:
    [n_layer, n_head_kv] source numbering of the stored KV heads where the weights were reordered
    (razor_gguf.head_order), or None."""
    from gguf import GGUFValueType as V

    p = scores.provenance
    hm = scores.head_map.astype(np.int32).ravel().tolist()  # layer-major: index = layer*n_head_kv + head
    measured = {} if calibration is None else {
        "razor.compensation": (V.BOOL, bool(calibration.compensation), None),
        "razor.calibration.source": (V.STRING, calibration.source, None),
        "razor.calibration.tokens": (V.UINT32, int(calibration.n_tokens), None),
        "razor.calibration.n_sink": (V.UINT32, int(calibration.n_sink), None),
        "razor.calibration.window": (V.UINT32, int(calibration.window), None),
        "razor.calibration.kld_compensation": (V.FLOAT32, float(calibration.kld_compensation), None),
        "razor.calibration.kld_no_compensation": (V.FLOAT32, float(calibration.kld_no_compensation), None),
    }
    if budgets is not None:
        measured.update({
            "razor.calibration.budgets": (V.ARRAY, [float(x) for x in budgets.budgets], V.FLOAT32),
            "razor.calibration.budget_windows": (V.ARRAY, [int(x) for x in budgets.windows], V.UINT32),
            "razor.calibration.budget_kld": (V.ARRAY, [float(x) for x in budgets.kld], V.FLOAT32),
            "razor.calibration.budget_top1": (V.ARRAY, [float(x) for x in budgets.top1], V.FLOAT32),
            "razor.calibration.budget_tokens": (V.UINT32, int(budgets.n_tokens), None),
            "razor.calibration.budget_context": (V.UINT32, int(budgets.context), None),
            "razor.calibration.top1_target": (V.FLOAT32, float(budgets.target_top1), None),
        })
        if budgets.kv_budget is not None:  # the default at load time: the window is fit to each context
            measured["razor.kv_budget"] = (V.FLOAT32, float(budgets.kv_budget), None)
    if layer_windows is not None:
        measured.update(layer_windows_kv(layer_windows))
    if ratios is not None:
        measured.update(ratios_kv(ratios))
    if head_order is not None:
        measured["razor.head_order"] = (V.ARRAY, np.asarray(head_order, np.int32).ravel().tolist(), V.INT32)
    return {
        "razor.version": (V.UINT32, RAZOR_VERSION, None),
        "razor.enabled": (V.BOOL, True, None),
        "razor.n_layer": (V.UINT32, int(scores.n_layer), None),
        "razor.n_head_kv": (V.UINT32, int(scores.n_head_kv), None),
        "razor.head_map": (V.ARRAY, hm, V.INT32),
        "razor.echo_scores": (V.ARRAY, [float(x) for x in scores.echo.ravel()], V.FLOAT32),
        "razor.induction_scores": (V.ARRAY, [float(x) for x in scores.induction.ravel()], V.FLOAT32),
        "razor.retrieval_count": (V.UINT32, int(scores.retrieval_count), None),
        "razor.retrieval_ratio": (V.FLOAT32, float(scores.retrieval_ratio), None),
        "razor.n_sink": (V.UINT32, int(n_sink), None),
        "razor.window": (V.UINT32, int(window), None),
        "razor.probe.length": (V.UINT32, int(p["probe_len"]), None),
        "razor.probe.repetitions": (V.UINT32, int(p["repetitions"]), None),
        "razor.probe.seed": (V.UINT64, int(p["seed"]), None),
        "razor.probe.token_low": (V.UINT32, int(p["token_low"]), None),
        "razor.probe.token_high": (V.UINT32, int(p["token_high"]), None),
        "razor.selection.induction_ratio": (V.FLOAT32, float(p["induction_ratio"]), None),
        "razor.selection.echo_ratio": (V.FLOAT32, float(p["echo_ratio"]), None),
        "razor.source.file": (V.STRING, source_name, None),
        "razor.source.sha256": (V.STRING, source_sha256, None),
        "razor.tool_version": (V.STRING, f"razor-gguf {tool_version}", None),
        **measured,
    }


def write_with_razor(
    reader,
    out_path: str,
    razor_kv: dict,
    progress: Callable[[int], None] | None = None,
    tensors: dict | None = None,
) -> None:
    """Copy `reader`'s GGUF to out_path with existing razor.* keys replaced by razor_kv, and the data of the
    tensors named in `tensors` (same shape and type) by theirs. Atomic."""
    import gguf

    arch = reader.get_field("general.architecture").contents()
    out_dir = os.path.dirname(os.path.abspath(out_path))
    fd, tmp = tempfile.mkstemp(prefix=".razor-", suffix=".gguf.tmp", dir=out_dir)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
        align = reader.get_field("general.alignment")
        if align is not None:
            writer.data_alignment = int(align.contents())
        for f in reader.fields.values():
            if f.name == "general.architecture" or f.name.startswith("GGUF.") or f.name.startswith(PREFIX):
                continue
            vt, val, sub = _field_kv(f)
            writer.add_key_value(f.name, val, vt, sub_type=sub)
        for k, (vt, val, sub) in razor_kv.items():
            writer.add_key_value(k, val, vt, sub_type=sub)
        for t in reader.tensors:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            writer.write_tensor_data((tensors or {}).get(t.name, t.data), tensor_endianess=reader.endianess)
            if progress:
                progress(int(t.n_bytes))
        writer.close()
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, out_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def read_razor(reader) -> dict | None:
    """The razor.* keys of a GGUF as a JSON-ready dict (SPEC section 5 `inspect` fields), or None."""
    keys = razor_keys(reader)
    if not keys:
        return None

    def get(k, default=None):
        f = reader.get_field(k)
        if f is None:
            return default
        v = f.contents()
        if isinstance(v, list) and k.startswith("razor.calibration."):  # the measured ladder: short arrays
            return [float(f"{x:.7g}") if isinstance(x, float) else x for x in v]
        return float(f"{v:.7g}") if isinstance(v, float) else v  # float32 without the binary noise

    arch = get("general.architecture")
    n_head_kv = get("razor.n_head_kv") or get(f"{arch}.attention.head_count_kv")
    if isinstance(n_head_kv, list):
        n_head_kv = n_head_kv[0]
    hm = get("razor.head_map", [])
    n_head_kv = int(n_head_kv)
    n_layer = int(get("razor.n_layer") or (len(hm) // n_head_kv if n_head_kv else 0))

    def grid(v):
        return [list(v[l * n_head_kv : (l + 1) * n_head_kv]) for l in range(n_layer)] if v else []

    prov = {k[len(PREFIX):]: get(k) for k in keys
            if k.startswith(("razor.probe.", "razor.selection.", "razor.source.", "razor.calibration.")) or k == "razor.tool_version"}
    return {
        "n_layer": n_layer,
        "n_head_kv": n_head_kv,
        "head_map": grid([int(x) for x in hm]),
        "echo_scores": grid([float(x) for x in get("razor.echo_scores", [])]),
        "induction_scores": grid([float(x) for x in get("razor.induction_scores", [])]),
        "retrieval_count": get("razor.retrieval_count", int(sum(hm))),
        "retrieval_ratio": get("razor.retrieval_ratio", (sum(hm) / len(hm)) if hm else 0.0),
        "n_sink": get("razor.n_sink"),
        "window": get("razor.window"),
        "kv_budget": get("razor.kv_budget"),
        "layer_window_scale": [float(f"{x:.7g}") for x in get("razor.layer_window_scale", [])] or None,
        "enabled": get("razor.enabled"),
        "n_pin": get("razor.n_pin", 0),  # pinned tokens per sequence by default (embed-heads --ratios)
        "compensation": get("razor.compensation", True),  # SPEC's row; embed-heads records the measured default
        # the source's numbering of the stored KV heads (embed-heads --reorder-heads), None where unchanged
        "head_order": grid([int(x) for x in get("razor.head_order", [])]) or None,
        "version": get("razor.version"),
        "provenance": prov,
    }
