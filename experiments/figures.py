"""The paper's figures and tables, drawn from the Parquet store alone (``eac report STORE``).

For every experiment in the store: PNG figures and one Markdown summary (``report.md``)::

    Fig. 2      relative L1 norm of the edited matrices vs number of edits       (edits table)
    Figs. 5/9   editing metrics vs edits (ZsRE: Fig. 5, CounterFact: Fig. 9)   (evaluations, task edit/*)
    Figs. 6/10  general tasks vs edits (ZsRE: Fig. 6, CounterFact: Fig. 10)    (evaluations, general tasks)
    Fig. 7      ablations (variants tagged group: ablation) on general tasks
    Fig. 8      anchor-selection methods (group: anchor-selection) on editing metrics
    summary     every arm at its last checkpoint: perplexity, drift, editing metrics, norms
    Table 1     seconds per edit, per model and method (and per phase)
    retention   edited / unedited general-task score at the last checkpoint, per task
    trade-off   reliability of the edits so far vs perplexity retention and vs drift, per arm
    paired      each constrained arm against its base method, paired per example  (examples table)
    data        evaluations.csv: every stored evaluation row with its trajectory's labels;
                compare.csv: every paired comparison (``orchestrator.compare``)

Lines follow the paper: a colour per base method, dashed for the method itself and solid once EAC is
applied (dash-dot with PRUNE, dotted with RECT). Several seeds of one setting are averaged. A figure
whose data the store does not hold is skipped with a note in the Markdown, never drawn empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from orchestrator import compare
from orchestrator.spec import TUNE_GROUP
from orchestrator.status import status_text
from orchestrator.store import Store
from workers.editing.methods import split_method
from workers.evaluation.intervals import percentiles, proportion_interval
from workers.evaluation.metrics import BINARY_SCORES, CHANCE_LEVELS, LOG_SCALE_METRICS, TASK_METRICS
from workers.evaluation.tasks import TASKS

TASK_TITLES = {**{name: task.title for name, task in TASKS.items()},
               "drift": "Next-token drift KL(edited ‖ unedited)"}
# The general-ability panels: each task's scores, and the next-token drift over all prompts (a signal
# that moves on small models, whose task scores often sit at chance).
PLOTTED_METRICS = {**TASK_METRICS, "drift": ("kl_mean",)}
EDIT_PREFIX = "edit/"
# Paper figure numbers per edit data set: (editing metrics, general tasks).
PAPER_FIGURES = {"zsre": ("Fig. 5", "Fig. 6"), "counterfact": ("Fig. 9", "Fig. 10")}
# A method's constraint (workers.editing.methods.CONSTRAINTS) -> its line style; the base method
# itself is dashed.
CONSTRAINT_LINESTYLES = {"eac": "-", "prune": "-.", "rect": ":", "nas": (0, (5, 1)), "encore": (0, (3, 1, 1, 1, 1, 1))}
BASE_LINESTYLE = "--"
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]


@dataclass
class Section:
    title: str
    body: str  # Markdown
    figure: Path | None = None


# --------------------------------------------------------------------------------------------
# Reading the store


@dataclass
class Frames:
    trajectories: pd.DataFrame
    edits: pd.DataFrame  # with the trajectory's labels and ``requests_done`` (x axis)
    evaluations: pd.DataFrame  # with the trajectory's labels
    examples: pd.DataFrame = None  # the examples table (empty for a store written before it existed)


LABELS = ["trajectory_id", "model", "method", "variant", "group", "dataset", "seed", "status"]


def load_frames(store: Store, experiment: str) -> Frames:
    trajectories = store.frame("trajectories", experiment)
    labels = trajectories[LABELS]
    edits = (store.frame("edits", experiment).drop(columns=["method"])  # the trajectory's method is the label
             .merge(labels, on="trajectory_id", how="inner"))
    if len(edits):
        edits = edits.sort_values(["trajectory_id", "edit_index"], ignore_index=True)
        edits["requests_done"] = edits.groupby("trajectory_id")["n_requests"].cumsum()
    evaluations = store.frame("evaluations", experiment).merge(labels, on="trajectory_id", how="inner")
    evaluations = evaluations.dropna(subset=["value"])  # a metric over no examples (e.g. before any edit)
    return Frames(trajectories, edits, with_intervals(evaluations), store.frame("examples", experiment))


def base_method(method: str) -> str:
    return split_method(method)[0]


def linestyle(method: str) -> str:
    return CONSTRAINT_LINESTYLES.get(split_method(method)[1], BASE_LINESTYLE)


def general_tasks(evaluations: pd.DataFrame) -> list[str]:
    present = set(evaluations["task"]) if len(evaluations) else set()
    return [task for task in PLOTTED_METRICS if task in present]


def task_metrics(evaluations: pd.DataFrame, task: str) -> list[str]:
    """The plotted metrics of ``task`` that the rows hold, in ``PLOTTED_METRICS`` order."""
    present = set(evaluations.loc[evaluations["task"] == task, "metric"])
    return [metric for metric in PLOTTED_METRICS.get(task, ()) if metric in present]


def with_intervals(evaluations: pd.DataFrame) -> pd.DataFrame:
    """The rows with ``ci_low`` / ``ci_high``: as stored, and for a 0/1 share (``BINARY_SCORES``) stored
    without them (a store written before intervals were) the same bootstrap interval in closed form
    from the share and its count."""
    frame = evaluations.copy()
    for column in ("ci_low", "ci_high"):
        if column not in frame:
            frame[column] = math.nan
        frame[column] = frame[column].astype(float)
    missing = frame["ci_low"].isna() & pd.Series([(t, m) in BINARY_SCORES for t, m in zip(frame["task"], frame["metric"])],
                                                 index=frame.index, dtype=bool)
    bounds = [proportion_interval(float(value), int(n))
              for value, n in zip(frame.loc[missing, "value"], frame.loc[missing, "n_examples"])]
    if bounds:
        frame.loc[missing, ["ci_low", "ci_high"]] = bounds
    return frame


def at_chance(rows: pd.DataFrame, level: float) -> bool:
    """Whether every row's 95% interval contains ``level`` (a row without an interval counts as not):
    the score cannot be told from guessing at any checkpoint of any arm, so it cannot show an effect."""
    return bool(len(rows)) and bool(((rows["ci_low"] <= level) & (level <= rows["ci_high"])).all())


def log_panels(panels: list[tuple[str, pd.Series]]) -> frozenset[str]:
    """The panels whose title says they are drawn on a log axis (see ``LOG_SCALE_METRICS``)."""
    return frozenset(name for name, _ in panels if "log scale" in name)


def chance_note(part: pd.DataFrame, panels: list[tuple[str, pd.Series]], chance: dict[str, float]) -> str:
    """The report's note on the panels whose every interval contains the chance level."""
    flat = [f"{name} (chance {chance[name]:g})" for name, mask in panels
            if name in chance and at_chance(part[mask], chance[name])]
    if not flat:
        return ""
    return ("**At chance** — in these panels every arm's 95% interval contains the chance level (dashed line) at "
            "every checkpoint, so they cannot show an effect of editing on this model: " + "; ".join(flat) + ".\n\n")


# --------------------------------------------------------------------------------------------
# Drawing


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _styles(variants: list[tuple[str, str]]) -> dict[str, dict]:
    """variant -> line style: a colour per base method, dashed, and its constraint variants in the same
    colour (``linestyle``); other variants of one method (ablations, anchor rules) get colours of their own."""
    colours: dict[str, str] = {}
    styles = {}
    for variant, method in sorted(variants, key=lambda vm: (vm[0] != vm[1], vm[0])):
        key = base_method(method) if variant == method else variant
        if key not in colours:
            colours[key] = PALETTE[len(colours) % len(PALETTE)]
        styles[variant] = {"color": colours[key], "linestyle": linestyle(method), "marker": "o",
                           "markersize": 3}
    return styles


def _arm_label(variant: str, seeds: int) -> str:
    return variant + (f" ({seeds} seeds)" if seeds > 1 else "")


SHARED_LEGEND_FROM = 4  # arms in a figure above which one legend below the panels replaces a legend per panel


def _line_panels(frame: pd.DataFrame, x: str, y: str, panels: list[tuple[str, pd.Series]], title: str,
                 path: Path, ylabel: str, chance: dict[str, float] | None = None,
                 log_panels: frozenset[str] = frozenset()) -> Path:
    """One subplot per (name, row mask); in each a line per variant, averaged over seeds, with its 95%
    interval as a band where the rows carry one (``ci_low``/``ci_high``; over several seeds the mean of
    their bounds, wider than the interval of the mean), and a dashed black line at the panel's chance
    level (``chance``: panel name -> level); the panels named in ``log_panels`` on a log axis. With more than ``SHARED_LEGEND_FROM`` arms one legend below
    the panels names them all: a legend of a study's eleven arms in every panel covered its lines."""
    chance = chance or {}
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    columns = min(len(panels), 4)
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(max(4.2 * columns, 7.0), 3.3 * rows + 0.4), squeeze=False)
    styles = _styles(sorted(set(zip(frame["variant"], frame["method"]))))
    shared = len(styles) > SHARED_LEGEND_FROM
    for ax, (name, mask) in zip(axes.flat, panels):
        part = frame[mask]
        for variant, lines in part.groupby("variant", sort=True):
            mean = lines.groupby(x)[y].mean().sort_index()
            ax.plot(mean.index, mean.values, label=_arm_label(variant, lines["seed"].nunique()), **styles[variant])
            if {"ci_low", "ci_high"} <= set(lines) and lines["ci_low"].notna().any():
                bounds = lines.groupby(x)[["ci_low", "ci_high"]].mean().sort_index().dropna()
                ax.fill_between(bounds.index, bounds["ci_low"], bounds["ci_high"], color=styles[variant]["color"],
                                alpha=0.12, linewidth=0)
        if name in chance:
            ax.axhline(chance[name], color="black", linestyle="--", linewidth=0.9, label=f"chance ({chance[name]:g})")
        flat = name in chance and at_chance(part, chance[name])
        ax.set_title(name + ("\n(at chance: every interval contains it)" if flat else ""), fontsize=9)
        ax.set_xlabel("number of edits")
        if name in log_panels:
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
        if not shared:
            ax.legend(fontsize=7, handlelength=4)  # long enough to show dashed vs solid
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    if shared:
        from matplotlib.lines import Line2D

        seeds = frame.groupby("variant")["seed"].nunique()
        handles = [Line2D([], [], label=_arm_label(v, seeds[v]), **styles[v]) for v in sorted(styles)]
        if any(name in chance for name, _ in panels):
            handles.append(Line2D([], [], color="black", linestyle="--", linewidth=0.9, label="chance level"))
        columns = min(len(handles), 6)
        height = 0.3 * math.ceil(len(handles) / columns) + 0.2  # inches the legend takes below the panels
        fig.set_figheight(fig.get_figheight() + height)
        fig.legend(handles=handles, loc="lower center", ncol=columns, fontsize=8, handlelength=4, frameon=False)
        fig.tight_layout(rect=(0, height / fig.get_figheight(), 1, 1))
    else:
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


INTERVAL_NOTE = ("Bands and brackets: bootstrap 95% intervals over the sampled examples (over several seeds, the "
                 "mean of their bounds). Every checkpoint scores the same examples, so a change between checkpoints "
                 "is paired and can be real while the intervals overlap.\n\n")


def _note(title: str, why: str) -> Section:
    return Section(title, f"_Skipped: {why}._")


def _markdown_table(frame: pd.DataFrame, floatfmt: str = ".3f") -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return "–" if math.isnan(value) else format(value, floatfmt)
        return str(value)

    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _main_variants(frame: pd.DataFrame) -> pd.DataFrame:
    """The methods themselves, without ablation / anchor-selection variants."""
    return frame[frame["group"].isna()]


# --------------------------------------------------------------------------------------------
# Figures and tables


def mean_relative_l1(pairs) -> float:
    """An edit row's ‖W‖₁ / ‖W₀‖₁, the mean over its edited matrices ((name, value) pairs: MEMIT and
    AlphaEdit edit several); NaN for a row that carries none."""
    return sum(v for _, v in pairs) / len(pairs) if pairs is not None and len(pairs) else math.nan


def l1_norm_figure(frames: Frames, out: Path) -> Section:
    title = "Fig. 2 — L1 norm of the edited matrices vs number of edits"
    edits = _main_variants(frames.edits)
    if not len(edits):
        return _note(title, "the store holds no edit rows")
    edits = edits[~edits["skipped"]].copy()
    edits["l1"] = [mean_relative_l1(pairs) for pairs in edits["relative_l1"]]
    edits = edits.dropna(subset=["l1"])
    if not len(edits):
        return _note(title, "no edit row carries relative L1 norms")
    # Every line starts from the unedited matrices: ‖W₀‖₁ / ‖W₀‖₁ = 1 at 0 edits.
    origins = edits.drop_duplicates("trajectory_id").assign(requests_done=0, l1=1.0)
    edits = pd.concat([origins, edits], ignore_index=True)
    panels = [(f"{model} · {dataset}", (edits["model"] == model) & (edits["dataset"] == dataset))
              for model, dataset in sorted(set(zip(edits["model"], edits["dataset"])))]
    path = _line_panels(edits, "requests_done", "l1", panels, title, out / "fig2_l1_norm.png",
                        "‖W‖₁ / ‖W₀‖₁ (mean over edited matrices)")
    final = (edits.sort_values("requests_done").groupby(["model", "dataset", "variant"], as_index=False).last()
             [["model", "dataset", "variant", "requests_done", "l1"]])
    final["change %"] = 100 * (final["l1"] - 1)
    final = final.rename(columns={"variant": "method", "requests_done": "edits", "l1": "relative L1"})
    return Section(title, "Relative L1 norm after the last edit (the paper reports +317 % for ROME and +61 % "
                          "for MEMIT on GPT-2 XL / ZsRE):\n\n" + _markdown_table(final), path)


def editing_figures(frames: Frames, out: Path) -> list[Section]:
    evaluations = _main_variants(frames.evaluations)
    edit_rows = evaluations[evaluations["task"].str.startswith(EDIT_PREFIX)] if len(evaluations) else evaluations
    if not len(edit_rows):
        return [_note("Figs. 5/9 — editing metrics vs number of edits", "the store holds no editing-metric rows")]
    sections = []
    for dataset in sorted(set(edit_rows["dataset"])):
        figure = PAPER_FIGURES.get(Path(dataset).stem, ("Editing metrics", ""))[0]
        part = edit_rows[edit_rows["dataset"] == dataset]
        panels = [(f"{model} · {task.removeprefix(EDIT_PREFIX)} {metric}",
                   (part["model"] == model) & (part["task"] == task) & (part["metric"] == metric))
                  for model in sorted(set(part["model"]))
                  for task, metric in sorted(set(zip(part["task"], part["metric"])))]
        title = f"{figure} — editing metrics vs number of edits, edited on {dataset}"
        path = _line_panels(part, "n_edits", "value", panels, title,
                            out / f"editing_metrics_{_slug(dataset)}.png", "score")
        sections.append(Section(title, _final_table(part, ["task", "metric"]), path))
    return sections


def paired_perplexity(examples: pd.DataFrame | None) -> pd.DataFrame:
    """Per trajectory and checkpoint, its perplexity divided by its own unedited perplexity on the same
    windows, exp(Σ_w (NLL_n,w − NLL_0,w) / Σ_w tokens_w), with a paired bootstrap 95% interval over
    windows (``orchestrator.compare``); 1 at 0 edits. Empty without the examples table."""
    columns = ["trajectory_id", "n_edits", "value", "ci_low", "ci_high"]
    if examples is None or not len(examples):
        return pd.DataFrame(columns=columns)
    windows = examples[(examples["task"] == "wikitext") & (examples["metric"] == "perplexity")]
    rows = []
    for tid, part in windows.groupby("trajectory_id", sort=True):
        unedited = part[part["n_edits"] == 0]
        if not len(unedited):
            continue
        for n_edits, scored in part.groupby("n_edits", sort=True):
            paired = compare.pair_examples(unedited, scored, "wikitext", "perplexity")
            if isinstance(paired, str):
                continue
            log_ratio = (paired.arm.sum() - paired.base.sum()) / paired.weight.sum()
            low, high = percentiles(compare.cluster_bootstrap([paired])) if n_edits else (0.0, 0.0)
            rows.append({"trajectory_id": tid, "n_edits": int(n_edits), "value": math.exp(log_ratio),
                         "ci_low": math.exp(low), "ci_high": math.exp(high)})
    return pd.DataFrame(rows, columns=columns)


PAIRED_PERPLEXITY = "perplexity_paired_ratio"  # the plotted stand-in for perplexity, see ``paired_perplexity``


def identically_zero(rows: pd.DataFrame) -> bool:
    """Whether every row (every arm, every checkpoint) scores exactly 0: a panel of it cannot move."""
    return bool(len(rows)) and bool((rows["value"] == 0).all())


def general_task_figures(frames: Frames, out: Path) -> list[Section]:
    """The general tasks vs edits. A metric that is exactly 0 for every arm at every checkpoint is named in
    one line instead of drawn; perplexity is drawn, where the examples table holds its windows, as each
    trajectory's paired change from its unedited model (per-window ratio, paired interval)."""
    evaluations = _main_variants(frames.evaluations)
    tasks = general_tasks(evaluations)
    if not tasks:
        return [_note("Figs. 6/10 — general tasks vs number of edits", "the store holds no general-task rows")]
    paired = paired_perplexity(frames.examples)
    if len(paired):
        labels = evaluations.drop_duplicates("trajectory_id")[["trajectory_id", *LABELS[1:]]]
        paired = paired.merge(labels, on="trajectory_id").assign(task="wikitext", metric=PAIRED_PERPLEXITY)
    sections = []
    for dataset in sorted(set(evaluations["dataset"])):
        figure = PAPER_FIGURES.get(Path(dataset).stem, ("", "General tasks"))[1]
        part = evaluations[evaluations["dataset"] == dataset]
        plotted = part
        if len(paired) and (paired["dataset"] == dataset).any():
            plotted = pd.concat([part, paired[paired["dataset"] == dataset]], ignore_index=True)
        panels, keep, chance, zero = [], [], {}, []
        for model in sorted(set(part["model"])):
            for task in tasks:
                for metric in task_metrics(part, task):
                    mask = (part["model"] == model) & (part["task"] == task) & (part["metric"] == metric)
                    if not mask.any():
                        continue
                    keep.append(mask)
                    if identically_zero(part[mask]):
                        zero.append(f"{TASK_TITLES.get(task, task)} {metric}")
                        continue
                    shown = metric
                    if (task, metric) == ("wikitext", "perplexity") and \
                            ((plotted["model"] == model) & (plotted["metric"] == PAIRED_PERPLEXITY)).any():
                        shown = PAIRED_PERPLEXITY
                        ratios = plotted.loc[(plotted["model"] == model) & (plotted["metric"] == shown), "value"]
                        # A log axis where one arm collapses (ROME: ×79 on the study); a few % stay linear.
                        scale = ", log scale" if ratios.max() > 3 else ""
                        name = f"{model} · WikiText perplexity ÷ unedited (paired{scale})"
                    else:
                        scale = ", log scale" if (task, metric) in LOG_SCALE_METRICS else ""
                        name = f"{model} · {TASK_TITLES.get(task, task)} ({metric}{scale})"
                    panels.append((name, (plotted["model"] == model) & (plotted["task"] == task)
                                   & (plotted["metric"] == shown)))
                    if (task, metric) in CHANCE_LEVELS:
                        chance[name] = CHANCE_LEVELS[(task, metric)]
        if not keep:
            continue
        title = f"{figure} — general tasks vs number of edits, edited on {dataset}"
        zero_note = ("**Identically 0** — not drawn: " + "; ".join(zero) + ". Every arm scores exactly 0 at every "
                     "checkpoint (the model never gives a valid answer), so these cannot show an effect.\n\n"
                     if zero else "")
        paired_note = ("Perplexity is drawn as each trajectory's perplexity divided by its own unedited perplexity "
                       "on the same windows (a paired per-window ratio, band: paired bootstrap 95% interval over "
                       "windows); drift is KL(edited ‖ unedited) per prompt, paired by construction.\n\n"
                       if any(PAIRED_PERPLEXITY in str(m) for m in plotted["metric"].unique()) else "")
        path = None
        if panels:
            path = _line_panels(plotted, "n_edits", "value", panels, title,
                                out / f"general_tasks_{_slug(dataset)}.png", "score", chance, log_panels(panels))
        selected = part[pd.concat(keep, axis=1).any(axis=1)]
        sections.append(Section(title, INTERVAL_NOTE + paired_note + zero_note
                                + chance_note(plotted, panels, chance) + _final_table(selected, ["task", "metric"]),
                                path))
    return sections or [_note("Figs. 6/10 — general tasks vs number of edits", "no general-task rows to plot")]


def ablation_figure(frames: Frames, out: Path) -> Section:
    # The paper's Fig. 7 ablates EAC (no saliency map, no elastic net); any variant tagged ``ablation``
    # (e.g. ROME with the paper-equation residual key) is drawn against its full method here.
    title = "Fig. 7 — ablations (variants tagged group: ablation) against their full method"
    return _group_figure(frames, out, "ablation", title, general=True, filename="fig7_ablations.png")


def anchor_selection_figure(frames: Frames, out: Path) -> Section:
    title = "Fig. 8 — anchor-selection methods"
    return _group_figure(frames, out, "anchor-selection", title, general=False, filename="fig8_anchor_selection.png")


def _group_figure(frames: Frames, out: Path, group: str, title: str, *, general: bool, filename: str) -> Section:
    evaluations = frames.evaluations
    if not len(evaluations) or not (evaluations["group"] == group).any():
        return _note(title, f"no trajectory of the store is tagged group: {group}")
    tagged = evaluations[evaluations["group"] == group]
    # The tagged variants, with the full method and its base from the same models and data sets.
    methods = set(tagged["method"]) | {base_method(m) for m in tagged["method"]}
    settings = set(zip(tagged["model"], tagged["dataset"]))
    same_setting = pd.Series([(m, d) in settings for m, d in zip(evaluations["model"], evaluations["dataset"])],
                             index=evaluations.index)
    part = evaluations[same_setting & evaluations["method"].isin(methods)
                       & (evaluations["group"].isna() | (evaluations["group"] == group))]
    if general:
        wanted = [(task, metric) for task in general_tasks(part) for metric in task_metrics(part, task)]
    else:
        wanted = sorted({(t, m) for t, m in zip(part["task"], part["metric"]) if t.startswith(EDIT_PREFIX)})
    if not wanted:
        return _note(title, f"the {group} trajectories have no {'general-task' if general else 'editing'} rows")
    panels, chance = [], {}
    for model, dataset in sorted(settings):
        for method in sorted({base_method(m) for m in tagged["method"]}):
            for task, metric in wanted:
                mask = ((part["model"] == model) & (part["dataset"] == dataset) & (part["task"] == task)
                        & (part["metric"] == metric) & (part["method"].map(base_method) == method))
                if mask.any():
                    scale = " (log scale)" if (task, metric) in LOG_SCALE_METRICS else ""
                    name = f"{model} · {dataset} · {method} · {TASK_TITLES.get(task, task)} {metric}{scale}"
                    panels.append((name, mask))
                    if (task, metric) in CHANCE_LEVELS:
                        chance[name] = CHANCE_LEVELS[(task, metric)]
    path = _line_panels(part, "n_edits", "value", panels, title, out / filename, "score", chance,
                        log_panels(panels))
    selected = part[pd.Series(list(zip(part["task"], part["metric"])), index=part.index).isin(wanted)]
    return Section(title, INTERVAL_NOTE + chance_note(part, panels, chance) + _final_table(selected, ["task", "metric"]),
                   path)


# Norms of the edited matrices at the checkpoints (``deviation/<module>`` rows, mean over the edited
# matrices): name -> (metric, how a row's value becomes the plotted one, the value at 0 edits).
NORM_PANELS = {"‖W‖₁ / ‖W₀‖₁": ("l1_relative_change", lambda v: 1 + v, 1.0),
               "‖W‖₂ / ‖W₀‖₂ (Frobenius)": ("frobenius_relative_change", lambda v: 1 + v, 1.0),
               "‖ΔW‖₁ / ‖W₀‖₁": ("update_l1_relative", lambda v: v, 0.0),
               "‖ΔW‖₂ / ‖W₀‖₂ (Frobenius)": ("update_frobenius_relative", lambda v: v, 0.0)}
DEVIATION_PREFIX = "deviation/"


def deviation_norms(evaluations: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per trajectory and checkpoint, the mean over edited matrices of one ``deviation/<module>`` metric."""
    rows = evaluations[evaluations["task"].str.startswith(DEVIATION_PREFIX) & (evaluations["task"] != "deviation/pca")
                       & (evaluations["metric"] == metric)]
    keys = ["trajectory_id", "n_edits", "model", "method", "variant", "group", "dataset", "seed"]
    return rows.groupby(keys, dropna=False, as_index=False)["value"].mean()


def norm_figure(frames: Frames, out: Path) -> Section:
    """The edited matrices' L1 / L2 norms and the accumulated update's L1 / L2 norms vs edits, every arm
    (ablation and anchor-selection variants too; not tuning trials), from the checkpoints' rows."""
    title = "Norms of the edited matrices vs number of edits, every arm"
    evaluations = frames.evaluations
    if len(evaluations):
        evaluations = evaluations[evaluations["group"].fillna("") != TUNE_GROUP]
    parts = []
    for name, (metric, plotted, origin) in NORM_PANELS.items():
        part = deviation_norms(evaluations, metric) if len(evaluations) else pd.DataFrame()
        if not len(part):
            continue
        part["value"] = [plotted(v) for v in part["value"]]
        # Every line starts from the unedited matrices (no deviation rows are written at 0 edits).
        origins = part.drop_duplicates("trajectory_id").assign(n_edits=0, value=origin)
        parts.append(pd.concat([origins, part[part["n_edits"] > 0]], ignore_index=True).assign(panel=name))
    if not parts:
        return _note(title, "the store holds no deviation rows (evaluation.deviation_norms)")
    frame = pd.concat(parts, ignore_index=True)
    panels = [(f"{model} · {dataset} · {name}", (frame["model"] == model) & (frame["dataset"] == dataset)
               & (frame["panel"] == name))
              for model, dataset in sorted(set(zip(frame["model"], frame["dataset"]))) for name in NORM_PANELS
              if ((frame["model"] == model) & (frame["dataset"] == dataset) & (frame["panel"] == name)).any()]
    path = _line_panels(frame, "n_edits", "value", panels, title, out / "norms.png", "relative norm")
    last = frame[frame["n_edits"] == frame.groupby("trajectory_id")["n_edits"].transform("max")]
    table = (last.groupby(["model", "dataset", "variant", "n_edits", "panel"])["value"].mean().unstack("panel")
             .reset_index().rename(columns={"variant": "method", "n_edits": "edits"}))
    return Section(title, "Mean over the edited matrices, at each checkpoint; ΔW = W − W₀ accumulated over all "
                          "edits so far. After the last edit:\n\n" + _markdown_table(table), path)


# The reliability axis of the trade-off figure: the first of these the trials were scored on.
TRADEOFF_EFFICACY = (("edit/counterfact", "efficacy"), ("edit/toolkit", "reliability"))


def tuning_tradeoff_figure(frames: Frames, out: Path) -> Section:
    """`eac tune` trials: efficacy vs the accumulated update's relative L1 norm at each trial's last
    checkpoint, a panel per (model, base method). The base method's own trial (the constrained
    objective's reference) is a star at each checkpoint a trial ended at: a trial stopped early has fewer
    edits, hence a smaller update, and is compared with the reference at its own checkpoint (hollow
    markers), never with the reference's last one."""
    title = "Tuning — efficacy vs ‖ΔW‖₁ of the search's trials"
    evaluations = frames.evaluations
    trials = evaluations[evaluations["group"] == TUNE_GROUP] if len(evaluations) else evaluations
    present = set(zip(trials["task"], trials["metric"])) if len(trials) else set()
    term = next((t for t in TRADEOFF_EFFICACY if t in present), None)
    if term is None:
        return _note(title, "no tuning trial (group: tune) with editing-metric rows")
    norms = deviation_norms(trials, "update_l1_relative")
    if not len(norms):
        return _note(title, "the tuning trials have no deviation rows (evaluation.deviation_norms)")
    scores = trials[(trials["task"] == term[0]) & (trials["metric"] == term[1])]
    scored = scores.merge(norms[["trajectory_id", "n_edits", "value"]].rename(columns={"value": "l1"}),
                          on=["trajectory_id", "n_edits"], how="inner")
    scored["base"] = scored["method"].map(base_method)
    is_reference = scored["method"] == scored["base"]
    references = scored[is_reference]
    points = scored[~is_reference]
    points = points[points["n_edits"] == points.groupby("trajectory_id")["n_edits"].transform("max")].copy()
    plt = _pyplot()
    settings = sorted(set(zip(scored["model"], scored["base"])))
    fig, axes = plt.subplots(1, len(settings), figsize=(5.0 * len(settings), 4.0), squeeze=False)
    rows = []
    for ax, (model, base) in zip(axes.flat, settings):
        part = points[(points["model"] == model) & (points["base"] == base)]
        own = references[(references["model"] == model) & (references["base"] == base)]
        reference = own.groupby("n_edits")[["value", "l1"]].mean()  # per checkpoint (seeds averaged)
        final = max(scored.loc[(scored["model"] == model) & (scored["base"] == base), "n_edits"])
        for (method, edits), group in part[part["method"] != base].groupby(["method", "n_edits"]):
            early = edits < final
            ax.errorbar(group["l1"], group["value"], yerr=[group["value"] - group["ci_low"],
                                                           group["ci_high"] - group["value"]],
                        fmt="o", markersize=5, capsize=2, alpha=0.8, mfc="white" if early else None,
                        label=f"{method}, {edits} edits" + (" (stopped early)" if early else ""))
        for edits in sorted(set(part["n_edits"]) | ({final} if len(reference) else set())):
            if edits in reference.index:
                ax.scatter(reference.loc[edits, "l1"], reference.loc[edits, "value"], marker="*", s=160, zorder=3,
                           color="black" if edits == final else "white", edgecolors="black",
                           label=f"{base} (reference), {edits} edits")
        if final in reference.index:
            ax.axhline(reference.loc[final, "value"], color="black", linestyle=":", linewidth=0.9)
        ax.set_xlabel("‖ΔW‖₁ / ‖W₀‖₁ (mean over edited matrices)")
        ax.set_ylabel(f"{term[0].removeprefix(EDIT_PREFIX)} {term[1]}")
        ax.set_title(f"{model} · {base}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        shown = pd.concat([part, own[own["n_edits"] == final]]) if len(own) else part
        for _, point in shown.drop_duplicates(["trajectory_id"]).sort_values(["n_edits", "l1"]).iterrows():
            edits = int(point["n_edits"])
            ref_value, ref_l1 = (reference.loc[edits, "value"], reference.loc[edits, "l1"]) \
                if edits in reference.index else (math.nan, math.nan)
            rows.append({"model": model, "trial": point["variant"], "edits": edits,
                         term[1]: _with_interval(point["value"], point["ci_low"], point["ci_high"]),
                         "‖ΔW‖₁/‖W₀‖₁": point["l1"], "− base": point["value"] - ref_value,
                         "‖ΔW‖₁ / base's": point["l1"] / ref_l1})
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = out / "tuning_tradeoff.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    body = (f"Each trial at its last scored checkpoint; a trial stopped early (hollow) has fewer edits, hence a "
            f"smaller update, so it is compared with the base method's trial (star) at the same checkpoint: "
            f"'− base' is the {term[1]} difference and '‖ΔW‖₁ / base's' the update's ratio, both at the trial's "
            f"own checkpoint; the dotted line is the base's {term[1]} at the last. Trials by checkpoint and "
            f"‖ΔW‖₁:\n\n" + _markdown_table(pd.DataFrame(rows), ".4g"))
    return Section(title, body, path)


def edit_times_table(frames: Frames) -> Section:
    title = "Table 1 — seconds per edit"
    edits = frames.edits
    if not len(edits) or edits["seconds_total"].isna().all():
        return _note(title, "the store holds no edit timings")
    edits = edits[~edits["skipped"]]
    phases = sorted({phase for pairs in edits["seconds"] if pairs is not None for phase, _ in pairs} - {"total"})
    rows = []
    for (model, variant), part in edits.groupby(["model", "variant"], sort=True):
        row = {"model": model, "method": variant, "edits": int(part["n_requests"].sum()),
               "seconds / edit step": part["seconds_total"].mean()}
        for phase in phases:
            values = [dict(pairs).get(phase) for pairs in part["seconds"] if pairs is not None]
            values = [v for v in values if v is not None]
            row[f"{phase} (s)"] = sum(values) / len(values) if values else math.nan
        rows.append(row)
    body = ("Mean wall-clock seconds per edit step (skipped steps excluded), with the mean of each phase. "
            "Paper (Table 1): GPT-2 XL ROME 6.70, ROME-EAC 6.21, MEMIT 5.23, MEMIT-EAC 5.92; LLaMA-3-8B "
            "ROME 27.53, ROME-EAC 23.74, MEMIT 11.73, MEMIT-EAC 12.66 (GPU).\n\n" + _markdown_table(pd.DataFrame(rows), ".2f"))
    return Section(title, body)


def unedited_at_chance(evaluations: pd.DataFrame, task: str, metric: str) -> str:
    """For a score with a chance level whose unedited rows' 95% intervals all contain it: the unedited
    value(s) with interval and the level, as text; otherwise ''. ``evaluations`` as ``load_frames``
    gives them (with intervals)."""
    level = CHANCE_LEVELS.get((task, metric))
    if level is None:
        return ""
    rows = evaluations[(evaluations["task"] == task) & (evaluations["metric"] == metric)
                       & (evaluations["n_edits"] == 0)]
    if not at_chance(rows, level):
        return ""
    values = rows.drop_duplicates(["model", "value", "ci_low", "ci_high"])
    shown = ", ".join(f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in
                      zip(values["value"], values["ci_low"], values["ci_high"]))
    return f"{shown}, chance {level:g}"


def retention_section(frames: Frames, out: Path) -> Section:
    title = "Retention per task at the last checkpoint"
    evaluations = frames.evaluations
    if not len(evaluations):
        return _note(title, "the store holds no evaluation rows")
    rows, without_margin = [], []
    for task in general_tasks(evaluations):
        for metric in task_metrics(evaluations, task):
            retention = evaluations[(evaluations["task"] == task) & (evaluations["metric"] == f"retention/{metric}")]
            if not len(retention):
                continue  # e.g. an unedited score of 0: no ratio
            unedited = unedited_at_chance(evaluations, task, metric)
            if unedited:
                without_margin.append(f"{task} ({metric}): unedited {unedited}")
                continue
            last = retention.sort_values("n_edits").groupby("trajectory_id", as_index=False).last()
            for _, row in last.iterrows():
                rows.append({"model": row["model"], "dataset": row["dataset"], "method": row["variant"],
                             "seed": row["seed"], "edits": int(row["n_edits"]), "task": f"{task} ({metric})",
                             "retention": row["value"]})
    margin_note = ("\n\nNot shown: " + "; ".join(without_margin) + ". Their unedited 95% interval already contains the "
                   "chance level: there is no margin above chance to keep, so a ratio of it measures noise.") if without_margin else ""
    if not rows:
        return _note(title, "the store holds no retention rows (general tasks scored before and after edits)"
                     + margin_note)
    table = pd.DataFrame(rows)
    wide = (table.groupby(["model", "dataset", "method", "edits", "task"])["retention"].mean().unstack("task")
            .reset_index())
    plt = _pyplot()
    tasks = sorted(set(table["task"]))
    several = [column for column in ("model", "dataset") if wide[column].nunique() > 1]
    labels = [" · ".join([r["method"], *(str(r[c]) for c in several)]) for _, r in wide.iterrows()]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(wide) * (1 + len(tasks))), 4.0))
    width = 0.8 / len(tasks)
    for i, task in enumerate(tasks):
        ax.bar([j + i * width for j in range(len(wide))], wide[task], width=width, label=task)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(wide))], labels, fontsize=8, rotation=30, ha="right")
    ax.set_ylabel("edited / unedited")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, handlelength=4)  # long enough to show dashed vs solid
    fig.tight_layout()
    path = out / "retention.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    body = ("Score after the last edit divided by the unedited model's score (perplexity: inverted); for a score "
            "with a chance level c, the share of the unedited margin above chance that is kept, (edited − c) / "
            "(unedited − c). So 1 means preserved and 0 no better than guessing:\n\n" + _markdown_table(wide)
            + margin_note)
    return Section(title, body, path)


# The trade-off figure's y axis: the first of these the store holds (reliability of the edits so far).
TRADEOFF_RELIABILITY = (("edit/toolkit", "reliability"), ("edit/counterfact", "efficacy"),
                        ("edit/generative", "reliability"))
# Its x axes: (task, metric, axis label).
TRADEOFF_RETENTION = (("wikitext", "retention/perplexity", "perplexity retention (unedited / edited)"),
                      ("drift", "kl_mean", "next-token drift KL(edited ‖ unedited)"))


def tradeoff_figure(frames: Frames, out: Path) -> Section:
    """Reliability of the edits so far (y) against general-ability retention (x: perplexity retention, and
    drift) at each checkpoint: a line per arm through its checkpoints (mean over seeds; with several seeds,
    bars spanning the seeds' range on both axes). A constraint that moves the frontier lies up and to the
    right of (retention) / up and left of (drift) its base's line; one that only slides along it sits on it.
    One row of panels per model, data set and base method (MEMIT's arms, AlphaEdit's...): the arms of a row
    are drawn on the seeds they all have, so a base method whose arms are further along is not cut back to
    the seeds of another's."""
    title = "Trade-off — reliability of the edits so far vs general-ability retention"
    evaluations = _main_variants(frames.evaluations) if len(frames.evaluations) else frames.evaluations
    if not len(evaluations):
        return _note(title, "the store holds no evaluation rows")
    present = set(zip(evaluations["task"], evaluations["metric"]))
    reliability = next((key for key in TRADEOFF_RELIABILITY if key in present), None)
    axes_x = [(task, metric, label) for task, metric, label in TRADEOFF_RETENTION if (task, metric) in present]
    if reliability is None or not axes_x:
        return _note(title, "the store lacks an editing reliability or a perplexity-retention / drift row")
    keys = ["trajectory_id", "n_edits"]
    y = (evaluations[(evaluations["task"] == reliability[0]) & (evaluations["metric"] == reliability[1])]
         [keys + ["model", "dataset", "variant", "method", "seed", "value"]].rename(columns={"value": "y"}))
    y["family"] = [base_method(m) for m in y["method"]]
    # The arms of a row are compared on the same fact samples: only the seeds every arm of the row has (a
    # seed one arm finished and another has not would move one line and not the other).
    shared = {setting: set.intersection(*(set(group["seed"]) for _, group in part.groupby("variant")))
              for setting, part in y.groupby(["model", "dataset", "family"])}
    in_shared = [s in shared[(m, d, f)] for m, d, f, s in zip(y["model"], y["dataset"], y["family"], y["seed"])]
    left_out = sorted({(v, int(s)) for v, s, kept in zip(y["variant"], y["seed"], in_shared) if not kept})
    y = y[in_shared]
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    settings = sorted(set(zip(y["model"], y["dataset"], y["family"])))
    fig, grid = plt.subplots(len(settings), len(axes_x), figsize=(5.2 * len(axes_x), 4.2 * len(settings)),
                             squeeze=False)
    styles = _styles(sorted(set(zip(y["variant"], y["method"]))))
    y_name = f"{reliability[0].removeprefix(EDIT_PREFIX)} {reliability[1]}"
    table: dict[tuple, dict] = {}
    for r, (model, dataset, family) in enumerate(settings):
        for c, (task, metric, label) in enumerate(axes_x):
            ax = grid[r][c]
            x = (evaluations[(evaluations["task"] == task) & (evaluations["metric"] == metric)][keys + ["value"]]
                 .rename(columns={"value": "x"}))
            points = y[(y["model"] == model) & (y["dataset"] == dataset) & (y["family"] == family)].merge(x, on=keys)
            for variant, lines in points.groupby("variant", sort=True):
                per_checkpoint = lines.groupby("n_edits").agg(x=("x", "mean"), y=("y", "mean"), x_lo=("x", "min"),
                                                             x_hi=("x", "max"), y_lo=("y", "min"), y_hi=("y", "max"),
                                                             seeds=("seed", "nunique")).sort_index()
                style = styles[variant]
                ax.plot(per_checkpoint["x"], per_checkpoint["y"], label=_arm_label(variant, lines["seed"].nunique()),
                        **style)
                if (per_checkpoint["seeds"] > 1).any():
                    ax.errorbar(per_checkpoint["x"], per_checkpoint["y"],
                                xerr=[per_checkpoint["x"] - per_checkpoint["x_lo"], per_checkpoint["x_hi"] - per_checkpoint["x"]],
                                yerr=[per_checkpoint["y"] - per_checkpoint["y_lo"], per_checkpoint["y_hi"] - per_checkpoint["y"]],
                                fmt="none", ecolor=style["color"], alpha=0.35, linewidth=3)
                for n_edits in (per_checkpoint.index[0], per_checkpoint.index[-1]):
                    point = per_checkpoint.loc[n_edits]
                    ax.annotate(str(n_edits), (point["x"], point["y"]), fontsize=6, alpha=0.8,
                                xytext=(2, 2), textcoords="offset points")
                last = per_checkpoint.iloc[-1]
                table.setdefault((model, dataset, variant), {"edits": int(per_checkpoint.index[-1]),
                                                             y_name: last["y"]})[label.split(" (")[0]] = last["x"]
            if metric.startswith("retention/"):
                ax.axvline(1.0, color="black", linestyle=":", linewidth=0.9)
            else:  # drift spans decades between arms (0.05 to 5 on the default model); 0 is off a log axis
                ax.set_xscale("log")
                # Plain numbers at 1-2-5 steps: within one decade the default minor labels (2×10⁻¹, 3×10⁻¹...)
                # run into each other.
                ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(label + (" (log scale)" if ax.get_xscale() == "log" else ""), fontsize=8)
            ax.set_ylabel(f"{reliability[0].removeprefix(EDIT_PREFIX)} {reliability[1]} (edits so far)", fontsize=8)
            seeds = sorted(int(s) for s in shared[(model, dataset, family)])
            ax.set_title(f"{model} · {dataset} · {family} arms · seeds {', '.join(map(str, seeds))}", fontsize=9)
            ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], label=v, **styles[v]) for v in sorted(styles)]
    columns = min(len(handles), 6)
    height = 0.3 * math.ceil(len(handles) / columns) + 0.2  # inches the legend takes below the panels
    fig.set_figheight(fig.get_figheight() + height)
    fig.legend(handles=handles, loc="lower center", ncol=columns, fontsize=8, handlelength=4, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, height / fig.get_figheight(), 1, 1))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tradeoff.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    rows = [{"model": m, "dataset": d, "method": v, **values} for (m, d, v), values in sorted(table.items())]
    body = ("Each arm's checkpoints from its first edited checkpoint (numbers: edits so far, at its first and "
            "last point); the unedited model is at retention 1 (dotted line) and drift 0, where every line starts. "
            "Mean over seeds; with several seeds, bars span the seeds' range. Up and towards the unedited model is "
            "better on both axes: a constraint that moves the frontier lies beyond its base method's line, one that "
            "only makes edits weaker slides along it. One row per base method; a row draws only the seeds every arm "
            "in it has"
            + (" (left out: " + ", ".join(f"{v} seed {s}" for v, s in left_out) + ")" if left_out else "")
            + ". At each arm's last checkpoint:\n\n" + _markdown_table(pd.DataFrame(rows), ".3f"))
    return Section(title, body, path)


def comparison_section(store: Store, experiment: str, frames: Frames, out: Path) -> Section:
    """Each constrained arm against its base method (``rome-eac`` vs ``rome``), paired per example at each
    shared checkpoint (``orchestrator.compare``); every metric to ``compare.csv``, the headline ones here."""
    title = "Paired comparison — each constrained arm against its base method"
    if frames.examples is None or not len(frames.examples):
        return _note(title, "the store holds no examples table (written before per-example results were kept); "
                            "re-score the checkpoints from their edit logs to compare arms paired")
    pairs = compare.constraint_pairs(frames.trajectories)
    if not pairs:
        return _note(title, "no arm is a base method with a constraint whose base method is also an arm")
    parts = [compare.compare_arms(store, experiment, base, [arm]) for base, arm in pairs]
    table = pd.concat(parts, ignore_index=True)
    path = compare.write_csv(table, out / "compare.csv")
    shown = table[[(t, m) in compare.HEADLINE_METRICS for t, m in zip(table["task"], table["metric"])]].copy()
    shown["metric"] = shown["task"].str.removeprefix(EDIT_PREFIX) + " " + shown["metric"]

    def cell(row) -> str:
        if isinstance(row["note"], str) and row["note"]:
            return row["note"]
        ratio = row["statistic"] == "perplexity ratio"
        text = (f"×{row['estimate']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]" if ratio else
                f"{row['estimate']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]")
        text += " *" if compare.decided(row) else ""
        if not pd.isna(row["mcnemar_p"]):
            text += f"; McNemar {int(row['mcnemar_b'])}/{int(row['mcnemar_c'])}, p={row['mcnemar_p']:.2g}"
        if row["marginal_overlap"] is True and compare.decided(row):
            text += " (marginal intervals overlap)"
        return text

    shown["arm − base [95%]"] = [cell(row) for row in shown.to_dict("records")]
    view = shown[["model", "dataset", "arm", "base", "n_edits", "metric", "base_value", "arm_value",
                  "arm − base [95%]"]].rename(columns={"n_edits": "edits", "base_value": "base value",
                                                       "arm_value": "arm value"})
    body = ("Arm − base at each shared checkpoint, paired per example: the same facts, task examples and WikiText "
            "windows scored in both arms, resampled jointly (bootstrap 95% interval; several seeds: a cluster "
            "bootstrap over seeds, then examples). Perplexity: the ratio ppl_arm / ppl_base from per-window paired "
            "NLL differences. McNemar b/c: examples the base gets right and the arm wrong / the reverse, with the "
            "exact two-sided p. * marks a paired interval that excludes no change; '(marginal intervals overlap)' "
            "one that the arms' separate intervals could not decide. Every metric: "
            f"[`{path.name}`]({path.parent.name}/{path.name}).\n\n" + _markdown_table(view, ".3f"))
    return Section(title, body)


# The summary table's columns: (header, task, metric); ``deviation`` is the mean over edited matrices.
SUMMARY_COLUMNS = (("WikiText ppl", "wikitext", "perplexity"), ("drift KL", "drift", "kl_mean"),
                   ("CF efficacy", "edit/counterfact", "efficacy"), ("reliability", "edit/toolkit", "reliability"),
                   ("generalisation", "edit/toolkit", "generalisation"), ("locality", "edit/toolkit", "locality"),
                   ("‖W‖₁ / ‖W₀‖₁ − 1", "deviation", "l1_relative_change"),
                   ("‖ΔW‖₁ / ‖W₀‖₁", "deviation", "update_l1_relative"))


def summary_section(frames: Frames) -> Section:
    """One row per arm (not tuning trials) at its last scored checkpoint, averaged over seeds, with the
    signals that move on a small model beside the editing metrics and the norms; WikiText perplexity also
    before any edit. A column the store has no rows for is left out."""
    title = "Summary — every arm at its last checkpoint"
    evaluations = frames.evaluations
    if len(evaluations):
        evaluations = evaluations[evaluations["group"].fillna("") != TUNE_GROUP]
    if not len(evaluations):
        return _note(title, "the store holds no evaluation rows")
    last = evaluations.groupby("trajectory_id")["n_edits"].max()  # every column at this checkpoint
    keys = ["model", "dataset", "variant"]
    table = (evaluations.drop_duplicates("trajectory_id").assign(edits=lambda f: f["trajectory_id"].map(last))
             .groupby(keys)["edits"].min().reset_index())
    for header, task, metric in SUMMARY_COLUMNS:
        if task == "deviation":
            part = deviation_norms(evaluations, metric).assign(ci_low=math.nan, ci_high=math.nan)  # no intervals
        else:
            part = evaluations[(evaluations["task"] == task) & (evaluations["metric"] == metric)]
        if not len(part):
            continue
        if task == "wikitext":
            before = part[part["n_edits"] == 0].groupby(keys)["value"].mean().rename("WikiText ppl, unedited")
            table = table.merge(before.reset_index(), on=keys, how="left")
        at_last = part[part["n_edits"] == part["trajectory_id"].map(last)]
        table = table.merge(_mean_cells(at_last.groupby(keys)).rename(header).reset_index(), on=keys, how="left")
    table = table.rename(columns={"variant": "method"}).sort_values(["model", "dataset", "method"])
    # An arm scored only before its first edit (a study still running) has nothing to summarise: its row
    # would read as an edited model with the unedited numbers.
    unedited = table[table["edits"] == 0]
    waiting = ("\n\nNot edited yet (only the unedited model scored): "
               + ", ".join(f"{m} ({model}, {d})" for model, d, m in unedited[["model", "dataset", "method"]].values)
               + "." if len(unedited) else "")
    return Section(title, "Each arm after its last scored checkpoint (mean over seeds; 95% intervals in brackets "
                          "where the rows carry one): WikiText perplexity before and after, next-token drift, the "
                          "editing metrics on all edits so far, and the edited matrices' norms (mean over them)."
                          "\n\n" + _markdown_table(table[table["edits"] > 0]) + waiting)


def trajectories_section(frames: Frames) -> Section:
    trajectories = frames.trajectories
    table = trajectories[["model", "variant", "dataset", "seed", "edits_done", "n_edits"]].assign(
        status=[status_text(s, r) for s, r in zip(trajectories["status"], trajectories["reason"])])
    table = table.sort_values(["model", "dataset", "variant", "seed"])
    return Section("Trajectories", _markdown_table(table.rename(columns={"variant": "method"})))


EVALUATION_CSV_COLUMNS = ["model", "variant", "method", "group", "dataset", "seed", "n_edits", "task", "metric",
                          "value", "ci_low", "ci_high", "n_examples", "trajectory_id"]


def evaluations_csv(frames: Frames, out: Path) -> Section:
    """The evaluations table as one small CSV beside the figures (what a reader re-plots or tests
    against without the Parquet store): a row per stored metric, its interval, its trajectory's labels."""
    if not len(frames.evaluations):
        return _note("Data", "no evaluation rows")
    out.mkdir(parents=True, exist_ok=True)
    table = (frames.evaluations[EVALUATION_CSV_COLUMNS]
             .sort_values(["model", "dataset", "variant", "seed", "n_edits", "task", "metric"], ignore_index=True))
    path = out / "evaluations.csv"
    table.to_csv(path, index=False, float_format="%.6g")
    return Section("Data", f"[`{path.name}`]({path.parent.name}/{path.name}): {len(table)} evaluation rows "
                           f"({table['trajectory_id'].nunique()} trajectories), the values behind every figure above.")


def _final_table(frame: pd.DataFrame, keys: list[str]) -> str:
    """Each variant's value at its last checkpoint, per (task, metric), averaged over seeds, with its 95%
    interval in brackets where the rows carry one."""
    last = frame[frame["n_edits"] == frame.groupby("trajectory_id")["n_edits"].transform("max")]
    grouped = (last.assign(column=last["task"].str.removeprefix(EDIT_PREFIX) + " " + last["metric"])
               .groupby(["model", "variant", "n_edits", "column"]))
    table = _mean_cells(grouped).unstack("column").reset_index()
    return "Values at the last checkpoint:\n\n" + _markdown_table(table.rename(columns={"variant": "method",
                                                                                          "n_edits": "edits"}))


def _mean_cells(grouped) -> pd.Series:
    """Per group, the mean value, with the mean of its rows' 95% bounds in brackets where they have them."""
    values = grouped["value"].mean()
    bounds = grouped[["ci_low", "ci_high"]].mean()
    return pd.Series([_with_interval(v, lo, hi) for v, lo, hi in zip(values, bounds["ci_low"], bounds["ci_high"])],
                     index=values.index, dtype=object)


def _with_interval(value: float, low: float, high: float) -> float | str:
    """A table cell: the value, and ``[low, high]`` after it when there is an interval."""
    if math.isnan(low) or math.isnan(high):
        return value
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in Path(text).stem)


# --------------------------------------------------------------------------------------------
# The report


def experiment_sections(store: Store, experiment: str, out: Path) -> list[Section]:
    frames = load_frames(store, experiment)
    return [trajectories_section(frames), summary_section(frames), l1_norm_figure(frames, out), *editing_figures(frames, out),
            *general_task_figures(frames, out), ablation_figure(frames, out), anchor_selection_figure(frames, out),
            norm_figure(frames, out), tuning_tradeoff_figure(frames, out), edit_times_table(frames),
            retention_section(frames, out), tradeoff_figure(frames, out),
            comparison_section(store, experiment, frames, out), evaluations_csv(frames, out)]


def build_report(store_root: str | Path, out_dir: str | Path | None = None,
                 experiments: list[str] | None = None) -> Path | str:
    """Draw every figure the store has data for; write ``<out_dir>/report.md``; return its path (its
    URI when it went to object storage).

    The store may be a URI (``s3://...``): its rows are read through ``pyarrow.fs``; without
    ``out_dir`` the report is drawn in a local temporary directory and copied to ``STORE/report``."""
    store = Store(store_root)
    if not store.exists():
        raise FileNotFoundError(f"{store.uri}: no such store")
    names = experiments or store.experiments()
    missing = sorted(set(names) - set(store.experiments()))
    if missing:
        raise ValueError(f"{store.uri}: no experiment(s) {missing}; the store holds {store.experiments()}")
    if out_dir is None and not store.is_local:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="eac-report-") as local:
            _write_report(store, Path(local), names)
            return store.upload(local, "report") + "/report.md"
    out = Path(out_dir) if out_dir is not None else store.root / "report"
    return _write_report(store, out, names)


def _write_report(store: Store, out: Path, names: list[str]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Report: {store.uri}", ""]
    if not names:
        lines.append("_The store holds no trajectories yet._")
    for experiment in names:
        sections = experiment_sections(store, experiment, out / experiment)
        lines += [f"## Experiment `{experiment}`", ""]
        for section in sections:
            lines += [f"### {section.title}", ""]
            if section.figure is not None:
                lines += [f"![{section.title}]({section.figure.relative_to(out).as_posix()})", ""]
            lines += [section.body, ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
