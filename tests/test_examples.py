"""Smoke tests of examples/*.py: each script runs end to end in its small mode (--smoke / --tiny), as a
subprocess with the offline environment of conftest.py and this checkout first on the path, and what it
prints and writes is checked."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(script: str, *args: str, timeout: float = 180) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def coco_bank(tmp_path_factory, coco128_seg) -> Path:
    from genval_aug.harvest import harvest

    bank = tmp_path_factory.mktemp("bank") / "coco128.lmdb"
    harvest(coco128_seg / "coco128-seg.yaml", bank)
    return bank


def test_every_example_is_documented_and_listed():
    listed = (EXAMPLES / "README.md").read_text()
    for script in sorted(EXAMPLES.glob("*.py")):
        doc = ast.get_docstring(ast.parse(script.read_text()))
        assert doc and len(doc.splitlines()) >= 3, f"{script.name}: no module docstring saying how to run it"
        assert f"python examples/{script.name}" in doc, f"{script.name}: docstring lacks its command line"
        assert script.name in listed, f"{script.name} missing from examples/README.md"


def test_yolo_train_harvests_a_bank_and_pastes_with_attach(coco128_seg, tmp_path):
    out = run_example("yolo_train.py", "--smoke", "--data", coco128_seg / "coco128-seg.yaml",
                      "--project", tmp_path, "--name", "api")
    assert "no bank at" in out and "instances kept" in out          # harvested from the 8 copied images
    m = re.search(r"pasted (\d+) objects into (\d+) images", out)
    assert m and int(m.group(1)) > 0 and int(m.group(2)) > 0, out[-2000:]
    assert (tmp_path / "api" / "weights" / "last.pt").is_file()


def test_yolo_train_through_the_cli(coco128_seg, coco_bank, tmp_path):
    out = run_example("yolo_train.py", "--smoke", "--cli", "--data", coco128_seg / "coco128-seg.yaml",
                      "--bank", coco_bank, "--project", tmp_path, "--name", "cli")
    assert re.search(r"genval-aug yolo train model=yolo11n-seg\.yaml data=\S+ bank=\S+ paste_n=3 epochs=1", out)
    assert "no bank at" not in out
    assert (tmp_path / "cli" / "weights" / "last.pt").is_file()


@pytest.mark.slow
def test_yolo_train_batch_picture(shared_data, tmp_path):
    import cv2

    out = run_example("yolo_train_batch.py", "--smoke", "--data", shared_data, "--out", tmp_path / "tb.jpg")
    img = cv2.imread(str(tmp_path / "tb.jpg"))
    assert "saved" in out and img is not None and min(img.shape[:2]) > 64


@pytest.mark.slow
def test_torchvision_maskrcnn_loop_with_genvalpaste_in_workers(coco128_seg, coco_bank):
    out = run_example("torchvision_train.py", "--smoke", "--data", coco128_seg / "coco128-seg.yaml",
                      "--bank", coco_bank)
    m = re.search(r"sample 0: (\d+) objects labelled -> (\d+) after GenValPaste", out)
    assert m and int(m.group(2)) > int(m.group(1)), out[-2000:]
    losses = [float(v) for v in re.findall(r"step \d+: loss ([-\d.e+na]+)", out)]
    assert len(losses) == 2 and all(0 < v < 1e4 for v in losses), out[-2000:]
    assert "loss_mask=" in out and "2 steps in" in out


def test_albumentations_pipeline(coco128_seg, coco_bank, tmp_path):
    import cv2

    out = run_example("albumentations_pipeline.py", "--smoke", "--data", coco128_seg / "coco128-seg.yaml",
                      "--bank", coco_bank, "--out", tmp_path / "grid.png")
    counts = [(int(a), int(b)) for a, b in re.findall(r"(\d+) objects -> (\d+) after the pipeline", out)]
    assert len(counts) == 2 and sum(b for _, b in counts) > sum(a for a, _ in counts), out
    assert cv2.imread(str(tmp_path / "grid.png")) is not None


def test_build_bank_gpu_tiny_runs_the_yaml_pipeline(tmp_path):
    from genval_aug.bank import InstanceBank, verify

    bank_path = tmp_path / "tiny.lmdb"
    out = run_example("build_bank_gpu.py", "--tiny", "--bank", bank_path, "--sheet", tmp_path / "sheet.png")
    assert "prompts: agent Qwen/Qwen2.5-7B-Instruct" in out and "validator: agent Qwen/Qwen2.5-VL-7B-Instruct" in out
    bank = InstanceBank(bank_path, refresh_interval=None)
    assert bank.categories() == {"banjo": 3, "blimp": 3}
    for name in ("banjo", "blimp"):
        for meta in bank.iter_meta(name):
            src, verdict = meta["source"], meta["verdict"]
            assert src["kind"] == "layerdiffusion" and name in src["prompt"]
            assert src["negative_prompt"].startswith("multiple objects")        # from the YAML
            assert verdict["keep"] and verdict["model"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    n_rejected = len(list(bank.rejected()))
    m = re.search(r"rejected: (\d+)", out)
    assert m and int(m.group(1)) == n_rejected                               # the scripted VLLM said no
    assert verify(bank_path).ok and (tmp_path / "sheet.png").is_file()


def test_build_bank_gpu_refuses_when_the_chat_server_is_down(tmp_path, shared_data):
    """The real config, its servers pointed at a closed loopback port: a clear error before any model loads."""
    import socket

    import yaml

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    raw = yaml.safe_load((EXAMPLES / "build_lvis_rare.yaml").read_text())
    for part in ("prompts", "validator"):
        raw[part]["params"]["backend"]["base_url"] = f"http://127.0.0.1:{port}/v1"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LVIS_CATEGORIES": str(shared_data / "lvis_v1_categories.json")}
    proc = subprocess.run([sys.executable, str(EXAMPLES / "build_bank_gpu.py"), "--config", str(tmp_path / "c.yaml"),
                           "--only", "banjo", "--target", "2", "--bank", str(tmp_path / "b.lmdb"), "--device", "cpu"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and f"127.0.0.1:{port}/v1 does not answer" in proc.stderr, proc.stdout + proc.stderr
    assert "1 below target, 2 instances missing" in proc.stdout


@pytest.mark.slow
def test_topup_worker_fills_the_bank_beside_a_loader(tmp_path):
    out = run_example("topup_worker.py", "--bank", tmp_path / "topup.lmdb", "--seconds", "4")
    final = re.search(r"final: (\{[^}]*\}) \| status: (\{.*\})", out)
    assert final, out[-2000:]
    counts, status = ast.literal_eval(final.group(1)), ast.literal_eval(final.group(2))
    assert set(counts) == {"disk", "box", "star"} and sum(counts.values()) > 15   # seeded with 5 per class
    assert status["state"] == "stopped" and status["total_added"] == sum(counts.values()) - 15
    assert "worker: +0 added" not in out.split("final:")[0].splitlines()[-1]   # the loader saw the new ones
