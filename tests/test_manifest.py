"""Run manifests name the code (commit, uncommitted changes) and the machine (CPU model)."""

import inspect
import platform
import subprocess

import torch

from kalm_lib.manifest import cpu_id, cpu_model, git_state, machine_info

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU @ 2.20GHz
flags\t\t: fpu vme

processor\t: 1
model name\t: Intel(R) Xeon(R) CPU @ 2.20GHz
"""


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True, capture_output=True)


def test_git_state_flags_tracked_changes_outside_excluded_paths(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "results" / "out.json").write_text("{}\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "start")
    clean = git_state(tmp_path)
    assert len(clean["commit"]) == 40 and clean["dirty"] is False

    (tmp_path / "results" / "out.json").write_text('{"new": 1}\n')
    (tmp_path / "notes.txt").write_text("untracked files do not count\n")
    assert git_state(tmp_path, exclude=["results"])["dirty"] is False
    assert git_state(tmp_path)["dirty"] is True

    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_state(tmp_path, exclude=["results"])["dirty"] is True


def test_git_state_outside_a_repository(tmp_path):
    assert git_state(tmp_path) == {"commit": "unknown", "dirty": False}


def test_cpu_model_is_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO)
    assert cpu_model(cpuinfo) == "Intel(R) Xeon(R) CPU @ 2.20GHz"


def test_cpu_model_falls_back_to_platform(tmp_path, monkeypatch):
    monkeypatch.setattr(platform, "processor", lambda: "arm")
    assert cpu_model(tmp_path / "missing") == "arm"
    no_model_name = tmp_path / "cpuinfo"  # e.g. some ARM kernels
    no_model_name.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")
    assert cpu_model(no_model_name) == "arm"
    monkeypatch.setattr(platform, "processor", lambda: "")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert cpu_model(tmp_path / "missing") == "aarch64"


def test_cpu_id_names_family_model_and_stepping(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\nstepping\t: 1\n"
                       "processor\t: 1\ncpu family\t: 6\nmodel\t\t: 85\nstepping\t: 7\n")
    assert cpu_id(cpuinfo) == "family 25 model 17 stepping 1"  # the first CPU's
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")
    assert cpu_id(cpuinfo) is None and cpu_id(tmp_path / "missing") is None


def test_machine_info_records_the_cpu_and_its_kernels():
    info = machine_info()
    assert info["cpu_model"] == cpu_model() and info["cpu_id"] == cpu_id()
    assert isinstance(info["cpu_model"], str) and info["cpu_model"]
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["torch_default_threads"] == torch.get_num_threads()


def test_benchmarks_read_the_cpu_model_through_the_manifest():
    from benchmarks import common

    assert "cpuinfo" not in inspect.getsource(common)  # one reader, in kalm_lib.manifest
    assert common.machine_info()["processor"] == cpu_model()
