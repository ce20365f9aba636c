"""Every figure rode draws is readable: drawn from small real runs of every task (and of the
hooks), no text past the figure's edge, no two legend entries alike, every axis labelled;
one colour per method or contender across figures; guides of the expected slopes."""
import matplotlib.pyplot as plt
import pytest

from runner import plots


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A folder of small real runs: a train sweep with every hook on, gradcheck, memory,
    bench (every contender installed), discretization and linear."""
    from hydra.core.global_hydra import GlobalHydra

    from runner.cli import main

    root = tmp_path_factory.mktemp("runs")
    hooks = [f"hooks.{h}.every=3" for h in ("grad_error", "memory", "recon", "smoothness")]
    commands = [
        ["-m", "train", "depth=2,4", "method=euler,heun", "epochs=1", "width=8",
         "dataset=synthetic", "dataset.num_samples=120", "progress=false", "device=cpu",
         *hooks, f"hydra.sweep.dir={root / 'train'}"],
        ["-m", "gradcheck", "depth=2,4", "method=euler,heun", "init=tied,iid", "width=8",
         "batch_size=32", "model.activation=tanh", "dtype=float64", "device=cpu", "dataset=synthetic",
         f"hydra.sweep.dir={root / 'grad'}"],
        ["memory", "depths=[4,8]", "dataset=synthetic", "width=8", "batch_size=16", "steps=1",
         "device=cpu", f"hydra.run.dir={root / 'memory'}"],
        ["bench", "depths=[2,4]", "methods=[euler,heun]", "width=16", "batch=16", "warmup=0",
         "repeats=1", "progress=false", "memory=false", f"hydra.run.dir={root / 'bench'}"],
        ["discretization", "cases=[linear,tanh]", "weights=[constant,iid]", "depths=[4,8]",
         "ref_steps=32", "trials=1", "batch_size=4", "progress=false",
         f"hydra.run.dir={root / 'disc'}"],
        ["linear", "depths=[4,8]", "steps=6", "snapshots=[0,3]", "progress=false",
         f"hydra.run.dir={root / 'linear'}"],
    ]
    for command in commands:
        try:
            main(command)
        except SystemExit as e:
            assert not e.code, f"rode {' '.join(command)} exited {e.code}"
        finally:
            GlobalHydra.instance().clear()
    return root


@pytest.fixture
def drawn(monkeypatch):
    """Every figure saved while the test runs: file name -> (problems, line labels), as the
    check on save (strict: an unreadable figure raises) found them."""
    seen, last = {}, []
    check, save = plots.problems, plots._save

    def problems(fig):
        found = check(fig)
        last[:] = [found, [line.get_label() for ax in fig.axes for line in ax.lines]]
        return found

    def saved(fig, path):
        result = save(fig, path)
        seen[path.name] = tuple(last)
        return result

    monkeypatch.setattr(plots, "problems", problems)
    monkeypatch.setattr(plots, "_save", saved)
    monkeypatch.setattr(plots, "STRICT", True)
    return seen


@pytest.mark.slow
def test_every_figure_of_the_report_on_real_runs_is_readable(runs, drawn, tmp_path):
    from runner.cli import main

    out = tmp_path / "report"
    main(["report", str(runs), f"out_dir={out}"])
    report = (out / "report.md").read_text()
    assert "section of" not in report, report   # a section that raised (FigureProblem too)
    expected = {"test_error.png", "grad_error.png", "memory.png", "bench.png",
                "discretization.png", "linear_increments.png", "linear_weights.png",
                *(f"hook_{h}_compare.png" for h in ("grad_error", "memory", "recon",
                                                     "smoothness"))}
    assert expected <= set(drawn), sorted(drawn)
    assert sum(name.startswith("hook_grad_error_") for name in drawn) == 5   # 4 runs + compare
    for name, (found, _) in drawn.items():
        assert found == [], f"{name}: {found}"
        assert (out / name).is_file()
    # Reference slopes where a figure is about an order.
    assert {"slope \u22121 (guide)", "slope \u22122 (guide)"} <= set(drawn["grad_error.png"][1])
    assert "slope \u22121/2 (guide)" in drawn["discretization.png"][1]


def test_the_check_finds_what_makes_a_figure_unreadable():
    fig, ax = plt.subplots(figsize=(3, 2))
    fig.suptitle("a title far too long to fit on a figure three inches wide, cut at both edges")
    ax.plot([1, 2], [1, 2], color="tab:blue", label="euler")
    ax.plot([1, 2], [2, 3], color="tab:blue", label="momentum")   # the same blue, no marker
    ax.legend()
    ax.set_xlabel("depth N")
    found = plots.problems(fig)
    assert any("past the figure's edge" in p and "a title far" in p for p in found), found
    assert any("'euler' and 'momentum' are drawn alike" in p for p in found), found
    assert any("y axis" in p and "no label" in p for p in found), found
    with pytest.raises(plots.FigureProblem):
        plots.check_readable(fig)
    plt.close(fig)
    # The same figure drawn with the vocabulary passes.
    fig, axes = plots._panels(1, "a title far too long to fit on a figure three inches wide, "
                                 "cut at both edges", width=3)
    for name in ("euler", "momentum"):
        axes[0].plot([1, 2], [1, 2], label=name, **plots._style(f"{name} adjoint"))
    plots._legend(axes[0])
    axes[0].set_xlabel("depth N")
    axes[0].set_ylabel("error")
    assert plots.problems(fig) == []
    plt.close(fig)


def test_one_colour_per_method_and_contender_everywhere():
    names = ["euler", "heun", "rev_heun", "momentum", "backprop", "adjoint", "adjoint_shared",
             "checkpoint", "torchdiffeq", "memcnn", "plain"]
    styles = {n: (plots.color_of(n), plots.marker_of(n)) for n in names}
    assert len({c for c, _ in styles.values()}) == len(names)
    # The same name gets the same colour in every figure: the style of a label follows it.
    assert plots._style("momentum backprop (same precision)")["color"] == plots.color_of("momentum")
    assert plots._style("euler adjoint | init=iid")["color"] == plots.color_of("euler")
    assert [plots.style_of(g) for g in ("backprop", "adjoint", "shared")] == ["-", "--", ":"]
    assert plots.color_of("something new") == plots.color_of("something new")


# ------------------------------------------- every figure, from rows in the tasks' formats
METHODS = ["euler", "heun", "rev_heun", "momentum"]
CONTENDERS = ["plain", "backprop", "adjoint", "adjoint_shared", "checkpoint", "torchdiffeq",
              "memcnn"]


def test_every_figure_is_readable_in_its_hardest_case(drawn, tmp_path):
    """Each plot function on rows as its task writes them, in the cases that were unreadable:
    four methods with backprop's own error, contenders whose curves coincide (adjoint and
    memcnn; the shared adjoint and torchdiffeq), many panels, long labels."""
    depths = [16, 64, 256, 1024]
    grad = {}
    for k, m in enumerate(METHODS):
        for panel in ("init=smooth", "init=iid"):
            grad[f"{m} | {panel}"] = [(n, 0.1 * (k + 1) / n, 0.05 / n, 0.2 / n) for n in depths]
            grad[f"{m} backprop (same precision) | {panel}"] = [(n, 0.01 * n, 0.01 * n, 0.01 * n)
                                                                 for n in depths]
    plots.plot_grad_error(grad, tmp_path / "grad_error.png")
    bench = [{"depth": n, "contender": c, "method": m, "seconds_per_step": 0.01 * n,
              "peak_bytes": 2**20 * (n if c in ("backprop", "plain") else 1),
              "grad_rel_error": {"adjoint": 1e-3, "memcnn": 1e-3, "adjoint_shared": 1e-2,
                                 "torchdiffeq": 1e-2}.get(c, "nan")}
             for n in depths for c in CONTENDERS for m in ("euler", "heun")]
    plots.plot_bench(bench, tmp_path / "bench.png")
    memory = [{"depth": n, "grad": g, "method": m, "saved_bytes": 1000 * n,
               "peak_bytes": 2000 * n, "seconds_per_step": 0.001 * n}
              for n in depths for g in ("backprop", "adjoint") for m in ("euler", "heun")]
    plots.plot_memory(memory, tmp_path / "memory.png")
    test_error = {f"{m} {g} | optim=sgd weight_decay=0.0005 lr=0.1 epochs=10": [
        (n, 0.05, 0.04, 0.06, 2) for n in (2, 4, 8, 16)]
        for m in ("euler", "heun") for g in ("backprop", "adjoint")}
    plots.plot_test_error(test_error, tmp_path / "test_error.png")
    disc = [{"case": c, "weights": w, "method": m, "depth": n, "error": 1.0 / n}
            for c in ("linear", "tanh") for w in ("constant", "smooth", "rough", "iid")
            for m in ("euler", "heun") for n in depths]
    plots.plot_discretization(disc, tmp_path / "discretization.png")
    inc = [{"depth": n, "step": s, "loss": 1.0 / (s + 1), "max_increment": 1.0 / n,
            "scaled_increment": 0.8} for n in (8, 16, 32, 64, 128) for s in range(0, 200, 20)]
    plots.plot_linear_increments(inc, tmp_path / "linear_increments.png")
    import numpy as np
    plots.plot_linear_weights({"depth": 32, "steps": [0, 10, 50, 200],
                               "weights": np.random.default_rng(0).normal(size=(4, 32, 2, 2))},
                              tmp_path / "linear_weights.png")
    for name, (found, _) in drawn.items():
        assert found == [], f"{name}: {found}"
    assert len(drawn) == 7
    assert {"slope \u22121 (guide)", "slope \u22122 (guide)", "slope \u22121/2 (guide)"} <= set(
        drawn["grad_error.png"][1])
    assert "slope \u22121/2 (guide)" in drawn["discretization.png"][1]


def test_convergence_pareto_and_alpha_figures_speak_the_vocabulary(drawn, tmp_path, monkeypatch):
    """The convergence figure (init as line style, O(1/N) guide, both slopes in one legend),
    the accuracy/memory front (grad modes in their colours, methods as markers, legend
    outside) and the gradient error at alpha < 1 (guides at the predicted 1 - 2 alpha) are
    readable in their hardest case: series that differ only in alpha or only in method."""
    styles = {}
    save = plots._save

    def capture(fig, path):   # each line's colour and marker, as drawn
        for ax in fig.axes:
            for line in ax.lines:
                styles.setdefault(path.name, {})[line.get_label()] = (line.get_color(),
                                                                      line.get_marker(),
                                                                      line.get_linestyle())
        return save(fig, path)
    monkeypatch.setattr(plots, "_save", capture)

    series = {f"init={i}, alpha={a}, euler, seed=0": [(n, 1.4 if i == "iid" else 0.05 / n,
                                                        0.04 / n) for n in (4, 8, 16, 32)]
              for i in ("smooth", "iid") for a in ("1", "0.5")}
    plots.plot_convergence(series, tmp_path / "convergence.png")
    drawn_conv = {k.split("\n")[0]: v for k, v in styles["convergence.png"].items()}
    assert "slope \u22121 (guide)" in drawn_conv
    assert any("slope: weights \u22121.00, outputs \u22121.00" in k
               for k in styles["convergence.png"])
    assert len({drawn_conv[lab] for lab in series}) == 4   # four series, four looks
    assert drawn_conv["init=iid, alpha=1, euler, seed=0"][1:] == plots.SECOND["iid"][::-1]

    points = [{"grad": g, "method": m, "depth": d, "memory": 2**20 * d, "acc": 0.8 + 0.01 * k,
               "pareto": m == "euler" and g == "backprop"}
              for k, (g, m, d) in enumerate(
                  (g, m, d) for g in ("backprop", "adjoint (exact vjp)", "adjoint (shared vjp)")
                  for m in ("euler", "heun") for d in (4, 16, 64, 256))]
    plots.plot_pareto(points, tmp_path / "pareto.png", "model_memory_bytes")
    pareto = styles["pareto.png"]
    assert pareto["backprop, euler"][:2] == (plots.color_of("backprop"), plots.marker_of("euler"))
    assert pareto["adjoint (exact vjp), heun"][:2] == (plots.color_of("adjoint"),
                                                        plots.marker_of("heun"))
    assert pareto["adjoint (shared vjp), euler"][0] == plots.color_of("adjoint_shared")

    grad_error = {f"euler | alpha={a}": [(n, 0.1 * n ** (1 - 2 * a), 0.01, 1.0)
                                         for n in (8, 64, 512)] for a in (0.0, 0.5, 1.0)}
    plots.plot_grad_error(grad_error, tmp_path / "grad_error_alpha.png")
    assert {"slope +1 (guide)", "slope 0 (guide)", "slope \u22121 (guide)"} <= set(
        styles["grad_error_alpha.png"])
    for name, (found, _) in drawn.items():
        assert found == [], f"{name}: {found}"
    assert set(drawn) == {"convergence.png", "pareto.png", "grad_error_alpha.png"}


def test_the_transfer_figure_keeps_its_labels_inside(drawn, tmp_path):
    """One panel (a study over depth and lr: one optimizer, one alpha) whose losses span
    less than a decade (labelled minor ticks, 2x10^-1...), and two rows of panels with
    diverged points: every label stays inside the figure, clear of the next row."""
    def curve(n, top):
        return [(lr, 0.15 + 0.5 * k / 3 if k < top else float("inf"), k >= top, 2)
                for k, lr in enumerate((1e-4, 1e-3, 1e-2, 1e-1))]
    one = {("adam", "standard", 1.0): {n: curve(n, 4) for n in (4, 16, 64, 256)}}
    plots.plot_transfer(one, tmp_path / "transfer.png", lambda p: f"{p[0]}, alpha={p[2]:g}")
    rows = {(opt, "standard", 1.0): {n: curve(n, 3) for n in (4, 16)} for opt in ("adam", "sgd")}
    plots.plot_transfer(rows, tmp_path / "transfer_rows.png", lambda p: f"{p[0]}, alpha={p[2]:g}")
    assert drawn["transfer.png"][0] == [] and drawn["transfer_rows.png"][0] == []
