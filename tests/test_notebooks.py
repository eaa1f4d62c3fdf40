"""The walkthrough notebooks: committed without outputs, shaped as the course expects, and executed top to
bottom in quick mode (DADA_QUICK=1: tiny sizes, a few steps). Also the two hooks of dada_min.train that
the notebooks use (G= and on_eval=)."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import dada_min as dm

NB_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("0*.ipynb"))
NAMES = ["01_domain_gap", "02_diffusion_basics", "03_denoising_as_adaptation", "04_shortcuts",
         "05_beyond_denoising"]

nbformat = pytest.importorskip("nbformat")


def test_the_five_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == NAMES


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has outputs: clear them before committing"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_structure(path):
    nb = nbformat.read(path, as_version=4)
    first, last = nb.cells[0], nb.cells[-1]
    assert first.cell_type == "markdown" and "Learning goals" in first.source
    assert "Full mode: about" in first.source and "@RT" not in first.source       # measured runtime is stated
    setup = nb.cells[1].source                                                   # short: the shared helper does it
    assert nb.cells[1].cell_type == "code" and "from nb_setup import" in setup and f'setup("{path.stem}"' in setup
    assert len(setup.splitlines()) <= 12, f"{path.name}: the setup cell has {len(setup.splitlines())} lines"
    assert last.cell_type == "markdown" and "## What we saw" in last.source
    n_questions = sum(1 for line in last.source.splitlines() if line[:2] in {f"{k}." for k in range(1, 10)})
    assert 2 <= n_questions <= 4, f"{path.name}: {n_questions} questions (want 2-4)"
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "def train_step" not in code and "def train(" not in code              # one implementation
    assert "def run_dir" not in code and "def seed_everything" not in code         # one setup: nb_setup.py
    if "dm.train(" in code:
        assert "resume=True" in code and "run_dir(" in code                         # load when present, else train


def test_the_shared_setup_helper():
    """notebooks/nb_setup.py: imports dada_min, picks the device once, knows quick mode, seeds everything."""
    text = (NB_DIR / "nb_setup.py").read_text()
    assert "import dada_min as dm" in text and 'dm.pick_device("auto")' in text and "DADA_QUICK" in text
    assert "torch.manual_seed(seed)" in text and "np.random.seed(seed)" in text


QUICK = [p for p in NOTEBOOKS if p.stem != "02_diffusion_basics"]                 # 02: test_render_writes_an_executed_copy
RUN_QUICK = """import sys
sys.modules.setdefault("rfc3987_syntax", None)                                  # see conftest.py
import nbformat, nbclient
nb = nbformat.read(sys.argv[1], as_version=4)
nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": sys.argv[2]}}).execute()
"""


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """The notebooks of QUICK executed top to bottom in quick mode, all at once: each kernel runs on one thread (tiny
    tensors) and waits on its client part of the time, so together they finish sooner. {stem: (exit code, output, its
    runs folder)}; a failing cell's traceback is in the output (nbclient's CellExecutionError)."""
    pytest.importorskip("nbclient")
    from concurrent.futures import ThreadPoolExecutor

    def run(path):
        runs = tmp_path_factory.mktemp(path.stem)                                # train fresh, write nothing in the repo
        env = {**os.environ, "DADA_QUICK": "1", "DADA_RUNS": str(runs), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
        p = subprocess.run([sys.executable, "-c", RUN_QUICK, str(path), str(NB_DIR)], env=env, capture_output=True,
                           text=True, timeout=900)
        return path.stem, (p.returncode, p.stdout + p.stderr, runs)
    with ThreadPoolExecutor(max_workers=len(QUICK)) as pool:
        return dict(pool.map(run, QUICK))


@pytest.mark.parametrize("path", QUICK, ids=lambda p: p.stem)
def test_notebook_runs_in_quick_mode(path, quick_runs):
    rc, out, runs = quick_runs[path.stem]
    assert rc == 0, f"{path.name} failed in quick mode:\n{out[-3000:]}"
    assert any(p.name == "checkpoint.pt" for p in runs.rglob("*"))


class Scaled(torch.nn.Module):
    """A restorer that is not the U-Net: one 3x3 conv predicting the residual."""

    def __init__(self):
        super().__init__()
        self.depth = 1
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is fastest, and far faster than two on a busy shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_train_accepts_another_restorer_and_calls_on_eval(tmp_path, tiny_data, one_thread):
    cfg = dm.make_config("tiny", device="cpu", method="da", steps=2, eval_every=1, log_every=1)
    seen = []
    G = Scaled()
    state = dm.train(cfg, tiny_data, out=str(tmp_path), log=lambda *a: None, G=G,
                     on_eval=lambda st: seen.append((st.step, st.history["eval_step"][-1])))
    assert state.G is G and isinstance(state.G_ema, Scaled) and state.G_ema is not G
    assert seen == [(1, 1), (2, 2)]
    assert {id(p) for p in G.parameters()} <= {id(p) for g in state.opt.param_groups for p in g["params"]}
    # the denoiser is initialised exactly as with the default restorer
    fresh = dm.init_state(cfg, torch.device("cpu"), G=Scaled())
    for a, b in zip(fresh.D.parameters(), dm.init_state(cfg, torch.device("cpu")).D.parameters()):
        torch.testing.assert_close(a, b)
    # a finished run resumes from its checkpoint into a fresh module of the same class, without training
    again = dm.train(cfg, tiny_data, out=str(tmp_path), resume=True, log=lambda *a: None, G=Scaled(),
                     on_eval=lambda st: seen.append("trained again"))
    assert again.step == 2 and seen[-1] == (2, 2)
    torch.testing.assert_close(again.G_ema.conv.weight, state.G_ema.conv.weight)


# --- the executed copies in docs/notebooks/ (python notebooks/nb_setup.py --render) ----------------------------
DOCS_NB = NB_DIR.parent / "docs" / "notebooks"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_executed_copy_is_in_sync_with_its_source(path):
    """A change to a source notebook's code or text without re-rendering fails here: run
    `python notebooks/nb_setup.py --render NAME`."""
    copy = DOCS_NB / path.name
    assert copy.is_file(), f"{copy} is missing: run python notebooks/nb_setup.py --render {path.stem}"
    src, done = nbformat.read(path, as_version=4), nbformat.read(copy, as_version=4)
    assert [(c.cell_type, c.source) for c in src.cells] == [(c.cell_type, c.source) for c in done.cells], \
        f"{copy.name} is stale: its cells differ from {path}; re-render it"
    meta = done.metadata["dada_min"]
    assert meta["quick"] is False and meta["wall_seconds"] > 0
    for i, cell in enumerate(done.cells):
        if cell.cell_type == "code":
            assert cell.execution_count is not None, f"{copy.name} cell {i} was not executed"
            assert not any(o.output_type == "error" for o in cell.outputs), f"{copy.name} cell {i} failed"
    assert any({"image/png", "image/jpeg"} & set(o.get("data", {})) for c in done.cells for o in c.get("outputs", []))
    assert copy.stat().st_size < 1e6                                              # large figures stored as JPEG


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_header_states_the_measured_full_mode_time(path):
    """The header's 'Full mode: about N min' is the executed copy's measured wall time, rounded to 0.5 min."""
    import re
    header = nbformat.read(path, as_version=4).cells[0].source
    m = re.search(r"Full mode: about ([0-9.]+) min on a ([0-9]+)-core CPU", header)
    assert m, f"{path.name}: the header does not state the full-mode time"
    meta = nbformat.read(DOCS_NB / path.name, as_version=4).metadata["dada_min"]
    measured = meta["wall_seconds"] / 60
    assert abs(float(m.group(1)) - measured) <= 0.26, f"{path.name}: header {m.group(1)} min, measured {measured:.2f}"
    assert int(m.group(2)) == meta["cpu_cores"] and meta["device"] == "cpu"


@pytest.fixture
def nb_setup():
    """notebooks/nb_setup.py, imported as the notebooks import it (from their folder)."""
    import importlib
    import sys
    sys.path.insert(0, str(NB_DIR))
    yield importlib.import_module("nb_setup")
    sys.path.remove(str(NB_DIR))


def test_header_time_is_rewritten_from_a_run(nb_setup):
    h = "*Full mode: about 6.5 min on a 2-core CPU; GPU: not measured. Quick mode: seconds.*"
    new = nb_setup.header_with_time(h, 200)
    if nb_setup.device.type == "cpu":
        assert new == h.replace("about 6.5 min on a 2-core", f"about 3.5 min on a {os.cpu_count()}-core")
    assert nb_setup.header_with_time(h, 5).count("about") == 1


def test_render_writes_an_executed_copy(tmp_path, monkeypatch, nb_setup):
    """Notebook 02 runs in quick mode here, through the command that writes the executed copies."""
    pytest.importorskip("nbclient")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    times = nb_setup.render(["02_diffusion_basics"], out=tmp_path, quick=True, log=lambda s: None)
    assert list(times) == ["02_diffusion_basics"] and times["02_diffusion_basics"] > 0
    nb = nbformat.read(tmp_path / "02_diffusion_basics.ipynb", as_version=4)
    assert nb.metadata["dada_min"]["quick"] is True
    assert all(c.execution_count is not None for c in nb.cells if c.cell_type == "code")
    with pytest.raises(SystemExit, match="unknown notebook"):
        nb_setup.render(["06_nope"], out=tmp_path)


def test_shrink_images_keeps_copies_small(nb_setup):
    import base64
    import io
    from PIL import Image

    def png(w, h, noisy):
        buf = io.BytesIO()
        arr = (torch.rand(h, w, 3) * 255).byte() if noisy else torch.full((h, w, 3), 200, dtype=torch.uint8)
        Image.fromarray(arr.numpy()).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()
    small, big = png(100, 80, False), png(1200, 400, True)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(outputs=[
        nbformat.v4.new_output("display_data", data={"image/png": small}),
        nbformat.v4.new_output("display_data", data={"image/png": big})])])
    out = nb_setup.shrink_images(nb).cells[0].outputs
    assert out[0].data["image/png"] == small                                     # small figures stay as they are
    jpeg = Image.open(io.BytesIO(base64.b64decode(out[1].data["image/jpeg"])))
    assert "image/png" not in out[1].data and jpeg.size == (720, 240)


def test_ddpm_sampler_runs(nb_setup):
    D = nb_setup.dm.ConditionalDenoiser(8, (1, 2))
    out = nb_setup.ddpm_sample(nb_setup.dm.NoiseSchedule(), D, torch.rand(2, 6, 8, 8), stride=100)
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()
