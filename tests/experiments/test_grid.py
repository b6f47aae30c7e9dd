"""experiments/grid.py's command line: config flags, workdir, compilation cache, report."""

import subprocess
import sys
import textwrap

from experiments import grid


def test_cli_main_parses_flags_runs_and_prints_the_report(tmp_path, capsys):
    config_file = tmp_path / "probe_config.py"
    config_file.write_text(textwrap.dedent("""
        import ml_collections
        def get_config():
            return ml_collections.ConfigDict({"name": "probe", "epochs": 3})
    """))
    calls = []

    def run(config, workdir, command):
        calls.append((config.epochs, workdir, command))
        report = workdir / "results.md"
        report.write_text("| table |\n")
        return report

    workdir = tmp_path / "run"
    workdir.mkdir()
    argv = ["prog", f"--config={config_file}", "--config.epochs=5", f"--workdir={workdir}"]
    grid.cli_main(argv, str(config_file), run, "experiments.probe")
    assert calls == [(5, workdir, " ".join(["python -m experiments.probe", *argv[1:]]))]
    assert "| table |" in capsys.readouterr().out


def test_compilation_cache_serves_a_second_process(tmp_path):
    """The second process loads the first's compiled program from the cache directory."""
    script = textwrap.dedent(f"""
        import jax, jax.numpy as jnp
        from experiments import grid
        grid.use_compilation_cache({str(tmp_path / "cache")!r}, min_compile_seconds=0)
        f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
        print(float(f(jnp.arange(64.0).reshape(8, 8) / 64)))
    """)
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert entries, "the first process wrote no cache entry"
    second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert second.stdout == first.stdout
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == entries  # read, not rewritten


def test_chance_note_counts_expected_false_flags():
    # P(|Z| > 2) = 0.0455: 14 comparisons give 0.64 flags by chance
    assert "1 of 14 comparisons exceeds 2 standard errors; by chance alone about 0.6 would" in grid.chance_note(1, 14, 2.0)
    assert "3 of 20 comparisons exceed 3 standard errors; by chance alone about 0.1 would" in grid.chance_note(3, 20, 3.0)
    assert grid.chance_note(0, 14, 2.0) is None and grid.chance_note(1, 1, 2.0) is None


def test_cli_main_without_compilation_cache_leaves_the_setting_alone(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(grid, "use_compilation_cache", lambda directory, *a, **k: calls.append(directory))
    config_file = tmp_path / "probe_config.py"
    config_file.write_text("import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict({'name': 'p'})\n")

    def run(config, workdir, command):
        (workdir / "results.md").write_text("ok\n")
        return workdir / "results.md"

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    grid.cli_main(["prog", f"--workdir={tmp_path / 'a'}"], str(config_file), run, "m", compilation_cache=False)
    assert calls == []
    grid.cli_main(["prog", f"--workdir={tmp_path / 'b'}"], str(config_file), run, "m")
    assert calls == [tmp_path / "b" / ".jax_cache"]


def test_cli_main_default_workdir_results_that_are_not_reports_and_stray_arguments(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config_file = tmp_path / "probe_config.py"
    config_file.write_text("import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict({'name': 'p'})\n")
    seen = []

    def main(config, workdir, *, command=""):  # the experiments' main: returns numbers, not a path
        seen.append((workdir, command))
        return {"accuracy": 1.0}

    grid.cli_main(["prog"], str(config_file), main, "experiments.x", compilation_cache=False, default_workdir="runs/x")
    assert seen == [(grid.pathlib.Path("runs/x"), "python -m experiments.x")]
    assert "wrote" not in capsys.readouterr().out
    grid.cli_main(["prog"], str(config_file), main, "experiments.x", compilation_cache=False)
    assert seen[-1][0] == grid.pathlib.Path("runs/p")  # runs/<config.name>
    try:
        grid.cli_main(["prog", "stray"], str(config_file), main, "experiments.x", compilation_cache=False)
    except SystemExit as error:
        assert "unexpected arguments ['stray']" in str(error)
    else:
        raise AssertionError("a stray argument was accepted")
    assert len(seen) == 2


def test_experiment_scripts_run_from_the_command_line(tmp_path):
    """`python -m experiments.detection` parses its flags and writes its report with the command."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2]
    workdir = tmp_path / "det"
    completed = subprocess.run(
        [sys.executable, "-m", "experiments.detection", f"--workdir={workdir}", "--config.num_train_steps=2",
         "--config.image_size=32", "--config.data.num_train=16", "--config.data.num_test=8", "--config.batch_size=8",
         "--config.eval_batch_size=8", "--config.eval_every_steps=0", "--config.progress=False",
         "--config.num_figure_images=1", "--config.optimizer.warmup_steps=1"],
        cwd=root, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = (workdir / "results.md").read_text()
    assert "Command: `python -m experiments.detection --workdir=" in report and "--config.num_train_steps=2" in report
