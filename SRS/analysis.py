"""Analysis of certification results: certified accuracy, ACR, tables, curves and SRS radius differences.

Result files are read by ``SRS.results.read_results`` (both dialects: ours and the
reference code's six columns); this module only computes and formats.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from DEQ.errors import UserError

from .bounds import lower_confidence_bound
from .results import FIXED_COLUMNS, REQUIRED_COLUMNS, read_results

STAT_COLUMNS = ("ACR", "abstain", "time (s)", "speedup")
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def parse_spec(spec: str) -> tuple[str, str]:
    """``FILE[:LABEL]`` -> (path, label); the label defaults to the file stem."""
    if os.path.exists(spec) or ":" not in spec:
        path, label = spec, ""
    else:
        path, _, label = spec.rpartition(":")
        if not label:
            raise UserError(f"{spec!r}: empty label after ':'; write FILE:LABEL or just FILE")
    return path, label or Path(path).stem


def load_runs(specs: list[str], required=REQUIRED_COLUMNS) -> dict[str, pd.DataFrame]:
    """Read ``FILE[:LABEL]`` specs into an ordered {label: DataFrame}; labels must be distinct
    (``required``: the columns each file must have, see ``SRS.results.read_results``)."""
    runs: dict[str, pd.DataFrame] = {}
    for spec in specs:
        path, label = parse_spec(spec)
        if label in runs:
            raise UserError(f"label {label!r} is used twice; give distinct labels with FILE:LABEL")
        runs[label] = read_results(path, required)
    return runs


def has_fixed(df: pd.DataFrame) -> bool:
    """True for QCRS results that also carry fixed-sigma columns."""
    return all(c in df.columns for c in FIXED_COLUMNS)


def fixed_sigma_view(df: pd.DataFrame) -> pd.DataFrame:
    """The fixed-sigma results of a QCRS file as a standard frame (same rows, same times)."""
    if not has_fixed(df):
        raise UserError(f"{df.attrs.get('path', 'results')}: no {'/'.join(FIXED_COLUMNS)} columns; "
                        "--compare-fixed needs a QCRS results file")
    out = df.assign(predict=df["fixed_predict"], radius=df["fixed_radius"], correct=df["fixed_correct"])
    out.attrs = dict(df.attrs)
    return out


# ----------------------------------------------------------------------------- metrics


def _certified_counts(df: pd.DataFrame, radii) -> np.ndarray:
    correct = df["correct"].to_numpy() == 1
    radius = df["radius"].to_numpy()
    return np.array([int(np.sum(correct & (radius >= r))) for r in np.atleast_1d(radii)])


def certified_accuracy(df: pd.DataFrame, radii) -> np.ndarray:
    """Fraction of all rows that are correct with certified radius >= r, for each r."""
    return _certified_counts(df, radii) / len(df)


def average_certified_radius(df: pd.DataFrame) -> float:
    """ACR: mean over rows of radius * correct (wrong or abstained rows count as 0)."""
    return float((df["radius"] * df["correct"]).mean())


def abstain_rate(df: pd.DataFrame) -> float:
    """Fraction of rows where the smoothed classifier abstained (predict == -1)."""
    return float((df["predict"] == -1).mean())


def mean_time(df: pd.DataFrame) -> float:
    """Mean certification time per image in seconds."""
    return float(df["time"].mean())


def hp_certified_accuracy(df: pd.DataFrame, radii, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound (level ``alpha``) on certified accuracy at each radius: with
    probability >= 1 - alpha the population certified accuracy there is at least this value."""
    if not 0 < alpha < 0.5:
        raise UserError(f"--hp-alpha {alpha}: must be in (0, 0.5), e.g. 0.001")
    counts = _certified_counts(df, radii)
    lower = [lower_confidence_bound(int(k), len(df), alpha) for k in counts]
    return np.nan_to_num(np.asarray(lower, dtype=float), nan=0.0)


def radius_label(r: float) -> str:
    """Column name for radius r: '0.0', '0.25', ..."""
    return str(float(r))


def _row(df, radii, acc, time, speedup) -> dict:
    row = {radius_label(r): 100 * a for r, a in zip(radii, acc)}
    row.update({"ACR": average_certified_radius(df), "abstain": 100 * abstain_rate(df),
                "time (s)": time, "speedup": speedup})
    return row


def summary_table(runs: dict, radii=DEFAULT_RADII, baseline: str | None = None,
                  hp_alpha: float | None = None, compare_fixed: bool = False) -> pd.DataFrame:
    """One row per run: certified accuracy (%) per radius, ACR, abstain (%), mean s/image, speedup (baseline,
    default the first run, mean time / run mean time).  Optional rows ``LABEL [fixed sigma]`` (QCRS) and
    ``LABEL [HP lower bound, alpha=A]`` (radius columns only).  Full precision; ``to_markdown``/``to_latex`` round."""
    if not runs:
        raise UserError("no result files given; pass at least one RESULT.tsv")
    baseline = next(iter(runs)) if baseline is None else baseline
    if baseline not in runs:
        raise UserError(f"--baseline {baseline!r} is not one of the labels {', '.join(runs)}; pass one of them")
    if compare_fixed and not any(has_fixed(df) for df in runs.values()):
        raise UserError("--compare-fixed: no input has fixed_predict/fixed_radius/fixed_correct columns; "
                        "pass a QCRS results file or drop --compare-fixed")
    base_time = mean_time(runs[baseline])
    rows = {}
    for label, df in runs.items():
        t = mean_time(df)
        speedup = base_time / t if t > 0 else math.nan
        variants = [(label, df)]
        rows[label] = _row(df, radii, certified_accuracy(df, radii), t, speedup)
        if compare_fixed and has_fixed(df):
            fixed = fixed_sigma_view(df)
            variants.append((f"{label} [fixed sigma]", fixed))
            rows[f"{label} [fixed sigma]"] = _row(fixed, radii, certified_accuracy(fixed, radii), math.nan, math.nan)
        if hp_alpha is not None:
            for name, frame in variants:
                hp = hp_certified_accuracy(frame, radii, hp_alpha)
                rows[f"{name} [HP lower bound, alpha={hp_alpha:g}]"] = {
                    radius_label(r): 100 * a for r, a in zip(radii, hp)}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table = table[[radius_label(r) for r in radii] + list(STAT_COLUMNS)]
    table.index.name = "model"
    return table


# ----------------------------------------------------------------------------- formatting


def _round_half_up(x: float) -> int:
    # Paper tables round 72.5 -> 73; round() would give banker's rounding.  The inner round absorbs
    # float noise such as 100 * 29 / 40 = 72.49999999999999.
    return int(math.floor(round(x, 9) + 0.5))


def _cells(table: pd.DataFrame, percent_sign: str) -> list[list[str]]:
    """Formatted cell strings: accuracy as integer %, ACR 3 d.p., abstain 1 d.p. %, time 3 s.f., speedup."""
    formats = {"ACR": "{:.3f}", "abstain": "{:.1f}" + percent_sign, "time (s)": "{:.3g}", "speedup": "{:.2f}x"}
    out = []
    for _, row in table.iterrows():
        cells = []
        for column, value in row.items():
            if pd.isna(value):
                cells.append("-")
            elif column in formats:
                cells.append(formats[column].format(value))
            else:
                cells.append(str(_round_half_up(value)))
        out.append(cells)
    return out


def to_markdown(table: pd.DataFrame) -> str:
    """Markdown table ``| model | 0.0 | 0.25 | ... | ACR | abstain | time (s) | speedup |``."""
    header = ["model"] + list(table.columns)
    align = ["---"] + ["---:"] * len(table.columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for name, cells in zip(table.index, _cells(table, "%")):
        lines.append("| " + " | ".join([str(name)] + cells) + " |")
    return "\n".join(lines) + "\n"


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters in plain text."""
    specials = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(specials.get(ch, ch) for ch in str(text))


def to_latex(table: pd.DataFrame) -> str:
    """Booktabs LaTeX tabular with a spanning header over the certified-accuracy columns."""
    n_radii = len(table.columns) - len(STAT_COLUMNS)
    stats = ["ACR", "Abstain", "Time (s)", "Speedup"]
    lines = [
        r"\begin{tabular}{l" + "r" * len(table.columns) + "}",
        r"\toprule",
        r" & \multicolumn{%d}{c}{Certified accuracy (\%%) at $\ell_2$ radius}" % n_radii
        + " &" * len(STAT_COLUMNS) + r" \\",
        r"\cmidrule(lr){2-%d}" % (n_radii + 1),
        " & ".join(["Model"] + list(table.columns[:n_radii]) + stats) + r" \\",
        r"\midrule",
    ]
    for name, cells in zip(table.index, _cells(table, "%")):
        lines.append(" & ".join(latex_escape(c) for c in [name] + cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def safe_name(label: str) -> str:
    """A label usable in a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label) or "run"


# ----------------------------------------------------------------------------- plots


def _new_axes(figsize=(6.0, 4.0)):
    # Figure + Agg canvas directly: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def plot_curves(runs: dict, path, n_grid: int = 1000) -> None:
    """Step curves of certified accuracy (%) vs radius, one per run, saved to ``path`` (format from suffix)."""
    r_max = max(float(df["radius"].max()) for df in runs.values())
    # A little past the largest radius so the final drop to 0 is visible.
    x_max = 1.05 * r_max if r_max > 0 else 1.0
    fig, ax = _new_axes()
    for label, df in runs.items():
        # Exact step positions plus a fine grid; steps-pre is exact because accuracy is constant on (r_i, r_i+1].
        grid = np.union1d(np.linspace(0, x_max, n_grid), df["radius"].clip(0, x_max).to_numpy())
        ax.step(grid, 100 * certified_accuracy(df, grid), where="pre", label=label)
    ax.set_xlabel(r"$\ell_2$ radius")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_xlim(0, x_max)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path)


def plot_rrd_histogram(rrd: pd.DataFrame, path, title: str | None = None) -> None:
    """Histogram of relative radius differences over images with R_std > 0."""
    values = rrd["rrd"].dropna().to_numpy()
    fig, ax = _new_axes()
    if len(values):
        ax.hist(values, bins=min(50, max(10, len(values) // 5)), color="tab:blue", edgecolor="white")
        ax.axvline(0.1, color="tab:red", linestyle="--", linewidth=1, label="RRD = 0.1")
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no images with R_std > 0", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(r"relative radius difference $|R_{SRS} - R_{std}| / R_{std}$")
    ax.set_ylabel("images")
    ax.yaxis.get_major_locator().set_params(integer=True)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)


# ----------------------------------------------------------------------------- SRS vs standard


def idx_difference(df_a: pd.DataFrame, df_b: pd.DataFrame) -> int:
    """Number of image indices present in only one of the two runs (0 means same image set)."""
    return len(set(df_a["idx"]) ^ set(df_b["idx"]))


def relative_radius_difference(df_std: pd.DataFrame, df_srs: pd.DataFrame) -> pd.DataFrame:
    """Per image: idx, radius_std, radius_srs, rrd = |R_SRS - R_std| / R_std (NaN where R_std == 0).

    Also ``predict_differs``.  Both runs must cover the same image indices.
    """
    n_diff = idx_difference(df_std, df_srs)
    if n_diff:
        raise UserError(f"image sets differ ({n_diff} idx in only one file); "
                        "RRD needs both runs over the same images")
    merged = df_std[["idx", "radius", "predict"]].merge(
        df_srs[["idx", "radius", "predict"]], on="idx", suffixes=("_std", "_srs")).sort_values("idx")
    r_std, r_srs = merged["radius_std"], merged["radius_srs"]
    rrd = ((r_srs - r_std).abs() / r_std).where(r_std > 0)
    return pd.DataFrame({"idx": merged["idx"], "radius_std": r_std, "radius_srs": r_srs, "rrd": rrd,
                         "predict_differs": merged["predict_std"] != merged["predict_srs"]}).reset_index(drop=True)


def rrd_summary(rrd: pd.DataFrame, threshold: float = 0.1) -> dict:
    """Mean/median/max RRD and fraction below ``threshold`` over R_std > 0, plus the R_std == 0 cases."""
    defined = rrd["rrd"].dropna()
    std_zero = rrd["radius_std"] <= 0
    return {
        "n": len(rrd),
        "n_defined": len(defined),
        "mean": float(defined.mean()) if len(defined) else math.nan,
        "median": float(defined.median()) if len(defined) else math.nan,
        "max": float(defined.max()) if len(defined) else math.nan,
        "frac_below": float((defined < threshold).mean()) if len(defined) else math.nan,
        "threshold": threshold,
        "std_zero_srs_positive": int((std_zero & (rrd["radius_srs"] > 0)).sum()),
        "both_zero": int((std_zero & (rrd["radius_srs"] <= 0)).sum()),
        "srs_larger": int((rrd["radius_srs"] > rrd["radius_std"]).sum()),
        "predict_differs": int(rrd["predict_differs"].sum()) if "predict_differs" in rrd else 0,
    }


def format_rrd_summary(label: str, baseline: str, s: dict) -> str:
    """One line summarising ``rrd_summary`` output."""
    stats = (f"mean {s['mean']:.4f}, median {s['median']:.4f}, max {s['max']:.4f}, "
             f"{100 * s['frac_below']:.1f}% below {s['threshold']:g}") if s["n_defined"] else "no RRD defined"
    return (f"RRD {label} vs {baseline}: {s['n_defined']}/{s['n']} images with R_std > 0: {stats}; "
            f"R_std = 0: {s['std_zero_srs_positive']} with R_SRS > 0, {s['both_zero']} both 0; "
            f"SRS radius larger on {s['srs_larger']}; prediction differs on {s['predict_differs']}")


def larger_radius_images(rrd: pd.DataFrame) -> pd.DataFrame:
    """Images where SRS certifies a strictly larger radius than the standard run."""
    return rrd.loc[rrd["radius_srs"] > rrd["radius_std"], ["idx", "radius_std", "radius_srs"]]


# ----------------------------------------------------------------------------- outputs


def write_outputs(table: pd.DataFrame, runs: dict, out_dir, notes: list[str] = ()) -> list[Path]:
    """Write table.md/.tex/.csv and curves.png/.pdf into ``out_dir``; return the paths written.
    ``notes`` (e.g. that the runs cover different images) follow the table in table.md."""
    out = make_out_dir(out_dir)
    paths = [out / name for name in ("table.md", "table.tex", "table.csv", "curves.png", "curves.pdf")]
    paths[0].write_text(to_markdown(table) + "".join(f"\n{n}\n" for n in notes))
    paths[1].write_text(to_latex(table))
    table.to_csv(paths[2])
    plot_curves(runs, paths[3])
    plot_curves(runs, paths[4])
    return paths


def check_out_dir(out_dir) -> None:
    """Refuse an --out that cannot be written, before anything is computed or printed (creates nothing)."""
    from DEQ.checks import writable_dir_problem

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory; pass a directory path")
    problem = writable_dir_problem(str(out))
    if problem:
        raise UserError(f"--out {out}: {problem}; pass a writable directory")


def make_out_dir(out_dir) -> Path:
    """Create the output directory, or explain why it cannot be used."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory; pass a directory path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create directory ({exc.strerror}); pass a writable path")
    return out


def write_rrd_outputs(rrd: pd.DataFrame, label: str, baseline: str, out_dir) -> list[Path]:
    """Write rrd_<label>.png and rrd_<label>_larger.csv; return the paths written."""
    out = make_out_dir(out_dir)
    hist, larger = out / f"rrd_{safe_name(label)}.png", out / f"rrd_{safe_name(label)}_larger.csv"
    plot_rrd_histogram(rrd, hist, title=f"{label} vs {baseline}")
    larger_radius_images(rrd).to_csv(larger, index=False)
    return [hist, larger]


def different_images(runs: dict, baseline: str) -> list[tuple[str, int]]:
    """(label, number of idx in only one of the two) for every run whose images differ from the baseline's."""
    base = runs[baseline]
    return [(label, n) for label, df in runs.items() if label != baseline and (n := idx_difference(base, df))]


def check_same_images(runs: dict, baseline: str, allow: bool) -> list[str]:
    """Refuse (one line) runs over different image sets, unless ``allow``: then return the note to print."""
    differ = different_images(runs, baseline)
    if not differ:
        return []
    label, n = differ[0]
    where = f"{runs[baseline].attrs.get('path', baseline)} and {runs[label].attrs.get('path', label)}"
    if not allow:
        raise UserError(f"{where} cover different images ({n} idx in only one): the table would compare different "
                        f"test samples; rerun over the same images (same --skip/--max) or pass --allow-different-images")
    return [f"note: these runs cover different images ({', '.join(f'{lb}: {k} idx' for lb, k in differ)} not shared "
            f"with {baseline}); accuracy, ACR and speedup compare different test samples"]


def run_kind(df: pd.DataFrame, label: str) -> tuple[str | None, float | None]:
    """('standard' | 'srs' | None, sigma or None) of a run, for RRD.

    From the header when it has one (``mode`` must be certify, ``srs`` off or not, ``sigma``);
    a headerless file (the reference code's) counts as SRS only when its label says SRS, else as
    a standard run of unknown sigma.  QCRS and predict files give None: RRD does not apply."""
    meta = df.attrs.get("meta", {})
    mode = meta.get("mode")
    if mode is not None and mode != "certify":
        return None, None
    try:
        sigma = float(meta["sigma"]) if "sigma" in meta else None
    except ValueError:
        sigma = None
    if "srs" in meta:
        return ("standard" if meta["srs"] == "off" else "srs"), sigma
    return ("srs" if "srs" in label.lower() else "standard"), sigma


def rrd_pair(runs: dict, a: str, b: str) -> tuple[str, str] | None:
    """(standard label, SRS label) when one of a, b is a standard run and the other an SRS run of the
    same sigma (where both headers give it), else None: RRD means nothing for other pairs."""
    (ka, sa), (kb, sb) = run_kind(runs[a], a), run_kind(runs[b], b)
    if {ka, kb} != {"standard", "srs"}:
        return None
    if sa is not None and sb is not None and not math.isclose(sa, sb):
        return None
    return (a, b) if ka == "standard" else (b, a)


def rrd_report(runs: dict, baseline: str, out_dir=None) -> list[str]:
    """RRD lines for every standard/SRS pair of the same sigma formed by the baseline and another run
    (and, with ``out_dir``, their histogram and larger-radius CSV).  A pair over different image sets
    (possible only with --allow-different-images) gets an 'image sets differ' line instead of numbers."""
    lines = []
    for label in runs:
        if label == baseline:
            continue
        pair = rrd_pair(runs, baseline, label)
        if pair is None:
            continue
        std, srs = pair
        n_diff = idx_difference(runs[std], runs[srs])
        if n_diff:
            lines.append(f"RRD {srs} vs {std}: skipped, image sets differ ({n_diff} idx in only one file)")
            continue
        rrd = relative_radius_difference(runs[std], runs[srs])
        lines.append(format_rrd_summary(srs, std, rrd_summary(rrd)))
        if out_dir is not None:
            write_rrd_outputs(rrd, srs, std, out_dir)
    return lines


# ----------------------------------------------------------------------------- attack table
def attack_table(runs: dict, radii=None) -> pd.DataFrame:
    """The paper's attack table: smoothed-classifier accuracy (%), 'clean' then one column per attack radius
    (default every epsilon > 0 found), one row per attack; missing cells NaN.  ``runs``: {label: frame} of attack.py
    and predict.py files (read with ``read_results(path, PREDICTION_COLUMNS)``)."""
    cells, clean = {}, []
    for label, df in runs.items():
        meta = df.attrs.get("meta", {})
        mode = meta.get("mode")
        acc = 100.0 * float(df["correct"].mean())
        if mode == "predict" or (mode == "attack" and float(meta.get("epsilon", "nan")) == 0):
            clean.append(acc)
            continue
        if mode != "attack":
            raise UserError(f"{label}: not an attack or predict results file (mode {mode}); pass files written by "
                            f"SRS/code/attack.py or predict.py")
        cells[(meta["attack_label"], float(meta["epsilon"]))] = acc
    if not cells:
        raise UserError("--attack-table: no attack files among the results; run SRS/code/attack.py first")
    eps = sorted({e for _, e in cells}) if radii is None else [float(r) for r in radii if r > 0]
    order = sorted({a for a, _ in cells}, key=lambda a: (not a.startswith("PGD"), int(a.split("m=")[1]) if "m=" in a else 0, a))
    table = pd.DataFrame(index=order, columns=["clean"] + [radius_label(e) for e in eps], dtype=float)
    table["clean"] = float(np.mean(clean)) if clean else np.nan
    for (attack, e), acc in cells.items():
        if e in eps:
            table.loc[attack, radius_label(e)] = acc
    table.index.name = "attack"
    return table


def attack_markdown(table: pd.DataFrame) -> str:
    """Markdown of :func:`attack_table` (accuracy in %, '-' for cells not run)."""
    head = "| attack | " + " | ".join(table.columns) + " |\n|---|" + "---:|" * len(table.columns)
    rows = ["| " + str(i) + " | " + " | ".join("-" if v != v else f"{v:.1f}" for v in r) + " |"
            for i, r in zip(table.index, table.to_numpy(dtype=float))]
    return "\n".join([head] + rows)


def attack_latex(table: pd.DataFrame) -> str:
    """LaTeX tabular of :func:`attack_table`."""
    lines = [r"\begin{tabular}{l" + "r" * len(table.columns) + "}", r"\toprule",
             "Attack & " + " & ".join(latex_escape(c) for c in table.columns) + r" \\", r"\midrule"]
    for i, r in zip(table.index, table.to_numpy(dtype=float)):
        lines.append(latex_escape(str(i)) + " & " + " & ".join("-" if v != v else f"{v:.1f}" for v in r) + r" \\")
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"])


def write_attack_outputs(table: pd.DataFrame, out_dir) -> list[Path]:
    """attack_table.md/.tex/.csv in ``out_dir``."""
    out = make_out_dir(out_dir)
    paths = [out / f"attack_table.{ext}" for ext in ("md", "tex", "csv")]
    paths[0].write_text(attack_markdown(table) + "\n")
    paths[1].write_text(attack_latex(table) + "\n")
    table.to_csv(paths[2])
    return paths
