"""pipeline.py's plot, drawn from a fixture of metrics.jsonl files (no training): every curve is
drawn from its metrics with labelled axes, DPO's loss and accuracy (per batch and held out) on y-axes of
their own, a size that reads at a README's width, and the SFT stage logs its eval loss along the run, so
that it is a curve rather than one point."""

import sys

import matplotlib.image
import pytest

from conftest import ROOT, write_jsonl

sys.path.insert(0, str(ROOT))
import pipeline  # noqa: E402
import sft  # noqa: E402

STAGES = ["sft", "dpo", "grpo", "ppo"]


@pytest.fixture
def run_dir(tmp_path):
    """Metrics as the four stages log them."""
    rows = {
        "sft": [{"step": s, "loss": 5.0 / s} for s in range(1, 11)] + [{"step": s, "eval/loss": 4.0 / s} for s in (5, 10)],
        "dpo": [{"step": 0, "eval/loss": 0.69, "eval/rewards/accuracies": 0.0}]
        + [{"step": s, "loss": 0.7 - s / 100, "rewards/accuracies": s / 8} for s in range(1, 7)]
        + [{"step": 6, "eval/rewards/accuracies": 0.8}],
        "grpo": [{"step": 0, "eval/accuracy": 0.6}] + [{"step": s, "reward": 0.5 + s / 100} for s in range(1, 9)]
        + [{"step": 8, "eval/accuracy": 0.7}],
        "ppo": [{"step": s, "objective/verifiable_correct_rate": 0.4 + s / 50} for s in range(1, 6)]
        + [{"step": 5, "eval/accuracy": 0.72}],
    }
    for stage, stage_rows in rows.items():
        (tmp_path / stage).mkdir()
        write_jsonl(tmp_path / stage / "metrics.jsonl", stage_rows)
    return tmp_path, rows


def curves(ax):
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_every_curve_has_its_own_labelled_axis(run_dir):
    out, rows = run_dir
    accuracies = dict(zip(STAGES, (0.72, 0.69, 0.77, 0.77)))
    carry = dict(zip(STAGES, (0.04, 0.04, 0.42, 0.35)))
    fig = pipeline.figure(str(out), STAGES, accuracies, carry)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert list(panels) == ["SFT", "DPO", "GRPO", "PPO", "held-out accuracy"]
    twins = {stage: [ax for ax in fig.axes if not ax.get_title() and ax.get_shared_x_axes().joined(ax, panels[stage])]
             for stage in ("SFT", "DPO", "GRPO", "PPO")}
    assert {stage: len(axes) for stage, axes in twins.items()} == {"SFT": 0, "DPO": 1, "GRPO": 0, "PPO": 0}
    for title, ax in panels.items():
        assert ax.get_ylabel(), title
    # DPO: the loss on the left axis, the reward accuracy on the right one
    dpo_loss, dpo_accuracy = panels["DPO"], twins["DPO"][0]
    assert list(curves(dpo_loss)) == ["loss"]
    assert list(curves(dpo_accuracy)) == ["rewards/accuracies", "eval/rewards/accuracies"]
    assert dpo_loss.get_ylabel() == "loss" and "accuracy" in dpo_accuracy.get_ylabel()
    assert curves(dpo_accuracy)["rewards/accuracies"] == ([1, 2, 3, 4, 5, 6], [s / 8 for s in range(1, 7)])
    assert curves(dpo_accuracy)["eval/rewards/accuracies"] == ([0, 6], [0.0, 0.8])
    colors = [line.get_color() for line in dpo_loss.get_lines() + dpo_accuracy.get_lines()]
    assert len(set(colors)) == 3
    # every logged point of each curve is drawn
    sft = curves(panels["SFT"])
    assert sft["eval/loss"] == ([5, 10], [0.8, 0.4]) and len(sft["loss"][0]) == 10
    assert curves(panels["GRPO"])["eval/accuracy"] == ([0, 8], [0.6, 0.7])
    assert curves(panels["PPO"])["objective/verifiable_correct_rate"][0] == [1, 2, 3, 4, 5]
    assert [bar.get_height() for bar in panels["held-out accuracy"].patches[:4]] == [0.72, 0.69, 0.77, 0.77]


def test_no_legend_covers_a_curve_or_a_bar(run_dir):
    """Each panel's legend sits clear of everything drawn in it: the curves of both y-axes, their tick
    labels, and the bars with their labels, at held-out accuracies up to 100%."""
    out, _ = run_dir
    fig = pipeline.figure(str(out), STAGES, dict.fromkeys(STAGES, 1.0), dict.fromkeys(STAGES, 0.95))
    renderer = fig.canvas.get_renderer()
    for ax in (ax for ax in fig.axes if ax.get_title()):
        twins = [other for other in fig.axes if other is not ax and ax.get_shared_x_axes().joined(ax, other)]
        legend = next(axis.get_legend() for axis in [ax] + twins if axis.get_legend())
        box = legend.get_window_extent(renderer)
        for axis in [ax] + twins:
            for line in axis.get_lines():
                points = axis.transData.transform(line.get_xydata())
                assert not any(box.contains(x, y) for x, y in points), (ax.get_title(), line.get_label())
            for artist in axis.patches + axis.texts:
                assert not box.overlaps(artist.get_window_extent(renderer)), (ax.get_title(), artist)
        if ax.get_lines():  # a panel of curves: its legend is outside the plotting area
            assert not box.overlaps(ax.get_window_extent(renderer)), ax.get_title()


def test_plot_writes_a_png_that_reads_at_a_readmes_width(run_dir):
    """About 900 pixels wide (a README shows it at about that width, so its text stays legible), in two
    rows of three panels with their legends below them."""
    out, _ = run_dir
    path = pipeline.plot(str(out), STAGES, dict.fromkeys(STAGES, 0.5), dict.fromkeys(STAGES, 0.25))
    assert path == str(out / "pipeline.png") and (out / "pipeline.png").stat().st_size > 10_000
    height, width, _ = matplotlib.image.imread(path).shape
    assert (width, height) == (900, 660)


def test_the_sft_stage_logs_its_eval_loss_along_the_run():
    """Evaluating every --eval_every steps gives a curve of several points even at --scale 0.3 (one
    epoch of the demo's conversations)."""
    (_, flags), = next(commands for stage, _, _, commands in pipeline.STAGES if stage == "sft")
    scaled = pipeline.scaled(flags, 0.3)
    eval_every = int(scaled[scaled.index("--eval_every") + 1])
    epochs = int(scaled[scaled.index("--num_epochs") + 1])
    steps = epochs * (sum(1 for _ in open(ROOT / "data" / "sft_train.jsonl")) // sft.Args().per_device_batch_size)
    assert steps // eval_every >= 2
