"""The grader of the course exercises in notebooks/exercises/ (instructor guide: notebooks/exercises/README.md).

Grade one student's exercise (a template notebook they filled in, or a .py file):

    python -m pytest tests/exercises -m ex3 --solution notebooks/exercises/ex3_channel_shuffle.ipynb

Grade a whole folder of work (each exN_*.ipynb or exN_*.py in it is graded by the tests of exN):

    python -m pytest tests/exercises --solution path/to/student_folder

Without --solution the reference solutions in notebooks/exercises/solutions/ are graded (that is what CI does).
Each test compares the student's function with the reference in dada_min on random inputs, with the random
number generator seeded identically before both calls, so stochastic functions are compared exactly.
"""
import json
import linecache
import re
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EXERCISE_DIR = ROOT / "notebooks" / "exercises"
SOLUTION_DIR = EXERCISE_DIR / "solutions"

# id -> (file name stem, what it teaches). The id is shared by the template notebook
# notebooks/exercises/<id>_<stem>.ipynb, the reference solutions/<id>_<stem>.py, the pytest marker <id>
# and the grading tests tests/exercises/test_<id>_<stem>.py.
EXERCISES = {
    "ex1": ("q_sample", "forward diffusion q_sample and the continuous noise level gamma"),
    "ex2": ("alpha_ramp", "the sigmoid ramp of the diffusion-loss weight alpha"),
    "ex3": ("channel_shuffle", "the channel-shuffling layer (CS)"),
    "ex4": ("residual_swap", "residual-swapped negatives (RS) and the triplet hinge, Eq. (2)-(3)"),
    "ex5": ("restore", "inference: restore any image size with padding"),
    "ex6": ("diffusion_loss", "the noise-space loss, Eq. (1) + Eq. (3)"),
    "ex7": ("train_step", "one joint training step of G and eps_theta (Algorithm A)"),
    "ex8": ("mechanism_diagnostic", "measure where the diffusion loss pushes the restorer"),
    "ex9": ("open_experiment", "open-ended: design a domain gap and measure DA on it"),
}
SOLUTION_MARK = re.compile(r"#\s*SOLUTION\b")          # first line of a solution cell in a notebook


def pytest_addoption(parser):
    parser.addoption("--solution", default=None, metavar="PATH",
                     help="student work to grade: a notebook or .py file (select its exercise with -m exN), "
                          "or a folder of exN_*.ipynb / exN_*.py files (default: the reference solutions)")


def pytest_configure(config):
    for ex, (_, what) in EXERCISES.items():
        config.addinivalue_line("markers", f"{ex}: exercise {ex[2:]}, {what}")


def exercise_of(node):
    """The exercise id a test belongs to (from its module's `pytestmark = pytest.mark.exN`)."""
    for ex in EXERCISES:
        if node.get_closest_marker(ex):
            return ex
    return None


@pytest.hookimpl(trylast=True)                           # after -m has deselected what it deselects
def pytest_collection_modifyitems(config, items):
    """A single --solution file is graded by one exercise's tests only: the exercise selected with -m, or
    the one its file name starts with (ex3_....ipynb)."""
    opt = config.getoption("--solution", default=None)
    if opt is not None and not Path(opt).exists():
        raise pytest.UsageError(f"--solution {opt}: no such file or folder")
    selected = {exercise_of(i) for i in items} - {None}
    if opt is None or Path(opt).is_dir():
        for ex in sorted(selected):                      # a folder must hold one file per selected exercise
            solution_path(config, ex)
        return
    named = re.match(r"(ex\d+)_", Path(opt).name)
    if named and named.group(1) in EXERCISES:
        keep = [i for i in items if exercise_of(i) == named.group(1)]
        if not keep:
            raise pytest.UsageError(f"--solution {opt} looks like {named.group(1)} (from its name), but the "
                                    f"selected tests are for {sorted(selected)}; use -m {named.group(1)}")
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
    elif len(selected) > 1:
        raise pytest.UsageError(f"--solution {opt} is one file but tests of {len(selected)} exercises are "
                                f"selected; choose its exercise with -m exN (e.g. -m ex3)")


def solution_path(config, ex):
    """The file that holds the code graded as exercise `ex`."""
    stem = f"{ex}_{EXERCISES[ex][0]}"
    opt = config.getoption("--solution", default=None)
    if opt is None:
        return SOLUTION_DIR / f"{stem}.py"
    path = Path(opt)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.name.startswith(f"{ex}_")
                       and p.suffix in (".ipynb", ".py"))
        if len(found) != 1:
            raise pytest.UsageError(f"--solution {opt}: expected exactly one {ex}_*.ipynb or {ex}_*.py file "
                                    f"in the folder, found {[p.name for p in found] or 'none'}")
        return found[0]
    return path


def is_solution_cell(cell):
    src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    return cell["cell_type"] == "code" and ("solution" in cell.get("metadata", {}).get("tags", [])
                                            or bool(SOLUTION_MARK.match(src.lstrip())))


def solution_source(path):
    """The Python source to grade: a .py file as it is, or, from a notebook, the code cells tagged
    'solution' or starting with '# SOLUTION' (the other cells, which may train or plot, are not run)."""
    if path.suffix == ".py":
        return path.read_text()
    if path.suffix != ".ipynb":
        raise pytest.UsageError(f"--solution {path}: expected a .ipynb or .py file")
    try:
        nb = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise pytest.UsageError(f"--solution {path} is not a valid notebook (JSON error: {e})") from e
    cells = [c for c in nb.get("cells", []) if is_solution_cell(c)]
    if not cells:
        raise pytest.UsageError(f"--solution {path} has no solution cell (a code cell that starts with "
                                f"'# SOLUTION' or is tagged 'solution')")
    code = "\n\n".join("".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in cells)
    # IPython magics (%time, !pip) are not Python: comment them out, keeping the line numbers
    return "\n".join("# " + ln if ln.lstrip().startswith(("%", "!")) else ln for ln in code.splitlines())


def load_solution(path, name):
    """Execute the student's code into a fresh module, as `import` would."""
    src = solution_source(path)
    # tracebacks show the student's lines: for a notebook, those of its solution cells (not the JSON file)
    filename = str(path) if path.suffix == ".py" else f"{path} (solution cells)"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    mod = types.ModuleType(name)
    mod.__file__ = str(path)
    exec(compile(src, filename, "exec"), mod.__dict__)
    return mod


@pytest.fixture(scope="module")
def sol(request):
    """The student's (or reference) code for this test module's exercise, as a module."""
    ex = exercise_of(request.node)
    assert ex is not None, f"{request.node.nodeid} has no exercise marker (pytestmark = pytest.mark.exN)"
    return load_solution(solution_path(request.config, ex), f"solution_{ex}")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors here are tiny: one thread is faster than two and keeps grading steady on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def own_work(request, monkeypatch):
    """While a test runs, calling any function its module lists in GUARDED = [(owner, name), ...] (e.g.
    (dada_min, "channel_shuffle")) fails with a clear message, so an exercise cannot be solved by calling the
    function it asks for. The tests compare against references saved (REF = ...) before the guard is set."""
    ex = exercise_of(request.node)
    for owner, name in getattr(request.module, "GUARDED", ()):
        def refuse(*args, _name=name, **kwargs):
            raise AssertionError(f"exercise {ex[2:]} asks you to write {_name} yourself; "
                                 f"your solution calls dada_min's {_name}")
        static = isinstance(owner, type) and isinstance(owner.__dict__.get(name), staticmethod)
        monkeypatch.setattr(owner, name, staticmethod(refuse) if static else refuse)
