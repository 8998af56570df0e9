"""`certify vnncomp` is wired into the CLI."""

from verify.cli import main


def test_vnncomp_command_runs_the_test_benchmark(shared_dir, tmp_path, capsys):
    folder = shared_dir / "benchmarks" / "vnncomp" / "2021" / "test"
    out = tmp_path / "r.csv"
    assert main(["vnncomp", str(folder), "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "instances 5" in text and out.exists()


def test_vnncomp_missing_folder_is_a_one_line_error(tmp_path, capsys):
    code = main(["vnncomp", str(tmp_path / "nope"), "--out", str(tmp_path / "r.csv"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("certify: error: ")


def test_vnncomp_takes_the_common_options(tmp_path, capsys):
    """``--threads`` and ``-q`` like every sub-command; a bad value is a one-line error."""
    code = main(["vnncomp", str(tmp_path), "--threads", "0", "-q"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == "certify: error: --threads must be >= 1, got 0"


def test_vnncomp_device_not_available_is_a_one_line_error(tmp_path, capsys):
    """``--device`` names where the bounds run; one that this machine lacks is refused up front."""
    import torch

    if torch.cuda.device_count() > 7:
        return
    code = main(["vnncomp", str(tmp_path), "--device", "cuda:7", "-q"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("certify: error: device 'cuda:7' requested")
