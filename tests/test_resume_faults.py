"""Results that survive faults (issue 17): resumed rows are keyed by model, norm, data and
options; a partial last CSV row is dropped; process workers die with their parent."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from verify.cli import main
from verify.compare import compare
from verify.resume import ResumeError, drop_partial_last_row

REPO = Path(__file__).resolve().parent.parent
KW = dict(radii=[0.0, 0.01], max_radius=0.05, attack=False, progress=False)


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.fixture()
def data():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 4, generator=g)
    return x, _net(0)(x).argmax(1)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------- keyed resume


def test_resume_refuses_other_model_norm_or_data(tmp_path, data):
    x, y = data
    compare(_net(0), x, y, ["interval"], out_dir=tmp_path, **KW)
    with pytest.raises(ResumeError, match="another model"):
        compare(_net(1), x, y, ["interval"], out_dir=tmp_path, resume=True, **KW)
    with pytest.raises(ResumeError, match="l2 norm|linf norm"):
        compare(_net(0), x, y, ["interval"], out_dir=tmp_path, resume=True, norm=2, **KW)
    with pytest.raises(ResumeError, match="input 0 differs"):
        compare(_net(0), x.flip(0), y.flip(0), ["interval"], out_dir=tmp_path, resume=True, **KW)
    # the same model, norm and data (more of it) resumes
    x2 = torch.cat([x, torch.rand(2, 4)])
    res = compare(_net(0), x2, _net(0)(x2).argmax(1), ["interval"], out_dir=tmp_path, resume=True, **KW)
    assert [c.index for c in res.table] == list(range(8)) and any("resumed: 6" in n for n in res.notes)


def test_resume_recomputes_a_method_whose_options_changed(tmp_path, data):
    x, y = data
    compare(_net(0), x, y, ["interval", "crown"], out_dir=tmp_path, **KW)
    res = compare(_net(0), x, y, ["interval", "crown"], out_dir=tmp_path, resume=True,
                  options={"crown": {"dtype": "float64"}}, **KW)
    assert any("recomputed crown" in n for n in res.notes) and any("resumed: 6" in n for n in res.notes)
    crown = [r for r in _rows(tmp_path / "compare_results.csv") if r["method"] == "crown"]
    assert len(crown) == 6 and all('"dtype": "float64"' in r["details"] for r in crown)


def test_cli_resume_into_another_models_folder(tmp_path, capsys):
    nets = []
    for seed in (0, 1):
        p = tmp_path / f"net{seed}.pt"
        torch.save(nn.Sequential(nn.Flatten(), _net_digits(seed)), p)
        nets.append(p)
    base = ["compare", "--data", "digits", "--limit", "4", "--methods", "interval", "--radii", "0,0.01",
            "--out", str(tmp_path / "out"), "--no-attack", "-q"]
    assert main([*base, "--model", str(nets[0])]) == 0
    capsys.readouterr()
    assert main([*base, "--model", str(nets[1]), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot resume" in err[0] and "another model" in err[0]


def test_model_digest_any_dtype():
    from verify.resume import model_digest

    a, b = _net(0).to(torch.bfloat16), _net(1).to(torch.bfloat16)  # numpy has no bfloat16
    assert model_digest(a) == model_digest(_net(0).to(torch.bfloat16)) != model_digest(b)


def _net_digits(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


# --------------------------------------------------------------------- partial last rows


def test_drop_partial_last_row(tmp_path):
    p = tmp_path / "r.csv"
    whole = 'a,b,c\r\n1,"x,y",3\r\n'
    p.write_text(whole, newline="")
    assert drop_partial_last_row(p) is None and p.read_bytes() == whole.encode()
    for tail in ('4,"{""k"": 1', "4,5", '4,5,"unterminated\nquote'):
        p.write_text(whole + tail, newline="")
        with pytest.warns(UserWarning, match="r.csv: dropped a partial last row"):
            assert drop_partial_last_row(p)
        assert p.read_bytes() == whole.encode()


def test_compare_resume_after_a_partial_row(tmp_path, data):
    x, y = data
    compare(_net(0), x[:4], y[:4], ["interval"], out_dir=tmp_path, **KW)
    path = tmp_path / "compare_results.csv"
    rows = path.read_text()
    last = rows.splitlines()[-1]
    with open(path, "a") as f:  # a kill in the middle of writing the row of input 4
        f.write(last.replace(",3,", ",4,", 1)[: len(last) // 2])
    with pytest.warns(UserWarning, match="compare_results.csv: dropped a partial last row"):
        res = compare(_net(0), x, y, ["interval"], out_dir=tmp_path, resume=True, **KW)
    assert [c.index for c in res.table] == list(range(6)) and any("resumed: 4" in n for n in res.notes)
    assert sorted(int(r["index"]) for r in _rows(path)) == list(range(6))


def test_vnncomp_resume_after_a_partial_row(tmp_path):
    from test_vnncomp import _onnx_mlp, _vnnlib
    from verify.vnncomp import CSV_COLUMNS, run_benchmark

    d = tmp_path / "toy"
    d.mkdir()
    _onnx_mlp(d / "net0.onnx", 0)
    box = [(-1.0, 1.0), (-1.0, 1.0)]
    for name in ("a", "b"):
        (d / f"{name}.vnnlib").write_text(_vnnlib([box], "(>= Y_0 10000.0)"))
    (d / "instances.csv").write_text("net0.onnx,a.vnnlib,5\nnet0.onnx,b.vnnlib,5\n")
    out = tmp_path / "res.csv"
    run_benchmark(d, out=out, limit=1, progress=False)
    with open(out, "a") as f:  # the row of b.vnnlib, cut by a kill
        f.write("toy,net0.onnx,b.vnnlib,uns")
    with pytest.warns(UserWarning, match="res.csv: dropped a partial last row"):
        new = run_benchmark(d, out=out, resume=True, progress=False)
    assert [r["vnnlib"] for r in new] == ["b.vnnlib"]
    with open(out, newline="") as f:
        raw = list(csv.reader(f))
    assert all(len(r) == len(CSV_COLUMNS) for r in raw)  # no 13-field row
    assert [r[2] for r in raw[1:]] == ["a.vnnlib", "b.vnnlib"]


# --------------------------------------------------------------------- workers die with the parent

SLEEPY = """
import os, time
from torch import nn

class Sleepy(nn.Module):
    '''Writes its pid, then sleeps for minutes (while torch.fx traces it in a worker).'''
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        with open(os.environ["SLEEPY_PIDFILE"], "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(300)
        return self.lin(x)
"""

DRIVER = """
import torch, sleepy
from verify.executor import Task, execute
task = Task("interval", {}, sleepy.Sleepy(), torch.rand(1, 4), torch.tensor([0]), [0], find_radius=False)
for _ in execute([task], "process", 1):
    pass
"""


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_process_workers_die_with_parent(tmp_path):
    (tmp_path / "sleepy.py").write_text(SLEEPY)
    pidfile = tmp_path / "pids"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}", "SLEEPY_PIDFILE": str(pidfile), "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(DRIVER)], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    try:
        deadline = time.monotonic() + 120
        while worker is None and time.monotonic() < deadline and parent.poll() is None:
            text = pidfile.read_text() if pidfile.exists() else ""
            worker = int(text.split()[0]) if text.strip() else None
            time.sleep(0.2)
        assert worker is not None, "the worker never started its task"
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker), "the worker outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        if worker is not None and _alive(worker):
            os.kill(worker, signal.SIGKILL)


WATCHDOG = """
import os, sys, time
import verify.executor as ex
ex._set_pdeathsig = lambda sig: False  # as where prctl is missing: the watchdog alone
parent = os.getpid()
child = os.fork()
if child == 0:
    ex.die_with_parent(parent, poll_s=0.1)
    with open(sys.argv[1], "w") as f:
        f.write(str(os.getpid()))
    time.sleep(300)
    os._exit(0)
while not os.path.exists(sys.argv[1]) or not open(sys.argv[1]).read():
    time.sleep(0.05)
os._exit(0)  # the parent dies without a word to its child
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, forks")
def test_watchdog_ends_a_worker_without_prctl(tmp_path):
    pidfile = tmp_path / "pid"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", textwrap.dedent(WATCHDOG), str(pidfile)], env=env, timeout=120, check=True)
    child = int(pidfile.read_text())
    try:
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the watchdog did not end the orphaned worker"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
