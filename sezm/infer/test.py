"""``sezm test``: a model's errors on labelled DeePMD systems, in ``dp test``'s format.

Per system: MAE and RMSE of energies (total and per atom), forces (per component), virials
(total and per atom, periodic systems with labels) and stresses; then the average over systems
weighted by the number of values each metric was taken over (exact, as if all data were one
set). ``-d DETAIL`` writes ``DETAIL.{e,e_peratom,f,v,v_peratom}.out`` tables
(``data_* pred_*`` columns), appended system after system. The model is a ``.pt`` checkpoint
or a frozen ``.pt2`` (``sezm freeze``; energy models, inputs named by its metadata).

Spin models read ``spin.npy`` (a system without it is an error) and, as ``dp test``, report the
force of every atom as "Force atom" and the magnetic force (``force_mag.npy``, magnetic atoms
only) as "Force spin" instead of "Force", with ``DETAIL.fr.out`` / ``DETAIL.fm.out`` in place of
``DETAIL.f.out``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..data import DataError, DataSystem, FileOptions
from ..engine.stream import evaluate

log = logging.getLogger("sezm.test")

REPORT = (
    ("mae_e", "Energy MAE         : {:e} eV"),
    ("rmse_e", "Energy RMSE        : {:e} eV"),
    ("mae_ea", "Energy MAE/Natoms  : {:e} eV"),
    ("rmse_ea", "Energy RMSE/Natoms : {:e} eV"),
    ("mae_f", "Force  MAE         : {:e} eV/Å"),
    ("rmse_f", "Force  RMSE        : {:e} eV/Å"),
    ("mae_fr", "Force atom MAE      : {:e} eV/Å"),
    ("rmse_fr", "Force atom RMSE     : {:e} eV/Å"),
    ("mae_fm", "Force spin MAE      : {:e} eV/uB"),
    ("rmse_fm", "Force spin RMSE     : {:e} eV/uB"),
    ("mae_v", "Virial MAE         : {:e} eV"),
    ("rmse_v", "Virial RMSE        : {:e} eV"),
    ("mae_va", "Virial MAE/Natoms  : {:e} eV"),
    ("rmse_va", "Virial RMSE/Natoms : {:e} eV"),
    ("mae_s", "Stress MAE         : {:e} eV/Å³"),
    ("rmse_s", "Stress RMSE        : {:e} eV/Å³"),
    ("mae_p", "Property MAE       : {:e}"),
    ("rmse_p", "Property RMSE      : {:e}"),
)
V_COLUMNS = " ".join(f"{kind}_v{a}{b}" for kind in ("data", "pred") for a in "xyz" for b in "xyz")


def error_stats(name: str, pred: np.ndarray, ref: np.ndarray, scale: float = 1.0) -> dict:
    """``{mae_<name>: (value, n), rmse_<name>: (value, n)}`` over all entries."""
    diff = (np.asarray(pred) - np.asarray(ref)).reshape(-1) * scale
    n = float(diff.size)
    return {
        f"mae_{name}": (float(np.abs(diff).mean()), n),
        f"rmse_{name}": (float(np.sqrt((diff**2).mean())), n),
    }


def merge(errors: list[dict]) -> dict[str, float]:
    """Average over systems weighted by sample counts (MAE linearly, RMSE in squares)."""
    total, weight = defaultdict(float), defaultdict(float)
    for err in errors:
        for key, (value, n) in err.items():
            total[key] += (value if key.startswith("mae") else value * value) * n
            weight[key] += n
    return {
        k: (total[k] / weight[k] if k.startswith("mae") else float(np.sqrt(total[k] / weight[k])))
        for k in total
    }


def _report(errors: dict[str, float]) -> None:
    for key, text in REPORT:
        if key in errors:
            log.info(text.format(errors[key]))


def _save(path: Path, table: np.ndarray, header: str, append: bool) -> None:
    with open(path, "ab" if append else "wb") as handle:
        np.savetxt(handle, table, header=header)


def _energy_system(
    dp, data: DataSystem, index: int, limit: int, detail: Path | None, append: bool
) -> dict:
    """Errors of an energy model on system ``index`` (at most ``limit`` frames), as
    :func:`error_stats` entries; writes the ``detail`` tables when given."""
    system = data.systems[index]
    spin = dp.has_spin()
    pred, ref = _energy_predictions(dp, data, index, limit)
    if "force_mag" in pred:  # magnetic atoms only
        magnetic = ref["mask_mag"].reshape(-1).astype(bool)
        pred["force_mag"] = pred["force_mag"].reshape(-1, 3)[magnetic]  # [n_magnetic, 3]
        ref["force_mag"] = ref["force_mag"].reshape(-1, 3)[magnetic]
    errors = _energy_errors(pred, ref, system.nat, spin, system.pbc)
    if detail is not None:
        _write_details(detail, str(system.path), system.nat, pred, ref, append, spin)
    return errors


def _energy_predictions(
    dp, data: DataSystem, index: int, limit: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Predictions and labels of the first ``limit`` frames of system ``index``, by key
    (``energy``, ``force``, ``virial``, ``force_mag``; labelled ones only), frames first; the
    labels also carry ``box`` (periodic systems) and ``mask_mag`` (spin models)."""
    spin, pbc = dp.has_spin(), data.systems[index].pbc
    preds, refs = defaultdict(list), defaultdict(list)
    seen = 0
    for batch in data.iter_batches(index, dp.get_rcut(), dp.device):
        if seen >= limit:
            break
        graph, labels, find = batch
        out = evaluate(dp.model, graph)
        take = min(graph.atype.shape[0], limit - seen)
        seen += take
        for key in ("energy", "force", "virial"):
            if find.get(key):
                preds[key].append(out[key][:take].detach().cpu().numpy())
                refs[key].append(labels[key][:take].cpu().numpy())
        if spin and find.get("force_mag"):
            preds["force_mag"].append(out["force_mag"][:take].detach().cpu().numpy())
            refs["force_mag"].append(labels["force_mag"][:take].cpu().numpy())
            refs["mask_mag"].append(out["mask_mag"][:take].cpu().numpy().reshape(take, -1))
        if pbc:
            refs["box"].append(batch.box[:take])
    log.info("# number of test data : %d", seen)
    pred = {k: np.concatenate(v) for k, v in preds.items()}
    return pred, {k: np.concatenate(v) for k, v in refs.items()}


def _energy_errors(pred: dict, ref: dict, nat: int, spin: bool, pbc: bool) -> dict:
    """MAE/RMSE of energy (total and per atom), force (of every atom: ``fr`` for a spin model),
    magnetic force and, for a periodic system, virial (total, per atom) and stress
    (``-virial / volume``, eV/Å³)."""
    errors = {}
    if "energy" in pred:
        errors |= error_stats("e", pred["energy"], ref["energy"])
        errors |= error_stats("ea", pred["energy"], ref["energy"], 1.0 / nat)
    if "force" in pred:
        errors |= error_stats("fr" if spin else "f", pred["force"], ref["force"])
    if "force_mag" in pred and len(pred["force_mag"]):
        errors |= error_stats("fm", pred["force_mag"], ref["force_mag"])
    if "virial" in pred and pbc:
        errors |= error_stats("v", pred["virial"], ref["virial"])
        errors |= error_stats("va", pred["virial"], ref["virial"], 1.0 / nat)
        volume = np.abs(np.linalg.det(ref["box"]))[:, None]  # [n_frames, 1]
        errors |= error_stats("s", -pred["virial"] / volume, -ref["virial"] / volume)
    return errors


def _write_details(
    detail: Path, name: str, nat: int, pred: dict, ref: dict, append: bool, spin: bool = False
) -> None:
    if "energy" in pred:
        pe = np.stack([ref["energy"].reshape(-1), pred["energy"].reshape(-1)], axis=1)
        _save(detail.with_suffix(".e.out"), pe, f"{name}: data_e pred_e", append)
        _save(detail.with_suffix(".e_peratom.out"), pe / nat, f"{name}: data_e pred_e", append)
    if "force" in pred:
        pf = np.concatenate([ref["force"].reshape(-1, 3), pred["force"].reshape(-1, 3)], axis=1)
        header = f"{name}: data_fx data_fy data_fz pred_fx pred_fy pred_fz"
        _save(detail.with_suffix(".fr.out" if spin else ".f.out"), pf, header, append)
    if "force_mag" in pred:
        pm = np.concatenate([ref["force_mag"], pred["force_mag"]], axis=1)
        header = f"{name}: data_fmx data_fmy data_fmz pred_fmx pred_fmy pred_fmz"
        _save(detail.with_suffix(".fm.out"), pm, header, append)
    if "virial" in pred:
        pv = np.concatenate([ref["virial"].reshape(-1, 9), pred["virial"].reshape(-1, 9)], axis=1)
        _save(detail.with_suffix(".v.out"), pv, f"{name}: {V_COLUMNS}", append)
        _save(detail.with_suffix(".v_peratom.out"), pv / nat, f"{name}: {V_COLUMNS}", append)


def _property_system(
    dp, data: DataSystem, index: int, limit: int, detail: Path | None, append: bool
) -> dict:
    name = dp.get_var_name()
    preds, refs, seen = [], [], 0
    for graph, labels, find in data.iter_batches(index, dp.get_rcut(), dp.device):
        if seen >= limit or not find.get(name):
            break
        take = min(graph.atype.shape[0], limit - seen)
        seen += take
        preds.append(evaluate(dp.model, graph)["property"][:take].detach().cpu().numpy())
        refs.append(labels[name][:take].cpu().numpy())
    log.info("# number of test data : %d", seen)
    if not preds:
        return {}
    pred, ref = np.concatenate(preds), np.concatenate(refs)
    if detail is not None:
        cols = " ".join(
            [f"data_{name}_{i}" for i in range(pred.shape[1])]
            + [f"pred_{name}_{i}" for i in range(pred.shape[1])]
        )
        _save(
            detail.with_suffix(".property.out"),
            np.concatenate([ref, pred], axis=1),
            f"{data.systems[index].path}: {cols}",
            append,
        )
    return error_stats("p", pred, ref)


def run_test(
    model: str,
    system: str,
    numb_test: int = 0,
    detail_file: str | None = None,
    head: str | None = None,
    file_options: FileOptions | None = None,
) -> dict[str, float]:
    """Test ``model`` (a ``.pt`` checkpoint or a frozen ``.pt2``) on every system under
    ``system`` (``file_options``: how files there are read with ASE); returns the weighted
    average errors."""
    import torch

    from ..data import fields_for_model
    from ..model.property_model import PropertyModel
    from .deep_pot import DeepPot, DeepProperty

    dp = DeepPot(model, head=head)
    is_property = isinstance(dp.model, PropertyModel)
    if is_property:
        dp = DeepProperty(model, head=head)
    # every label is optional when testing; inputs (fparam, aparam) stay required, and the
    # spins of a spin model always (as in `dp test`, whatever spin.allow_missing_label says)
    fields = {
        k: replace(f, must=(f.must and k in ("fparam", "aparam", "charge_spin")) or k == "spin")
        for k, f in fields_for_model(dp.model_params).items()
    }
    data = DataSystem(
        system, dp.get_type_map(), batch_size=1, fields=fields, file_options=file_options
    )
    limit = numb_test if numb_test > 0 else 2**62
    detail = Path(detail_file) if detail_file else None
    if detail is not None:  # before the work, not after it
        detail.parent.mkdir(parents=True, exist_ok=True)
    per_system = []
    for index, sys in enumerate(data.systems):
        log.info("# ---------------output of sezm test--------------- ")
        log.info("# testing system : %s", sys.path)
        run = _property_system if is_property else _energy_system
        with torch.enable_grad():
            errors = run(dp, data, index, limit, detail, index > 0)
        if not errors:
            log.warning("%s: no labels the model predicts; nothing to compare", sys.path)
        _report({k: v for k, (v, _) in errors.items()})
        log.info("# ----------------------------------------------- ")
        per_system.append(errors)
    if not any(per_system):
        wanted = "property labels" if is_property else "energy, force or virial labels"
        raise DataError(
            f"{system}: no {wanted} to test against in any of its {len(per_system)} "
            "system(s); `sezm test` compares predictions with labels"
        )
    average = merge(per_system)
    log.info("# ----------weighted average of errors----------- ")
    log.info("# number of systems : %d", len(per_system))
    _report(average)
    log.info("# ----------------------------------------------- ")
    return average
