"""The README cannot rot: every ```python block and every command it lists is executed.

README.md is read when the tests run (it keeps changing). Python blocks run as written, in a fresh
interpreter from the repository root; a bare expression whose trailing comment is a Python literal
(`ops.receptive_field_size(...)  # 15`) must equal it, and an assignment whose comment starts with
a bracketed shape (`y = ops.conv2d(x, k)  # [1, 2, 2, 1]`) must have that shape.

Commands come from the ```bash blocks and from the first column of tables headed "command"
(a cell starting with `...` repeats the previous command up to its first `--` flag). Each is
matched against COMMANDS below, which says how it is checked (within ~1 minute in all):
  * Run: executed in a subprocess from the repository root with its run directory moved under
    tmp_path, as written or with a tiny budget appended as config overrides (reason given);
  * Parse: the module imports and its config file parses with the command's overrides, but
    nothing runs here: the long experiments, whose tiny configs run in the test named there
    (in-process, through the same `main`), and those needing data not shipped or a GPU;
  * NotRun: `make` targets (the suite itself, or a command that is checked through the command
    it runs).
A README command that matches no entry fails the test, naming it: add how it is checked.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import io
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tokenize

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FENCE = re.compile(r"^```(?P<language>[\w-]*)[ \t]*\n(?P<body>.*?)^```", re.DOTALL | re.MULTILINE)
SHAPE_COMMENT = re.compile(r"^\[\s*\d+(?:\s*,\s*\d+)*\s*\]")


def readme_blocks(language: str) -> list[str]:
    return [m["body"] for m in FENCE.finditer(README.read_text()) if m["language"] == language]


# ------------------------------------------------------------------------------ python blocks


def checked_source(block: str) -> tuple[str, int]:
    """The block with an assert after each statement whose comment states its value or shape;
    returns (source, number of checks)."""
    comments = {
        token.start[0]: token.string[1:].strip()
        for token in tokenize.generate_tokens(io.StringIO(block).readline)
        if token.type == tokenize.COMMENT
    }
    tree = ast.parse(block)
    body, checks = [], 0
    for statement in tree.body:
        comment = comments.get(statement.end_lineno, "")
        line = ast.get_source_segment(block, statement)
        if isinstance(statement, ast.Expr) and comment:
            try:
                expected = ast.literal_eval(comment)
            except (ValueError, SyntaxError):
                expected = None
            if expected is not None:
                said = f"README: {line}  gives "
                body += ast.parse(
                    f"_value = {ast.unparse(statement.value)}\n"
                    f"assert _value == {expected!r}, {said!r} + repr(_value) + {f', the comment says {expected!r}'!r}"
                ).body
                checks += 1
                continue
        body.append(statement)
        shape = SHAPE_COMMENT.match(comment)
        if shape and isinstance(statement, ast.Assign) and isinstance(statement.targets[0], ast.Name):
            name, expected = statement.targets[0].id, tuple(ast.literal_eval(shape.group()))
            said = f"README: {line}  has shape "
            body += ast.parse(
                f"assert tuple({name}.shape) == {expected!r}, "
                f"{said!r} + str(tuple({name}.shape)) + {f', the comment says {expected!r}'!r}"
            ).body
            checks += 1
    return ast.unparse(ast.Module(body=body, type_ignores=[])), checks


def user_environment() -> dict[str, str]:
    """The environment of a user's shell: no forced host devices or fast mode from the suite."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "CNN_FAST", "CNN_REQUIRE_TORCH")}
    env["MPLBACKEND"] = "Agg"
    return env


def test_readme_has_snippets_and_commands():
    assert readme_blocks("python"), "README.md has no ```python block"
    assert readme_commands(), "README.md lists no command"


@pytest.mark.parametrize("index", range(len(readme_blocks("python"))), ids=lambda i: f"python-block-{i}")
def test_python_block_runs_as_written(index):
    source, _ = checked_source(readme_blocks("python")[index])
    result = subprocess.run([sys.executable, "-c", source], cwd=REPO, env=user_environment(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"README python block {index} failed:\n{source}\n{result.stderr[-3000:]}"


def test_value_comments_become_checks():
    """The comment convention is checked both ways, on a block written for this test."""
    source, checks = checked_source("x = [1, 2]\nlen(x)  # 2\nimport numpy as np\ny = np.zeros((1, 3))  # [1, 3], zeros\n")
    assert checks == 2
    exec(compile(source, "<block>", "exec"), {})
    wrong, _ = checked_source("len([1, 2])  # 3\n")
    with pytest.raises(AssertionError, match="the comment says 3"):
        exec(compile(wrong, "<block>", "exec"), {})


# ------------------------------------------------------------------------------ commands


def readme_commands() -> list[str]:
    """Every command of the ```bash blocks and of the "command" tables, comments removed."""
    text = README.read_text()
    commands = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens:
                commands.append(shlex.join(tokens))
    previous = None
    for table in re.finditer(r"^\| *command *\|.*\n\|[-| :]+\|\n((?:\|.*\n?)+)", text, re.MULTILINE):
        for row in table.group(1).splitlines():
            cell = re.match(r"\|\s*`([^`]+)`", row)
            if not cell:
                continue
            command = cell.group(1).strip()
            if command.startswith("..."):
                assert previous, f"README table row {row!r} starts with '...' but no command precedes it"
                command = previous.split(" --")[0] + command[3:]
            commands.append(shlex.join(shlex.split(command)))
            previous = command
    return commands


@dataclasses.dataclass(frozen=True)
class Run:
    """Run the command, with `extra` flags appended (later flags win)."""

    extra: tuple[str, ...] = ()
    why: str = "as written"
    outputs: tuple[str, ...] = ()  # files the run directory must then contain


@dataclasses.dataclass(frozen=True)
class Parse:
    why: str


@dataclasses.dataclass(frozen=True)
class NotRun:
    why: str


TINY_TRAIN = ("--config.num_train_steps=3", "--config.optimizer.warmup_steps=1", "--config.eval_every_steps=3",
              "--config.log_every_steps=1", "--config.checkpoint.every_steps=3", "--config.progress=False")

# (regex searched in the command, how it is checked); the first match wins. The experiment
# scripts share one command line (experiments.grid.cli_main): dynamics_pde runs it end to end with
# its tiny config; the others parse theirs here and run their tiny config in the test named.
COMMANDS: list[tuple[str, Run | Parse | NotRun]] = [
    (r"^make demo$", NotRun("runs the compare_schemes demo.py command of the table (parsed below; 4.5 minutes)")),
    (r"^make test$", NotRun("this test suite")),
    (r"python -m cnn\.train --config experiments/configs/train_digits\.py",
     Run(TINY_TRAIN, "300 steps as written (25 s); 3 here; the second command reruns the same directory",
         ("config.json", "metrics.jsonl"))),
    (r"python -m cnn\.models\.summary resnet50", Run()),
    (r"python -m experiments\.conv_arithmetic", Run(outputs=("results.md",))),
    (r"python -m experiments\.dynamics --config=experiments/configs/dynamics_pde\.py",
     Run(("--config=experiments/configs/dynamics_pde.py:tiny",), "14 s as written; the tiny variant",
         ("results.md",))),
    (r"python -m experiments\.dynamics --config=experiments/configs/dynamics_ode\.py",
     Parse("tests/experiments/test_dynamics.py runs the tiny variant (20 s as written)")),
    (r"python -m experiments\.segmentation",
     Parse("tests/tasks/segmentation/test_experiment.py runs the tiny config (6 minutes as written)")),
    (r"python -m experiments\.detection",
     Parse("tests/tasks/detection/test_detection_training.py runs the tiny config (11 minutes as written)")),
    (r"python -m experiments\.transfer",
     Parse("tests/tasks/test_transfer.py runs the tiny config (real MNIST, 30 minutes as written)")),
    (r"python -m experiments\.style_transfer",
     Parse("tests/tasks/test_style_transfer.py runs the tiny config (28 minutes as written)")),
    (r"python benchmarks/train_step\.py --quick", Parse("tests/benchmarks/test_quick_runs.py runs --quick")),
    (r"experiments\.compare_schemes --config=experiments/configs/demo\.py",
     Parse("tests/experiments/test_compare_schemes.py runs a tiny grid (25 cells in 6 ensembles, 6.5 minutes as written)")),
    (r"experiments\.compare_schemes --config=experiments/configs/(fashion_mnist|mnist)\.py",
     Parse("needs the real data files; ~35 minutes")),
    (r"experiments\.compare_schemes --config=experiments/configs/fashion_mnist_gpu\.py", Parse("a GPU run")),
    (r"experiments\.compare_schemes --config=experiments/configs/fashion_mnist_study\.py",
     Parse("needs the real data files; ~70 minutes (tests/experiments/test_verdict_stability.py runs a small paired grid)")),
    (r"experiments\.compare_schemes --config=experiments/configs/cifar10_lm_resnet\.py",
     Parse("needs CIFAR-10, which is not shipped; GPU hours")),
    (r"python -m experiments\.ablations",
     Parse("tests/experiments/test_ablations.py runs a tiny grid (7 minutes as written)")),
]


def policy(command: str) -> Run | Parse | NotRun:
    for pattern, check in COMMANDS:
        if re.search(pattern, command):
            return check
    raise AssertionError(
        f"README command {command!r} is not known to tests/test_readme.py: add to COMMANDS how it is checked "
        "(Run with a tiny budget, Parse, or NotRun with the reason)"
    )


def split_command(command: str) -> tuple[dict[str, str], list[str]]:
    tokens = shlex.split(command)
    env = {}
    while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):
        key, value = tokens.pop(0).split("=", 1)
        env[key] = value
    return env, tokens


def default_config_path(module: str) -> str:
    """The config file a `grid.cli_main` script uses without --config (read from its source)."""
    source = pathlib.Path(importlib.util.find_spec(module).origin).read_text()
    match = re.search(r"cli_main\(\s*(?:sys\.)?argv,\s*\"([^\"]+)\"", source)
    assert match, f"{module} does not call experiments.grid.cli_main; teach tests/test_readme.py how to parse it"
    return match.group(1)


def parse_only(argv: list[str]) -> None:
    """Import the script and parse its flags and config file as the command would."""
    if argv[0] == "python" and argv[1] == "-m":
        module, args = argv[2], argv[3:]
        assert importlib.util.find_spec(module), f"no module {module}"
        from experiments import grid

        cwd = os.getcwd()
        os.chdir(REPO)
        try:
            config, _ = grid.parse_cli_config([module, *args], default_config_path(module))
        finally:
            os.chdir(cwd)
        assert len(config) > 0
    else:  # a script: it exists and its --help lists the flags the command uses
        script = REPO / argv[1]
        help_text = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, env=user_environment(),
                                   capture_output=True, text=True, timeout=120)
        assert help_text.returncode == 0, help_text.stderr[-2000:]
        for flag in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
            assert flag in help_text.stdout, f"{argv[1]} --help does not list {flag}"


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> pathlib.Path:
    """One directory for all commands: a command that reruns a run directory finds it."""
    return tmp_path_factory.mktemp("readme_runs")


@pytest.mark.parametrize("command", readme_commands(), ids=lambda c: re.sub(r"[^\w.=-]+", "_", c)[:80])
def test_readme_command(command, run_root):
    check = policy(command)
    if isinstance(check, NotRun):  # known, and checked through what it runs (check.why)
        return
    env, argv = split_command(command)
    if isinstance(check, Parse):
        parse_only(argv)
        return
    # Run directories move under run_root; everything else stays as written.
    workdir = None
    for i, token in enumerate(argv):
        if token == "--workdir" and i + 1 < len(argv):
            workdir = argv[i + 1] = str(run_root / argv[i + 1])
        elif token.startswith("--workdir="):
            workdir = str(run_root / token.split("=", 1)[1])
            argv[i] = f"--workdir={workdir}"
    if workdir is None and argv[:2] == ["python", "-m"] and argv[2].startswith("experiments."):
        # As written it writes runs/<config name> under the repository: here, under run_root.
        workdir = str(run_root / argv[2])
        argv.append(f"--workdir={workdir}")
    if argv[0] == "python":
        argv[0] = sys.executable
    result = subprocess.run([*argv, *check.extra], cwd=REPO, env={**user_environment(), **env},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command} ({check.why}) failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    for name in check.outputs:
        assert workdir and (pathlib.Path(workdir) / name).exists(), f"{command} wrote no {name} in {workdir}"
